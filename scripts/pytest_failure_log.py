"""pytest plugin: append each failure to $FAILURE_LOG the moment it is reported.

A run killed at its time limit (the GPU machine's steps are) never prints pytest's end-of-run
summary; this file still names every failure seen so far, with the end of its traceback. Load it
with ``PYTHONPATH=scripts pytest -p pytest_failure_log``; under xdist the controller writes it.
"""
from __future__ import annotations

import os


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get("FAILURE_LOG")
    if not path or not report.failed:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext[-2500:]}\n\n")
