"""longfx: compiler passes for long-context inference."""
__version__ = "0.1.0"
