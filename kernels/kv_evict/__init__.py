"""KV-cache eviction (SnapKV, H2O, StreamingLLM): reference.py holds the scoring and the
selection in plain torch (any device); the runtime cache that applies them after each chunk
and decode step, compacting per KV head, is ``longfx.runtime.evict_cache``."""
