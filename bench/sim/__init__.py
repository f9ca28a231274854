"""Trace-driven simulation of engines, a KV fabric and a router (driven by ``bench/trace_sim.py``)."""
