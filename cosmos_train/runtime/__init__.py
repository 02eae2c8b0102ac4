"""Runtime: process groups, device mesh, FSDP2, attention backends, context parallelism."""
