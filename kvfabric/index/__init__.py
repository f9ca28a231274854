"""kvfabric.index"""
