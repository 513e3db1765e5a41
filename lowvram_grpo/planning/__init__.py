"""Fitting a run into memory: the estimate (memory), the chunk sizes chosen from it (planner),
the chunk sizes themselves (chunking) and the out-of-memory back-off (backoff)."""
