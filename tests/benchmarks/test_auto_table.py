"""benchmarks.auto_table: a benchmark run becomes the order in which `auto` tries fused backends."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path[:1]:  # see test_cli.py: the real `benchmarks` package must win
    sys.path.insert(0, str(ROOT))

from benchmarks import auto_table  # noqa: E402


def _row(op, shape, provider, ms, pass_="fwd+bwd", status="ok"):
    return {"kind": "op", "op": op, "pass": pass_, "shape": shape, "provider": provider, "status": status,
            "time_ms": {"median": ms} if status == "ok" else None}


RESULTS = {
    "device_type": "cuda", "device_name": "Some GPU", "date": "2026-01-01T00:00:00", "git_commit": "abc",
    "rows": [
        _row("rla_update", "C512xH28", "eager", 1.0),
        _row("rla_update", "C512xH28", "cuda", 0.5),
        _row("rla_update", "C512xH28", "triton", 0.4),
        _row("rla_update", "C2048xH7", "cuda", 0.2),
        _row("rla_update", "C2048xH7", "triton", 0.3),
        _row("rla_update", "C2048xH7", "triton", 0.01, pass_="fwd"),  # forward only: its own entry
        _row("concat_conv_bn_act", "C256xH56", "cuda", 2.0),
        _row("concat_conv_bn_act", "C256xH56", "triton", None, status="error"),  # failed: left out
        {"kind": "e2e", "op": "rla_resnet50", "provider": "cuda", "status": "ok", "time_ms": {"median": 9.0}},
    ],
}


def test_preference_orders_backends_by_fwd_bwd_median():
    assert auto_table.preference_from_results(RESULTS) == {  # one backend in a key orders nothing: left out
        ("cuda", "rla_update", 7, "fwd+bwd"): ("cuda", "triton"),
        ("cuda", "rla_update", 28, "fwd+bwd"): ("triton", "cuda", "torch"),
    }


def test_reference_first_where_eager_was_fastest():
    """A fused path slower than eager is a bug, and `auto` must not take it: where the run's eager row
    beat every fused backend, the reference leads the order."""
    op, shape = "concat_conv_bn_act", "C1024xH14"
    rows = [_row(op, shape, "eager", 0.7), _row(op, shape, "cuda", 1.3), _row(op, shape, "triton", 2.0),
            _row(op, shape, "compile", 0.1)]
    pref = auto_table.preference_from_results(dict(RESULTS, rows=rows))
    assert pref[("cuda", "concat_conv_bn_act", 14, "fwd+bwd")] == ("torch", "cuda", "triton")


def _load(text: str) -> dict:
    namespace: dict = {}
    exec(text, namespace)  # noqa: S102
    return namespace


def test_update_replaces_the_device_and_keeps_the_others(tmp_path):
    text = auto_table.TABLE_PATH.read_text()
    cpu_results = {"device_type": "cpu", "device_name": "CPU", "date": "d0", "git_commit": "c0",
                   "rows": [_row("rla_update", "C512xH28", "cpp", 3.0), _row("rla_update", "C512xH28", "eager", 4.0)]}
    text = auto_table.updated_table(cpu_results, text)
    stale = dict(RESULTS, rows=[_row("rla_update", "C256xH56", "cuda", 1.0)])
    text = auto_table.updated_table(stale, text)
    table = _load(auto_table.updated_table(RESULTS, text))
    assert table["PREFERENCE"] == {("cpu", "rla_update", 28, "fwd+bwd"): ("cpp", "torch"),
                                   **auto_table.preference_from_results(RESULTS)}
    assert table["SOURCES"]["cuda"] == {"device": "Some GPU", "date": "2026-01-01T00:00:00", "commit": "abc"}
    assert table["SOURCES"]["cpu"]["commit"] == "c0"
    assert table["size_class"](28, 28) == 28  # the module's code is kept around the generated part


def test_cli_writes_the_table_module(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(RESULTS))
    out = tmp_path / "_auto_table.py"
    assert auto_table.main([str(results), "--out", str(out)]) == 0
    assert _load(out.read_text())["PREFERENCE"][("cuda", "rla_update", 28, "fwd+bwd")] == ("triton", "cuda", "torch")
    assert auto_table.TABLE_PATH.read_text() != out.read_text()  # the package's table is left alone


def test_compiled_rows_make_their_own_entries():
    """Under torch.compile the choice is between the opaque fused op and the reference, which
    Inductor decomposes and fuses: the compile / compile+<backend> rows decide it, apart from eager."""
    op, shape = "rla_update", "C2048xH7"
    rows = [_row(op, shape, "eager", 1.0), _row(op, shape, "cpp", 0.9), _row(op, shape, "compile", 0.8),
            _row(op, shape, "compile+cpp", 1.1)]
    pref = auto_table.preference_from_results(dict(RESULTS, device_type="cpu", rows=rows))
    assert pref == {("cpu", op, 7, "fwd+bwd"): ("cpp", "torch"), ("cpu", op, 7, "compiled fwd+bwd"): ("torch", "cpp")}


def test_reference_needs_a_margin_to_lead():
    """Within REFERENCE_MARGIN a single run cannot tell eager from fused, and the fused op saves
    memory, so it keeps the lead; beyond the margin the reference leads."""
    op, shape = "rla_update", "C512xH28"
    near = [_row(op, shape, "eager", 0.99), _row(op, shape, "cpp", 1.0)]
    far = [_row(op, shape, "eager", 0.9), _row(op, shape, "cpp", 1.0)]
    key = ("cpu", op, 28, "fwd+bwd")
    assert auto_table.preference_from_results(dict(RESULTS, device_type="cpu", rows=near))[key] == ("cpp", "torch")
    assert auto_table.preference_from_results(dict(RESULTS, device_type="cpu", rows=far))[key] == ("torch", "cpp")


def test_basic_block_entry_gets_entries_and_auto_steps_aside(monkeypatch):
    """concat_conv3x3_bn_act's rows (CIFAR basic-block shapes) make entries of its own, keyed by the
    input's size class; once the table has them, `auto` stops forcing the reference for that op."""
    from rla_ext import _auto_table, _backend

    op = "concat_conv3x3_bn_act"
    rows = [_row(op, "C16xH32", "eager", 1.0), _row(op, "C16xH32", "cpp", 0.5),
            _row(op, "C64xH8", "eager", 0.2), _row(op, "C64xH8", "cpp", 0.4),
            _row(op, "C64xH8", "cpp", 0.1, pass_="fwd"), _row(op, "C64xH8", "eager", 0.3, pass_="fwd"),
            _row(op, "C2048xH7", "cpp", 0.01)]  # not one of this op's shapes: left out
    results = dict(RESULTS, device_type="cpu", rows=rows)
    pref = auto_table.preference_from_results(results)
    assert pref == {("cpu", op, 28, "fwd+bwd"): ("cpp", "torch"), ("cpu", op, 7, "fwd+bwd"): ("torch", "cpp"),
                    ("cpu", op, 7, "fwd"): ("cpp", "torch")}

    table = _load(auto_table.updated_table(results, auto_table.TABLE_PATH.read_text()))
    assert {k: v for k, v in table["PREFERENCE"].items() if k[1] == op} == pref
    monkeypatch.setattr(_auto_table, "PREFERENCE", {})
    assert _backend.auto_candidates("cpu", op, (32, 32), "fwd+bwd")[0] == "torch"  # no entries: the reference
    monkeypatch.setattr(_auto_table, "PREFERENCE", table["PREFERENCE"])
    assert _backend.auto_candidates("cpu", op, (32, 32), "fwd+bwd") == ["cpp", "torch"]
    assert _backend.auto_candidates("cpu", op, (8, 8), "fwd+bwd") == ["torch", "cpp"]
    assert _backend.auto_candidates("cpu", op, (16, 16), "fwd+bwd") == ["torch", "cpp"]  # no entry: reference


def test_shapes_sharing_a_size_class_are_summed():
    """A stride-2 entry is keyed by its input size, like the stride-1 entry there: one order per key,
    from the sum of each backend's medians over the shapes all of them measured."""
    op = "concat_conv3x3_bn_act"
    rows = [_row(op, "C16xH32", "eager", 1.0), _row(op, "C16xH32", "cpp", 0.8),
            _row(op, "C16xH32s2", "eager", 1.0), _row(op, "C16xH32s2", "cpp", 1.5),
            _row(op, "C32xH16s2", "cpp", 0.3), _row(op, "C32xH16", "eager", 0.5), _row(op, "C32xH16", "cpp", 0.4)]
    pref = auto_table.preference_from_results(dict(RESULTS, device_type="cpu", rows=rows))
    # 28: eager 2.0 (x 1.03) vs cpp 2.3. 14: only C32xH16 was measured by both.
    assert pref == {("cpu", op, 28, "fwd+bwd"): ("torch", "cpp"), ("cpu", op, 14, "fwd+bwd"): ("cpp", "torch")}
