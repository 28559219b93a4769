"""The sparse-attention reference against independent spellings of the same masks."""
import pytest
import torch
import torch.nn.functional as F

from longfx.kernels.sparse_attention import reference as R


def _rand(B, H, Hkv, S, Skv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, S, D, generator=g), torch.randn(B, Hkv, Skv, D, generator=g),
            torch.randn(B, Hkv, Skv, D, generator=g))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_visible_matches_a_loop():
    qp, kp = R.positions(5, 12)
    keep = R.visible(qp, kp, sink=2, window=3)
    for i, p in enumerate(qp.tolist()):
        for j in range(12):
            assert bool(keep[i, j]) == (j <= p and (j < 2 or p - j < 3))


@pytest.mark.parametrize("S,Skv", [(9, 9), (1, 17), (4, 11)])
def test_no_window_is_bottom_right_causal_sdpa(S, Skv):
    q, k, v = _rand(2, 4, 2, S, Skv, 16)
    mask = torch.ones(S, Skv, dtype=torch.bool).tril(Skv - S)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert _rel(R.sparse_attention(q, k, v), ref) < 1e-5
    assert _rel(R.sparse_attention(q, k, v, window=Skv), ref) < 1e-5     # window >= Skv


def test_sink_window_and_padding_match_an_explicit_mask():
    q, k, v = _rand(2, 2, 1, 7, 20, 8, seed=1)
    pad = torch.ones(2, 20, dtype=torch.bool)
    pad[1, :3] = False                                     # batch 1 is left-padded by 3
    qp = torch.arange(13, 20)
    mask = torch.zeros(2, 1, 7, 20, dtype=torch.bool)
    for b in range(2):
        for i, p in enumerate(qp.tolist()):
            for j in range(20):
                mask[b, 0, i, j] = j <= p and (j < 4 or p - j < 5) and bool(pad[b, j])
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    out = R.sparse_attention(q, k, v, key_keep=pad, sink=4, window=5)
    assert _rel(out, ref) < 1e-5


def _rope(x, pos, inv, style):
    ang = pos.double()[:, None] * inv.double()[None]                      # [S, R/2]
    cos, sin = ang.cos().float(), ang.sin().float()
    if style == "rotate_half":
        h = inv.numel()
        x1, x2 = x[..., :h], x[..., h:2 * h]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * h:]), -1)
    x1, x2 = x[..., 0:2 * inv.numel():2], x[..., 1:2 * inv.numel():2]
    rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).flatten(-2)
    return torch.cat((rot, x[..., 2 * inv.numel():]), -1)


@pytest.mark.parametrize("style", ["rotate_half", "interleaved"])
def test_cap_scores_sinks_from_the_capped_position(style):
    """With raw q/k, the capped score of a sink key is q rotated at min(p, cap) · k at j."""
    D, R2, S, Skv, sink, window, cap = 16, 12, 6, 30, 3, 4, 8
    inv = 10000.0 ** (-torch.arange(0, R2, 2).double() / R2)
    q_raw, k_raw, v = _rand(1, 2, 2, S, Skv, D, seed=3)
    qp, kp = R.positions(S, Skv)
    q = _rope(q_raw, qp, inv, style)
    k = _rope(k_raw, kp, inv, style)
    out = R.sparse_attention(q, k, v, sink=sink, window=window, cap=cap, inv_freq=inv,
                             rope_style=style)
    # independent: per query, sinks scored with q rotated at min(p, cap)
    rows = []
    for i, p in enumerate(qp.tolist()):
        qi = _rope(q_raw[:, :, i:i + 1], torch.tensor([p]), inv, style)
        qs = _rope(q_raw[:, :, i:i + 1], torch.tensor([min(p, cap)]), inv, style)
        keys = [j for j in range(Skv) if j <= p and (j < sink or p - j < window)]
        sc = torch.stack([((qs if j < sink else qi) * k[:, :, j:j + 1]).sum(-1)[..., 0]
                          for j in keys], -1) * D ** -0.5
        rows.append(torch.softmax(sc, -1)[:, :, None] @ v[:, :, keys])
    ref = torch.cat(rows, dim=2)
    assert _rel(out, ref) < 1e-5


def test_density_closed_form_matches_the_mask():
    for S, Skv, sink, window in [(16, 16, 2, 4), (3, 40, 4, 8), (40, 40, 0, 50), (1, 9, 1, 2)]:
        qp, kp = R.positions(S, Skv)
        kept = R.visible(qp, kp, sink, window).sum()
        causal = R.visible(qp, kp, 0, 0).sum()
        assert abs(R.density(S, Skv, sink, window) - float(kept) / float(causal)) < 1e-12
        assert torch.equal(R.row_counts(S, Skv, sink, window), R.visible(qp, kp, sink, window).sum(1))


def test_bad_arguments_are_named():
    q, k, v = _rand(1, 3, 2, 4, 8, 8)
    with pytest.raises(ValueError, match="multiple"):
        R.sparse_attention(q, k, v)
    q, k, v = _rand(1, 2, 1, 9, 8, 8)
    with pytest.raises(ValueError, match="last positions"):
        R.sparse_attention(q, k, v)
    q, k, v = _rand(1, 2, 1, 4, 8, 8)
    with pytest.raises(ValueError, match="inv_freq"):
        R.sparse_attention(q, k, v, sink=1, window=2, cap=4)
    with pytest.raises(ValueError, match="window"):
        R.sparse_attention(q, k, v, sink=1, window=8, cap=4, inv_freq=torch.ones(2))
