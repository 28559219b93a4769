"""Attention over the key blocks a table lists, by gathering them: the CPU lowering (and the
any-device fallback) of ``longfx::block_sparse_attention``. Semantics: ``reference.table_mask``.

Each query block attends the concatenation of its listed key blocks ([n_keep · bs] keys,
padding entries masked), so work and memory follow the kept blocks, not the context. Query
blocks are processed in groups so that the gathered keys stay below ``MAX_ELEMS`` scores.
"""
from __future__ import annotations

import torch

MAX_ELEMS = 1 << 25          # scores [B, H, n, bs, L] per group of query blocks


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, bs: int,
           scale: float, softcap: float = 0.0,
           key_keep: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, S, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv], table int [B, H, nqb, W]
    -> [B, H, S, Dv] in v's dtype."""
    B, H, S, D = q.shape
    Hkv, Skv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    nqb, width = table.shape[2], table.shape[3]
    if nqb != -(-S // bs):
        raise ValueError(f"table has {nqb} query blocks, S={S} with block {bs} needs {-(-S // bs)}")
    dev = q.device
    head_kv = torch.arange(H, device=dev) // (H // Hkv)                    # [H]
    base = (torch.arange(B, device=dev)[:, None] * Hkv + head_kv[None, :]) * Skv   # [B, H]
    k_flat = k.reshape(B * Hkv * Skv, D)
    v_flat = v.reshape(B * Hkv * Skv, Dv)
    keep_flat = None if key_keep is None else key_keep.bool().reshape(-1)  # [B·Skv]
    offs = torch.arange(bs, device=dev)
    qpad = torch.nn.functional.pad(q, (0, 0, 0, nqb * bs - S))            # [B, H, nqb·bs, D]
    qb_all = qpad.reshape(B, H, nqb, bs, D)
    L = width * bs
    step = max(1, MAX_ELEMS // max(1, B * H * bs * L))
    outs = []
    for g0 in range(0, nqb, step):                  # groups of query blocks, not single blocks
        g1 = min(nqb, g0 + step)
        tab = table[:, :, g0:g1].long()                                    # [B, H, n, W]
        pos = (tab.clamp(min=0)[..., None] * bs + offs).reshape(B, H, g1 - g0, L)  # [B, H, n, L]
        ok = (tab >= 0)[..., None].expand(-1, -1, -1, -1, bs).reshape(B, H, g1 - g0, L)
        ok = ok & (pos < Skv)
        pos = pos.clamp(max=Skv - 1)
        flat = base[:, :, None, None] + pos                                # [B, H, n, L]
        kg = k_flat[flat]                                                  # [B, H, n, L, D]
        vg = v_flat[flat]                                                  # [B, H, n, L, Dv]
        qp = Skv - S + torch.arange(g0 * bs, g1 * bs, device=dev).reshape(g1 - g0, bs)  # [n, bs]
        keep = ok[:, :, :, None, :] & (pos[:, :, :, None, :] <= qp[None, None, :, :, None])
        if keep_flat is not None:
            kk = keep_flat[torch.arange(B, device=dev)[:, None, None, None] * Skv + pos]
            keep = keep & kk[:, :, :, None, :]                             # [B, H, n, bs, L]
        qb = qb_all[:, :, g0:g1]                                           # [B, H, n, bs, D]
        sc = torch.matmul(qb, kg.transpose(-1, -2)) * scale                # [B, H, n, bs, L]
        if softcap:
            sc = torch.tanh(sc / softcap) * softcap
        p = torch.softmax(sc.float().masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
        outs.append(torch.matmul(p.to(vg.dtype), vg))                      # [B, H, n, bs, Dv]
    out = torch.cat(outs, dim=2).reshape(B, H, nqb * bs, Dv)[:, :, :S]
    return out.to(v.dtype)
