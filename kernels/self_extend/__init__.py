"""SelfExtend attention op: reference.py (plain torch, dense), blocked.py (query blocks, the
CPU lowering), triton.py (the fused flash kernel, CUDA), op.py (the
``longfx::self_extend_attention`` custom op, dispatching between them)."""
