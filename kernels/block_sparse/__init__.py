"""Dynamic block-sparse attention op: reference.py (block estimation — MInference pooled /
last-q, Quest min-max bounds — table selection and the dense-mask semantics), gather.py (CPU
lowering over the selected blocks), op.py (the ``longfx::block_sparse_attention`` custom op,
its dispatch and dense fallback). CUDA runs the block-table mode of
``kernels/sparse_attention/triton.py``."""
