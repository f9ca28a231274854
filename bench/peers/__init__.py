"""Peer systems that kvfabric's transport benchmark compares against: Redis, Mooncake Store, LMCache's server.

None of them is a kvfabric dependency. They live in their own virtualenv (``.bench-venv/``, made by
``bash bench/peers/install.sh``); each peer module starts its peer's servers here, on 127.0.0.1, runs the client half
in that virtualenv's Python as a separate process, and returns a :class:`~bench.peers.result.PeerMeasurement`.
Importing this package imports no peer library.
"""
