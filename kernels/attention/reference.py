"""Reference attention: plain torch, obviously correct, any device.

softmax(q·kᵀ·scale [→ softcap] [+ mask]) · v with the conventions of
``F.scaled_dot_product_attention`` (Vaswani et al. 2017; softcapping as in Gemma 2):

* q: [B, H, S, D] or [N, S, D]; k, v: [B, Hkv, Skv, D] (H % Hkv == 0, head h reads kv head
  h // (H / Hkv), as repeat_kv and repeat_interleave both do) or [N, Skv, D].
* mask: bool (True = attend) or float (added to the scores), broadcastable to [B, H, S, Skv].
* is_causal: query i attends keys j <= i (top-left aligned, as SDPA defines it).
* Rows with every key masked give zeros (SDPA's convention), not NaN.
* Scores are computed in the input dtype and the softmax in float32, then cast back.
"""
from __future__ import annotations

import torch


def expand_kv(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Repeat kv heads to match q's heads: [B, Hkv, Skv, D] -> [B, H, Skv, D]."""
    if q.dim() != 4 or x.shape[1] == q.shape[1]:
        return x
    groups = q.shape[1] // x.shape[1]
    return x.repeat_interleave(groups, dim=1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              scale: float | None = None, is_causal: bool = False,
              softcap: float = 0.0) -> torch.Tensor:
    if scale is None:
        scale = q.shape[-1] ** -0.5
    k = expand_kv(q, k)
    v = expand_kv(q, v)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale          # [B, H, S, Skv]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    keep = None
    if is_causal:
        s, skv = scores.shape[-2], scores.shape[-1]
        keep = torch.ones(s, skv, dtype=torch.bool, device=q.device).tril()
    return weigh(scores, mask, keep, v)


def weigh(scores: torch.Tensor, mask: torch.Tensor | None, keep: torch.Tensor | None,
          v: torch.Tensor) -> torch.Tensor:
    """softmax(scores [+ float mask], keys outside ``keep`` and a bool ``mask`` excluded) · v,
    the softmax in float32 and fully masked rows 0 (SDPA's convention)."""
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask if keep is None else keep & mask
        else:
            scores = scores + mask
    scores = scores.float()
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if keep is not None:
        probs = probs.nan_to_num(0.0)          # fully masked rows -> 0, as SDPA
    return torch.matmul(probs.to(v.dtype), v)
