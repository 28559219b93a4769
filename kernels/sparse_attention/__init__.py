"""Sparse attention op: reference.py (plain torch, dense mask), blocked.py (CPU lowering that
reads only the kept keys), triton.py (CUDA block-sparse flash attention), op.py (the
``longfx::sparse_attention`` custom op and its dispatch)."""
