"""The client tests run against the same live servers as the transport tests: one set of fixtures."""

from tests.transport.conftest import ram, server, store

__all__ = ["ram", "server", "store"]
