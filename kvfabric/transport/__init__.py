"""The data plane: the frame codec, the TCP server, shared memory, NIXL and GPUDirect Storage paths."""

from kvfabric.transport.frames import Limits, ParseError
from kvfabric.transport.server import FabricServer, ServerConfig

__all__ = ["FabricServer", "Limits", "ParseError", "ServerConfig"]
