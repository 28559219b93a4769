"""MiniCache cross-layer KV merging: reference.py holds the magnitude/direction split, the SLERP
merge with token retention and the per-layer restore in plain torch (any device); the runtime
cache that merges adjacent layer pairs as they store each chunk is
``longfx.runtime.minicache_cache``."""
