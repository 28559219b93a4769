"""Quantized KV state (KIVI keys per channel / values per token, 8/4/2-bit, full-precision ring
of recent tokens; GEAR's correction as an emulation option): reference.py (plain torch),
triton.py (CUDA quantize-on-append and split-KV decode attention over the packed codes),
op.py (the ``longfx::kv_quant_append`` / ``longfx::kv_quant_attention`` custom ops)."""
