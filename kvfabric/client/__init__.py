"""kvfabric.client"""
