"""``python -m longfx ...``: the same command line as the ``longfx`` script (longfx/cli.py)."""
from longfx.cli import main

raise SystemExit(main())
