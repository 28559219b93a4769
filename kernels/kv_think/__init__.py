"""ThinK key-cache channel pruning: reference.py holds the channel scoring, the selection and the
pruned <-> full key layouts in plain torch (any device); the runtime cache that prunes each
prefill chunk once and stores the pruned keys compactly is ``longfx.runtime.think_cache``."""
