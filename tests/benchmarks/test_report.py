"""benchmarks/report.py: the markdown table's memory columns say the unit they are computed in."""
from __future__ import annotations

from benchmarks import report


def _rows(saved: int) -> list[dict]:
    t = {"median": 1.0, "q25": 1.0, "q75": 1.0}
    op = {"kind": "op", "op": "rla_update", "pass": "fwd", "shape": "C256xH56", "provider": "cpp", "status": "ok",
          "time_ms": t, "bytes_moved": 3 * 2**20, "saved_for_backward_bytes": saved}
    e2e = {"kind": "e2e", "op": "resnet50", "provider": "eager", "status": "ok", "batch": 4, "image_size": 128,
           "time_ms": t, "saved_for_backward_bytes": saved}
    return [op, e2e]


def test_memory_columns_are_mebibytes():
    """112.7e6 bytes are 107.5 MiB: the column reads 107.5 and its header and legend say MiB (a table read
    as decimal MB once made two runs of one commit look 5% apart)."""
    table = report.markdown({"device_type": "cpu", "copy_bandwidth": {"bytes": 64 * 2**20, "gbps": 1.0}},
                            _rows(112_671_396))
    assert table.count(" 107.5 |") == 2 and "| 3.00 |" in table
    assert "saved MiB |" in table and "MiB moved |" in table and "copy of 64.0 MiB" in table
    assert " MB" not in table  # no decimal-MB label left
