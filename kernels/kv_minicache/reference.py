"""Reference MiniCache: merge two adjacent layers' KV states into one direction per token.

MiniCache (Liu et al. 2024, "MiniCache: KV Cache Compression in Depth Dimension for Large
Language Models", arXiv:2405.14366): in the middle-to-deep layers, the KV vectors of layer l
and l+1 for the same token and head point in similar directions. Each vector is split into its
magnitude ``||x||`` and direction ``x / ||x||``; the pair's directions are merged by SLERP
(spherical linear interpolation) at ``t``,

    Ω = arccos(u0 · u1),   e = sin((1 − t) Ω) / sin Ω · u0 + sin(t Ω) / sin Ω · u1,

and both magnitudes are kept, so layer l is restored as ``||x0|| · e`` and layer l+1 as
``||x1|| · e``. Token retention: pairs whose directions are too far apart are not merged; both
layers keep their exact vectors.

Retention rule here: a pair is retained when its normalized angular distance ``d = Ω / π``
(0: same direction, 0.5: orthogonal, 1: opposite) is above ``threshold``. The paper sets its
threshold relative to the range of distances it sees (hyperparameter γ); an absolute angle
makes a token's fate independent of the other tokens of its chunk, so a chunked prefill merges
exactly as one pass does. It also bounds the error of a merged token: the merged direction is
``t Ω`` from u0 and ``(1 − t) Ω`` from u1, so the restored vectors are off by at most
``2 sin(max(t, 1 − t) · π · threshold / 2)`` relative to their norm.

Stored layout of a merged pair (:class:`MergedKV`, one for keys and one for values):

* ``dir``   [B, Hkv, T, D] the merged unit direction; for a retained token, layer l's exact vector;
* ``norm``  [2, B, Hkv, T] the magnitudes of layer l and l+1;
* ``keep``  bool [B, Hkv, T] retained tokens;
* ``extra`` [N, D] layer l+1's exact vectors of the N retained tokens, in the order of
  ``keep.permute(2, 0, 1)`` (token-major, so appending a chunk appends to ``extra``).

Degenerate pairs: Ω ≈ 0 (sin Ω < 1e-6) falls back to the normalized linear interpolation
(the limit of SLERP); a zero vector has norm 0 and restores to zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["MergedKV", "split", "angular_distance", "slerp", "merge", "restore", "concat",
           "error_bound"]

_EPS = 1e-6


@dataclass
class MergedKV:
    dir: torch.Tensor       # [B, Hkv, T, D]
    norm: torch.Tensor      # [2, B, Hkv, T]
    keep: torch.Tensor      # bool [B, Hkv, T]
    extra: torch.Tensor     # [N, D]

    NAMES = ("dir", "norm", "keep", "extra")

    def tensors(self) -> list[torch.Tensor]:
        return [self.dir, self.norm, self.keep, self.extra]

    @property
    def length(self) -> int:
        return self.dir.shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @staticmethod
    def empty(B: int, Hkv: int, D: int, dtype, device) -> "MergedKV":
        return MergedKV(torch.empty(B, Hkv, 0, D, dtype=dtype, device=device),
                        torch.empty(2, B, Hkv, 0, dtype=dtype, device=device),
                        torch.empty(B, Hkv, 0, dtype=torch.bool, device=device),
                        torch.empty(0, D, dtype=dtype, device=device))


def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitude and direction: x [..., D] -> (norm float32 [...], unit float32 [..., D])."""
    x = x.float()
    n = x.norm(dim=-1)
    return n, x / n.clamp_min(1e-30)[..., None]


def angular_distance(u0: torch.Tensor, u1: torch.Tensor) -> torch.Tensor:
    """Normalized angle Ω / π in [0, 1] between unit vectors u0, u1 [..., D] -> [...]."""
    return torch.arccos((u0 * u1).sum(-1).clamp(-1.0, 1.0)) / math.pi


def slerp(u0: torch.Tensor, u1: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of unit vectors u0, u1 [..., D] at t (0 gives u0, 1 gives u1)."""
    omega = torch.arccos((u0 * u1).sum(-1, keepdim=True).clamp(-1.0, 1.0))   # [..., 1]
    s = omega.sin()
    small = s < _EPS
    safe = torch.where(small, torch.ones_like(s), s)
    e = (torch.sin((1.0 - t) * omega) / safe) * u0 + (torch.sin(t * omega) / safe) * u1
    lin = (1.0 - t) * u0 + t * u1
    lin = lin / lin.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return torch.where(small, lin, e)


def merge(x0: torch.Tensor, x1: torch.Tensor, t: float, threshold: float) -> MergedKV:
    """Merge layer l's ``x0`` and layer l+1's ``x1`` (both [B, Hkv, T, D], same tokens)."""
    n0, u0 = split(x0)
    n1, u1 = split(x1)
    keep = angular_distance(u0, u1) > threshold                            # [B, Hkv, T]
    e = slerp(u0, u1, t).to(x0.dtype)                                      # [B, Hkv, T, D]
    dir_ = torch.where(keep[..., None], x0, e)
    extra = x1.permute(2, 0, 1, 3)[keep.permute(2, 0, 1)]                 # [N, D] token-major
    norm = torch.stack((n0, n1)).to(x0.dtype)                              # [2, B, Hkv, T]
    return MergedKV(dir_, norm, keep, extra)


def restore(m: MergedKV, which: int) -> torch.Tensor:
    """Layer l (``which=0``) or l+1 (``which=1``) from a merged pair: the merged direction times
    the layer's norm, retained tokens exact. -> [B, Hkv, T, D]."""
    out = m.dir * m.norm[which][..., None]
    if which == 0:
        return torch.where(m.keep[..., None], m.dir, out)
    # layer l+1's retained tokens from ``extra``: the k-th True of the token-major mask reads
    # extra[k] (a cumsum + gather, no data-dependent shape, so Dynamo traces it)
    keep_t = m.keep.permute(2, 0, 1)                                       # [T, B, Hkv]
    pos = (keep_t.reshape(-1).cumsum(0) - 1).clamp_min(0).view(keep_t.shape)
    if m.extra.shape[0] == 0:
        return out
    exact = m.extra[pos].permute(1, 2, 0, 3)                               # [B, Hkv, T, D]
    return torch.where(m.keep[..., None], exact, out)


def concat(a: MergedKV, b: MergedKV) -> MergedKV:
    """``a`` followed by ``b`` on the token axis (``extra`` is token-major, so it appends)."""
    return MergedKV(torch.cat((a.dir, b.dir), 2), torch.cat((a.norm, b.norm), 3),
                    torch.cat((a.keep, b.keep), 2), torch.cat((a.extra, b.extra), 0))


def error_bound(t: float, threshold: float) -> float:
    """Largest relative error ``||restored − x|| / ||x||`` of a merged token."""
    return 2.0 * math.sin(max(t, 1.0 - t) * math.pi * threshold / 2.0)
