"""Experiment (issue 4, tuning only): a neighbour window at the model's own frequencies, YaRN
beyond it — SelfExtend's two-regime attention with YaRN's frequencies for the far regime
instead of grouped positions (ReRoPE's "exact inside a window" idea, Su 2023, with YaRN's
interpolation outside).

It runs ``run_smollm2_gpu.py`` with ``longfx::self_extend_attention`` patched: a site
rewritten by ``self_extend(group=1, window=W)`` scores keys within W at their true distance
with the model's frequencies θ, and farther keys with q and k re-rotated to YaRN's θ(s),
s = clamp(margin·Skv/L₀, 1, cap) (``extend``'s schedule, computed per call from the number of
keys), times YaRN's temperature (0.1·ln s + 1)² on the far scores (``LFX_TEMP=far``), on all
scores (``both``) or none (``none``). The cache keeps keys at θ, so every call reads them
consistently. The blocked torch path runs (no fused kernel): this measures fidelity only.

    LFX_TEMP=far python experiment_window_yarn.py --gguf /tmp/smol.gguf --out x.jsonl \
        --recipe "self_extend(group=1, window=4096)" --chunk 65536 --seed 7 ...
"""
from __future__ import annotations

import math
import os
import sys

import torch

from longfx.kernels.attention import dense
from longfx.kernels.rope.dynamic import yarn_gamma
from longfx.kernels.self_extend import blocked, op
from longfx.kernels.sparse_attention.reference import positions, rotate_back

L0 = int(os.environ.get("LFX_L0", "8192"))
CAP = float(os.environ.get("LFX_CAP", "6"))
MARGIN = float(os.environ.get("LFX_MARGIN", "2"))
TEMP = os.environ.get("LFX_TEMP", "far")


def window_yarn(q, k, v, key_keep, scale, softcap, group, window, inv_freq, rope_style,
                block: int = 1024):
    s, skv = q.shape[2], k.shape[2]
    if group != 1:
        raise ValueError("the experiment patches self_extend(group=1, ...) only")
    sc = min(max(MARGIN * skv / L0, 1.0), CAP)
    temp = (0.1 * math.log(sc) + 1) ** 2
    if skv <= window and key_keep is None and not softcap and s in (1, skv):
        return dense.sdpa(q, k, v, is_causal=s == skv and s > 1,
                          scale=scale * (temp if TEMP == "both" else 1.0))
    inv = inv_freq.to(q.device).double()
    n = inv.numel()
    base = float(inv[1] ** (-n)) if n > 1 else 10000.0     # θ_1 = base^(−2/(2n))
    gamma = yarn_gamma(n, 2 * n, base, L0, 32.0, 1.0).to(q.device).double()
    inv_s = inv * (gamma / sc + 1 - gamma)
    qp_all, kp_all = positions(s, skv, q.device)
    kf_all = rotate_back(k, kp_all, (inv - inv_s).float(), rope_style)   # keys at θ(s)
    groups = q.shape[1] // k.shape[1]
    t_near = temp if TEMP == "both" else 1.0
    t_far = temp if TEMP in ("both", "far") else 1.0
    outs = []
    for i0 in range(0, s, block):
        i1 = min(s, i0 + block)
        qp = qp_all[i0:i1]
        m = int(qp[-1]) + 1
        qb = q[:, :, i0:i1]
        qf = rotate_back(qb, qp, (inv - inv_s).float(), rope_style)
        kb, kfb, vb = k[:, :, :m], kf_all[:, :, :m], v[:, :, :m]
        if groups > 1:
            kb, kfb, vb = (x.repeat_interleave(groups, dim=1) for x in (kb, kfb, vb))
        d = qp[:, None] - kp_all[None, :m]
        near = torch.matmul(qb, kb.transpose(-1, -2)).float() * (scale * t_near)
        far = torch.matmul(qf, kfb.transpose(-1, -2)).float() * (scale * t_far)
        scores = torch.where(d < window, near, far)
        del near, far
        keep = (d >= 0)[None, None]
        if key_keep is not None:
            keep = keep & key_keep.bool()[:, None, None, :m]
        scores = scores.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        outs.append(torch.matmul(probs.to(vb.dtype), vb))
    return torch.cat(outs, dim=2)


blocked.self_extend_attention = window_yarn
op._triton_impl = lambda: None

if __name__ == "__main__":
    import run_smollm2_gpu

    print(f"window_yarn experiment: L0={L0} cap={CAP} margin={MARGIN} temp={TEMP}", flush=True)
    sys.exit(run_smollm2_gpu.main())
