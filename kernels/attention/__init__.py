"""Attention op: reference.py (plain torch), op.py (the longfx::attention custom op)."""
