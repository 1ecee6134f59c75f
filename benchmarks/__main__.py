"""``python -m benchmarks``: see ``benchmarks.cli`` or ``python -m benchmarks --help``.

``python -m benchmarks model [...]``: the performance model instead (``benchmarks.perf_model``)."""
import sys

if __name__ == "__main__" and sys.argv[1:2] == ["model"]:
    from benchmarks.perf_model import main as _model_main

    raise SystemExit(_model_main(sys.argv[2:]))

from benchmarks.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
