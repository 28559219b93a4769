"""The ``streaming_kv`` read before 2026-11-24, kept as the reference the current read is
checked against (tests/runtime/test_evict_streaming_read.py) and timed against
(benchmarks/bench_streaming_decode.py): plain tensors, the true positions of the kept keys
stored, every kept key moved to its in-cache position on every read
(``kernels/kv_evict/reference.py:rerotate_to_cache_positions``). The current read
(``runtime/evict_cache.py``) rotates the sink keys only: the window keys' in-cache positions
are their true positions."""
from __future__ import annotations

import torch

from longfx.kernels.kv_evict import reference as R
from longfx.runtime.evict_cache import EvictCache, EvictLayer, TensorStore

__all__ = ["RerotateAllLayer", "RerotateAllCache"]


class RerotateAllLayer(EvictLayer):
    """A StreamingLLM layer that re-rotates every kept key on every read (the old read)."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.true_pos = torch.zeros(0, dtype=torch.long, device=key_states.device)
        p, s, past = self.policy, key_states.shape[-2], self.kept
        seen0 = self.seen
        self.seen = seen0 + s
        keys, values = self.store.update(key_states, value_states)
        pos = torch.cat((self.true_pos, torch.arange(seen0, seen0 + s, device=keys.device)))
        out_k = keys
        if past and seen0 != past:
            out_k = torch.cat((R.rerotate_to_cache_positions(keys[:, :, :past], self.true_pos,
                                                             seen0 - past, self.inv_freq),
                               keys[:, :, past:]), 2)
        idx = R.streaming_keep(past + s, p.sink, p.window, device=keys.device)
        self.store.keep(idx, keys, values)
        self.true_pos = pos[idx]
        return out_k, values


class RerotateAllCache(EvictCache):
    """An ``EvictCache`` of :class:`RerotateAllLayer` over plain tensor stores."""

    def _new_layer(self):
        return RerotateAllLayer(self.policy, self.inv_freq, TensorStore())
