"""``python -m benchmarks``: see ``benchmarks.cli`` or ``python -m benchmarks --help``."""
from benchmarks.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
