"""Hand-written models (not Hugging Face) that the analysis must handle, with what it must find.

Each case is a tiny seeded model in a style people actually write: nanoGPT's masked softmax,
a bare ``F.scaled_dot_product_attention`` with its own RoPE, GPT-J's interleaved RoPE on
``bmm``/``baddbmm`` attention, Meta Llama's complex RoPE, and near-misses that look like
attention or RoPE but are not. ``make(name)`` (or ``CASES[name].make()``) returns
``(module.eval(), example_input_ids)``; ``CASES[name]`` also states the expected sites::

    from longfx.rewrite.testing import handmade
    model, ids = handmade.make("gptj_interleaved")
    handmade.CASES["gptj_interleaved"].rope_style      # "interleaved"

``names()`` are the five models (a)-(e); ``variant_names()`` are one-block models that each
spell RoPE another way (HF 4.4x matmul table under autocast, HF 4.36 cached cos/sin buffers,
split halves with a scaled table) or almost-RoPE (swapped tables, wrong sign).

All share: vocabulary 128, width 64, 4 heads of 16 channels, 2 blocks (variants: 1), ids of
shape [2, 11].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, WIDTH, HEADS, HEAD_DIM, BLOCKS = 128, 64, 4, 16, 2
BATCH, SEQ, MAX_SEQ = 2, 11, 32


def _ids(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)


def _inv_freq(dim: int, base: float = 10000.0) -> torch.Tensor:
    # [dim/2]: base^(-2i/dim)
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


class _LM(nn.Module):
    """Embedding -> blocks -> norm -> vocabulary projection; blocks get (x, *extra)."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)

    def extra(self, ids: torch.Tensor) -> tuple:
        return ()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids)
        extra = self.extra(ids)
        for block in self.blocks:
            x = block(x, *extra)
        return self.head(self.norm(x))


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(WIDTH, 2 * WIDTH)
        self.down = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


# (a) nanoGPT ---------------------------------------------------------------------------------

class NanoGPTAttention(nn.Module):
    """karpathy/nanoGPT CausalSelfAttention, the non-flash branch, verbatim in spirit."""

    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(WIDTH, 3 * WIDTH)
        self.c_proj = nn.Linear(WIDTH, WIDTH)
        self.attn_dropout = nn.Dropout(0.0)
        self.resid_dropout = nn.Dropout(0.0)
        self.n_head = HEADS
        self.register_buffer("bias", torch.tril(torch.ones(MAX_SEQ, MAX_SEQ))
                             .view(1, 1, MAX_SEQ, MAX_SEQ))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # [B, H, S, D]
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v                                                         # [B, H, S, D]
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class NanoGPTBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(WIDTH)
        self.attn = NanoGPTAttention()
        self.ln_2 = nn.LayerNorm(WIDTH)
        self.mlp = _MLP()

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(_LM):
    def __init__(self):
        super().__init__([NanoGPTBlock() for _ in range(BLOCKS)])
        self.wpe = nn.Embedding(MAX_SEQ, WIDTH)

    def forward(self, ids):
        pos = torch.arange(0, ids.size(1), dtype=torch.long, device=ids.device)
        x = self.wte(ids) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# (b) SDPA with its own rotate-half RoPE --------------------------------------------------------

class RotaryEmbedding(nn.Module):
    """cos/sin from an ``inv_freq`` buffer; called by every block (the table is recomputed
    per layer, unlike HF which computes it once per model)."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.register_buffer("inv_freq", _inv_freq(dim, base), persistent=False)

    def forward(self, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.arange(seq_len, device=device, dtype=self.inv_freq.dtype)
        freqs = torch.outer(t, self.inv_freq)                              # [S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)                            # [S, D]
        return emb.cos()[None, None], emb.sin()[None, None]                # [1, 1, S, D]


def rotate_half_chunk(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class SdpaRopeBlock(nn.Module):
    def __init__(self, rotary: RotaryEmbedding):
        super().__init__()
        self.rotary = rotary          # shared: one inv_freq buffer for the whole model
        self.ln = nn.LayerNorm(WIDTH)
        self.q = nn.Linear(WIDTH, WIDTH, bias=False)
        self.k = nn.Linear(WIDTH, WIDTH, bias=False)
        self.v = nn.Linear(WIDTH, WIDTH, bias=False)
        self.o = nn.Linear(WIDTH, WIDTH, bias=False)
        self.mlp = _MLP()

    def forward(self, x):
        B, S, _ = x.shape
        h = self.ln(x)
        q = self.q(h).view(B, S, HEADS, HEAD_DIM).transpose(1, 2)           # [B, H, S, D]
        k = self.k(h).view(B, S, HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v(h).view(B, S, HEADS, HEAD_DIM).transpose(1, 2)
        cos, sin = self.rotary(S, x.device)
        q = q * cos + rotate_half_chunk(q) * sin
        k = k * cos + rotate_half_chunk(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)        # [B, H, S, D]
        x = x + self.o(y.transpose(1, 2).reshape(B, S, WIDTH))
        return x + self.mlp(x)


class SdpaRope(_LM):
    def __init__(self):
        rotary = RotaryEmbedding(HEAD_DIM)
        super().__init__([SdpaRopeBlock(rotary) for _ in range(BLOCKS)])


# (c) GPT-J: interleaved partial RoPE, bmm/baddbmm attention ------------------------------------

GPTJ_ROTARY_DIM = HEAD_DIM // 2


def rotate_every_two(x):
    x1 = x[:, :, :, ::2]
    x2 = x[:, :, :, 1::2]
    x = torch.stack((-x2, x1), dim=-1)
    return x.flatten(-2)                                                    # interleave back


def apply_rotary_pos_emb_gptj(x, sin, cos):
    # sin/cos: [B, S, rd/2] -> [B, S, 1, rd] with each frequency repeated for its pair
    sin = torch.repeat_interleave(sin[:, :, None, :], 2, 3)
    cos = torch.repeat_interleave(cos[:, :, None, :], 2, 3)
    return (x * cos) + (rotate_every_two(x) * sin)


class GPTJAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(WIDTH, WIDTH, bias=False)
        self.k_proj = nn.Linear(WIDTH, WIDTH, bias=False)
        self.v_proj = nn.Linear(WIDTH, WIDTH, bias=False)
        self.out_proj = nn.Linear(WIDTH, WIDTH, bias=False)
        self.register_buffer("causal_bias", torch.triu(torch.full((MAX_SEQ, MAX_SEQ),
                                                                  float("-inf")), 1))

    def forward(self, x, sincos):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, HEADS, HEAD_DIM)                      # [B, S, H, D]
        k = self.k_proj(x).view(B, S, HEADS, HEAD_DIM)
        v = self.v_proj(x).view(B, S, HEADS, HEAD_DIM)
        sin, cos = torch.split(sincos, sincos.shape[-1] // 2, dim=-1)       # [B, S, rd/2] each
        rd = GPTJ_ROTARY_DIM
        k_rot, k_pass = k[:, :, :, :rd], k[:, :, :, rd:]
        q_rot, q_pass = q[:, :, :, :rd], q[:, :, :, rd:]
        k = torch.cat([apply_rotary_pos_emb_gptj(k_rot, sin, cos), k_pass], dim=-1)
        q = torch.cat([apply_rotary_pos_emb_gptj(q_rot, sin, cos), q_pass], dim=-1)
        # [B, S, H, D] -> [B*H, S, D]
        q = q.permute(0, 2, 1, 3).reshape(B * HEADS, S, HEAD_DIM)
        k = k.permute(0, 2, 1, 3).reshape(B * HEADS, S, HEAD_DIM)
        v = v.permute(0, 2, 1, 3).reshape(B * HEADS, S, HEAD_DIM)
        bias = self.causal_bias[:S, :S].expand(B * HEADS, S, S)
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), beta=1.0,
                               alpha=1.0 / math.sqrt(HEAD_DIM))             # [B*H, S, S]
        probs = torch.softmax(scores, dim=-1)
        y = torch.bmm(probs, v)                                             # [B*H, S, D]
        y = y.view(B, HEADS, S, HEAD_DIM).permute(0, 2, 1, 3).reshape(B, S, WIDTH)
        return self.out_proj(y)


class GPTJBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(WIDTH)
        self.attn = GPTJAttention()
        self.mlp = _MLP()

    def forward(self, x, sincos):
        h = self.ln_1(x)
        return x + self.attn(h, sincos) + self.mlp(h)                       # parallel block


class GPTJInterleaved(_LM):
    def __init__(self):
        super().__init__([GPTJBlock() for _ in range(BLOCKS)])
        self.register_buffer("inv_freq", _inv_freq(GPTJ_ROTARY_DIM), persistent=False)

    def extra(self, ids):
        B, S = ids.shape
        pos = torch.arange(S, device=ids.device).float()
        sinusoid = torch.einsum("i,j->ij", pos, self.inv_freq)               # [S, rd/2]
        sincos = torch.cat((torch.sin(sinusoid), torch.cos(sinusoid)), dim=1)  # [S, rd]
        return (sincos[None].expand(B, S, GPTJ_ROTARY_DIM),)


# (d) Meta Llama: complex RoPE, GQA by repeat_interleave, where(mask) ------------------------

META_KV_HEADS = 2


def apply_rotary_emb_complex(xq, xk, freqs_cis):
    # xq: [B, S, H, D] -> complex [B, S, H, D/2]; freqs_cis: [S, D/2] -> [1, S, 1, D/2]
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class MetaAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq = nn.Linear(WIDTH, HEADS * HEAD_DIM, bias=False)
        self.wk = nn.Linear(WIDTH, META_KV_HEADS * HEAD_DIM, bias=False)
        self.wv = nn.Linear(WIDTH, META_KV_HEADS * HEAD_DIM, bias=False)
        self.wo = nn.Linear(HEADS * HEAD_DIM, WIDTH, bias=False)

    def forward(self, x, freqs_cis, mask):
        B, S, _ = x.shape
        xq = self.wq(x).view(B, S, HEADS, HEAD_DIM)                          # [B, S, H, D]
        xk = self.wk(x).view(B, S, META_KV_HEADS, HEAD_DIM)                  # [B, S, Hkv, D]
        xv = self.wv(x).view(B, S, META_KV_HEADS, HEAD_DIM)
        xq, xk = apply_rotary_emb_complex(xq, xk, freqs_cis)
        rep = HEADS // META_KV_HEADS
        keys = torch.repeat_interleave(xk, rep, dim=2)                       # [B, S, H, D]
        values = torch.repeat_interleave(xv, rep, dim=2)
        xq, keys, values = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(HEAD_DIM)  # [B, H, S, S]
        scores = torch.where(mask, scores, float("-inf"))
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        y = torch.matmul(scores, values)                                    # [B, H, S, D]
        return self.wo(y.transpose(1, 2).contiguous().view(B, S, -1))


class MetaBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention_norm = nn.LayerNorm(WIDTH)
        self.attention = MetaAttention()
        self.ffn_norm = nn.LayerNorm(WIDTH)
        self.feed_forward = _MLP()

    def forward(self, x, freqs_cis, mask):
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class MetaLlamaComplex(_LM):
    def __init__(self):
        super().__init__([MetaBlock() for _ in range(BLOCKS)])
        self.register_buffer("inv_freq", _inv_freq(HEAD_DIM, 500000.0), persistent=False)

    def extra(self, ids):
        S = ids.shape[1]
        t = torch.arange(S, device=ids.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq).float()                       # [S, D/2]
        freqs_cis = torch.polar(torch.ones_like(freqs), freqs)              # complex64
        mask = torch.ones(S, S, dtype=torch.bool, device=ids.device).tril()  # keep-mask
        return freqs_cis, mask


# (e) near-misses: neither attention nor RoPE ---------------------------------------------------

class SoftmaxWrongAxis(nn.Module):
    """q·kᵀ, softmax over the *query* axis (-2), then ·v: not attention (normalizes columns)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH, bias=False)

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)  # [B,H,S,D]
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(HEAD_DIM), dim=-2)
        return (att @ v).transpose(1, 2).reshape(B, S, WIDTH)


class SoftmaxGatedMLP(nn.Module):
    """A softmax over a linear projection used as a gate: one contraction in, none out."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(WIDTH, WIDTH)
        self.up = nn.Linear(WIDTH, WIDTH)
        self.down = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        return self.down(torch.softmax(self.gate(x), dim=-1) * self.up(x))


class NearMissBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = SoftmaxWrongAxis()
        self.mlp = SoftmaxGatedMLP()

    def forward(self, x):
        x = x + self.mix(x)
        return x + self.mlp(x)


class NearMisses(_LM):
    """Two blocks of near-miss attention/MLP, plus sinusoidal *absolute* positions
    (cos/sin of position x inv_freq, added to the embeddings): a RoPE near-miss, since the
    table is never used to rotate anything."""

    def __init__(self):
        super().__init__([NearMissBlock() for _ in range(BLOCKS)])
        self.register_buffer("inv_freq", _inv_freq(WIDTH), persistent=False)

    def forward(self, ids):
        S = ids.shape[1]
        pos = torch.arange(S, device=ids.device, dtype=torch.float32)
        ang = pos[:, None] * self.inv_freq[None, :]                          # [S, WIDTH/2]
        pe = torch.cat((ang.sin(), ang.cos()), dim=-1)                      # [S, WIDTH]
        x = self.wte(ids) + pe
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# RoPE spelling variants: one SDPA block each ------------------------------------------------

class RopeVariant(nn.Module):
    """One causal SDPA block whose RoPE is written in spelling ``variant``:

    - ``matmul_autocast``: HF 4.4x — ``inv_freq[None, :, None] @ position_ids[:, None, :]``,
      transposed, under ``torch.autocast(enabled=False)``; tables cast to x's dtype;
    - ``cached_gather``: HF 4.36 — cos/sin precomputed into buffers at init, sliced to the
      sequence and gathered by ``position_ids`` (no ``inv_freq`` in the graph);
    - ``split_scaled``: halves by ``torch.split``, ``-x2`` as ``x2 * -1``, tables scaled by 0.5
      (an ``attention_scaling``);
    - ``swapped``: ``x*sin + rotate_half(x)*cos`` — not a rotation (near-miss);
    - ``wrong_sign``: ``cat(x2, -x1)`` — rotation by the wrong sign, not matched (its cos/sin
      table is a near-miss).
    """

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.wte = nn.Embedding(VOCAB, WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH, bias=False)
        self.o = nn.Linear(WIDTH, WIDTH, bias=False)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.register_buffer("inv_freq", _inv_freq(HEAD_DIM), persistent=False)
        if variant == "cached_gather":
            t = torch.arange(MAX_SEQ, dtype=torch.float32)
            emb = torch.cat([torch.outer(t, self.inv_freq)] * 2, dim=-1)   # [MAX_SEQ, D]
            self.register_buffer("cos_cached", emb.cos(), persistent=False)
            self.register_buffer("sin_cached", emb.sin(), persistent=False)

    def tables(self, x, position_ids):
        S = position_ids.shape[-1]
        if self.variant == "cached_gather":
            cos, sin = self.cos_cached[:S].to(x.dtype), self.sin_cached[:S].to(x.dtype)
            return cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)
        if self.variant == "matmul_autocast":
            B = position_ids.shape[0]
            inv = self.inv_freq[None, :, None].float().expand(B, -1, 1)    # [B, D/2, 1]
            pos = position_ids[:, None, :].float()                          # [B, 1, S]
            with torch.autocast(device_type="cpu", enabled=False):
                freqs = (inv.float() @ pos.float()).transpose(1, 2)         # [B, S, D/2]
                emb = torch.cat((freqs, freqs), dim=-1)
                cos, sin = emb.cos(), emb.sin()
            return cos.to(x.dtype).unsqueeze(1), sin.to(x.dtype).unsqueeze(1)
        freqs = position_ids[..., None].float() * self.inv_freq              # [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = 0.5 if self.variant == "split_scaled" else 1.0
        return (emb.cos() * scale).unsqueeze(1), (emb.sin() * scale).unsqueeze(1)

    def rotate(self, x, cos, sin):
        half = HEAD_DIM // 2
        if self.variant == "split_scaled":
            x1, x2 = torch.split(x, half, dim=-1)
            return x * cos + torch.cat((x2 * -1, x1), dim=-1) * sin
        x1, x2 = x[..., :half], x[..., half:]
        if self.variant == "wrong_sign":
            return x * cos + torch.cat((x2, -x1), dim=-1) * sin
        if self.variant == "swapped":
            return x * sin + torch.cat((-x2, x1), dim=-1) * cos
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def forward(self, ids):
        B, S = ids.shape
        x = self.wte(ids)
        position_ids = torch.arange(S, device=ids.device)[None].expand(B, S)
        q, k, v = self.qkv(x).view(B, S, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)  # [B,H,S,D]
        cos, sin = self.tables(x, position_ids)
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(x + self.o(y.transpose(1, 2).reshape(B, S, WIDTH)))


def _variant(name: str) -> Callable[[], nn.Module]:
    return lambda: RopeVariant(name)


# registry --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """A handmade model and the sites the analysis must find in it."""

    name: str
    cls: Callable[[], nn.Module]
    attention_sites: int
    causal: bool | None
    rope_tables: int = 0
    rope_applications: int = 0
    rope_style: str | None = None
    rotary_dim: int | None = None
    head_dim: int = HEAD_DIM
    rope_near_misses: int = 0           # RoPE-looking computations that are not RoPE
    rope_table: str = "computed"        # "computed" from inv_freq, or "input" (a buffer)
    attention_scaling: float = 1.0
    notes: str = ""

    def make(self, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.cls()
        return model.eval(), _ids(seed)


CASES: dict[str, Case] = {c.name: c for c in [
    Case("nanogpt", NanoGPT, attention_sites=2, causal=True,
         notes="(a) manual masked softmax: (q@kᵀ)*scale, masked_fill(tril==0, -inf), "
               "softmax, dropout, @v"),
    Case("sdpa_rope", SdpaRope, attention_sites=2, causal=True, rope_tables=1,
         rope_applications=4, rope_style="rotate_half", rotary_dim=HEAD_DIM,
         notes="(b) F.scaled_dot_product_attention(is_causal=True); rotate-half by chunk; "
               "the cos/sin table is recomputed in each block from one shared inv_freq "
               "buffer (one RopeSite, two cos() nodes)"),
    Case("gptj_interleaved", GPTJInterleaved, attention_sites=2, causal=True,
         rope_tables=1, rope_applications=4, rope_style="interleaved",
         rotary_dim=GPTJ_ROTARY_DIM,
         notes="(c) GPT-J: einsum outer product, cat(sin, cos) table split per layer, "
               "repeat_interleave'd tables, strided slices + stack + flatten, partial "
               "rotary (8 of 16), [B, S, H, D] layout; baddbmm(causal bias, q, kᵀ) + bmm "
               "on [B*H, S, D]"),
    Case("meta_complex", MetaLlamaComplex, attention_sites=2, causal=True, rope_tables=1,
         rope_applications=4, rope_style="complex", rotary_dim=HEAD_DIM,
         notes="(d) Meta Llama: polar(ones, outer(t, inv_freq)) freqs_cis, view_as_complex * "
               "freqs_cis, view_as_real, flatten(3); GQA 4/2 by repeat_interleave; "
               "where(bool keep-mask, scores, -inf)"),
    Case("near_miss", NearMisses, attention_sites=0, causal=None, rope_near_misses=1,
         notes="(e) softmax over the query axis (-2) before @v; a softmax-gated MLP (no "
               "second contraction); sinusoidal absolute positions (cos/sin not applied as "
               "a rotation)"),
    Case("rope_matmul_autocast", _variant("matmul_autocast"), attention_sites=1, causal=True,
         rope_tables=1, rope_applications=2, rope_style="rotate_half", rotary_dim=HEAD_DIM,
         notes="HF 4.4x table: batched inv_freq @ positions matmul under autocast(False)"),
    Case("rope_cached_gather", _variant("cached_gather"), attention_sites=1, causal=True,
         rope_tables=1, rope_applications=2, rope_style="rotate_half", rotary_dim=HEAD_DIM,
         rope_table="input",
         notes="HF 4.36 table: cos/sin buffers precomputed at init, gathered by position_ids"),
    Case("rope_split_scaled", _variant("split_scaled"), attention_sites=1, causal=True,
         rope_tables=1, rope_applications=2, rope_style="rotate_half", rotary_dim=HEAD_DIM,
         attention_scaling=0.5, notes="torch.split halves, x2 * -1, tables scaled by 0.5"),
    Case("rope_swapped", _variant("swapped"), attention_sites=1, causal=True,
         rope_near_misses=2, notes="x*sin + rotate_half(x)*cos: two near-misses (q and k)"),
    Case("rope_wrong_sign", _variant("wrong_sign"), attention_sites=1, causal=True,
         rope_near_misses=1, notes="cat(x2, -x1): not a rotation; the unused table is the "
                                   "near-miss"),
]}


def names() -> list[str]:
    """The five hand-written models (a)-(e)."""
    return [n for n in CASES if not n.startswith("rope_")]


def variant_names() -> list[str]:
    """The one-block RoPE spelling variants (``rope_*``)."""
    return [n for n in CASES if n.startswith("rope_")]


def make(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """``(module.eval(), example ids [2, 11])`` for handmade case ``name``."""
    return CASES[name].make(seed)
