"""kvfabric.api"""
