"""Runtime: process groups, device mesh, FSDP2, attention backends, context parallelism.

Imports no model: the modules to shard or make context-parallel and the init function are handed
in (`models/parallelize.py` does that for the DiT).
"""
