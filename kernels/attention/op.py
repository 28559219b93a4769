"""``longfx::attention`` — the canonical attention op every attention site becomes.

Arguments follow ``F.scaled_dot_product_attention`` (see reference.py for the exact
semantics) plus ``softcap``; k and v stay un-repeated under GQA. The op is exact: it computes
what the site computed. Later families attach a sparsity spec or a different state layout
to it; lowering picks the implementation (reference here; Triton/FlexAttention per device).

Small calls run the reference (the sites' own eager arithmetic, so an unchanged model
stays bit-exact). A call whose [B, H, S, Skv] score matrix would pass ``REFERENCE_MAX_SCORES``
elements runs ``F.scaled_dot_product_attention`` instead (dense.py: flash / memory-efficient
kernels, memory linear in the length; the same function up to float rounding) when SDPA can
express it (4-D, no softcap, not both a mask and ``is_causal``). The reference alone asked
for 36 GiB in a 32k-token one-call prefill of SmolLM2 and failed on an H100 (2026-11-24).

On CUDA, a GQA call with at most ``GROUPED_MAX_QUERIES`` queries (decode steps, short chunks)
runs grouped.py instead: the reference's arithmetic with the query-head group folded into the
query rows, so the cache's K and V are read once and never repeated per query head (the
reference's repeat was most of a decode step over a long cache). A CUDA call in fp16/bf16 with
no mask at all, not ``is_causal`` and no softcap (a decode step: transformers 5.23 passes no mask
for one query without padding) runs SDPA's fused kernels with ``enable_gqa`` before either
(``unmasked_sdpa_can_run``): the whole op in one kernel that reads K/V once, the fastest path
measured for a decode step. H100, torch 2.11, bf16, 32/8 heads, D 128, one query, 2026-11-24
(benchmarks/bench_grouped_decode.py, results/grouped_decode_h100.json), the op with no mask /
the op with an all-true mask (grouped.py) / F.scaled_dot_product_attention called directly:
0.093 / 0.257 / 0.081 ms at 32k B=1, 0.225 / 0.436 / 0.199 ms at 128k B=1, 0.402 / 0.631 /
0.385 ms at 32k B=8. It equals the reference up to float rounding (max rel. error 5.8e-3 -
6.9e-3 there, bf16), not bit for bit. CPU calls keep the reference, bit for bit.
"""
from __future__ import annotations

import torch

from longfx.kernels.attention import dense, grouped, reference


REFERENCE_MAX_SCORES = 1 << 24      # 64 MiB of fp32 scores
GROUPED_MAX_QUERIES = 16
GROUPED_MAX_SCORES = 1 << 26        # 256 MiB of fp32 scores


def grouped_can_run(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None,
                    is_causal: bool) -> bool:
    """A CUDA GQA call with few queries whose mask folding keeps (grouped.applies)."""
    if not q.is_cuda or q.dim() != 4 or q.shape[2] > GROUPED_MAX_QUERIES:
        return False
    scores = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
    return scores <= GROUPED_MAX_SCORES and grouped.applies(q, k, mask, is_causal)


def unmasked_sdpa_can_run(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None,
                          is_causal: bool, softcap: float) -> bool:
    """A CUDA fp16/bf16 call with no mask, not causal, no softcap: SDPA's flash kernel takes it
    whole (GQA by ``enable_gqa``, no repeat; dense.sdpa)."""
    return (q.is_cuda and q.dim() == 4 and mask is None and not is_causal and not softcap
            and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype)


def sdpa_can_run(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                 softcap: float) -> bool:
    if q.dim() != 4 or softcap or (is_causal and mask is not None):
        return False
    return q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] > REFERENCE_MAX_SCORES


@torch.library.custom_op("longfx::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float, is_causal: bool, softcap: float) -> torch.Tensor:
    if unmasked_sdpa_can_run(q, k, mask, is_causal, softcap):
        return dense.sdpa(q, k, v, scale=scale)        # never cuDNN (dense.py says why)
    if grouped_can_run(q, k, mask, is_causal):
        return grouped.attention(q, k, v, mask, scale, softcap)
    if not sdpa_can_run(q, k, mask, is_causal, softcap):
        return reference.attention(q, k, v, mask, scale, is_causal, softcap)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    out = dense.sdpa(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    return out if mask is None else out.nan_to_num(0.0)     # fully masked rows -> 0


@attention.register_fake
def _(q, k, v, mask, scale, is_causal, softcap):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype)


OP = torch.ops.longfx.attention.default
