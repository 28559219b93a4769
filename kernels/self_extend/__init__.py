"""SelfExtend attention op: reference.py (plain torch, dense), blocked.py (query blocks, the
CPU lowering), op.py (the ``longfx::self_extend_attention`` custom op)."""
