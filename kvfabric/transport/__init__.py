"""kvfabric.transport"""
