"""The command line: `demo` and `info` run end to end (bench has its own tests)."""

from __future__ import annotations

import subprocess
import sys

import numba

from numba_dsconv import cli
from numba_dsconv.cpu.backend import threading_layer


def test_demo_runs_and_reports_ok(capsys):
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "(2, 2, 3)" in out and "(2, 2, 2)" in out  # the worked example's shapes
    assert "108 + 24 = 132" in out and "216" in out  # its section 3.3 costs
    assert "OK" in out


def test_info_names_versions_threading_layer_and_devices(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert numba.__version__ in out
    assert threading_layer() in out
    assert "cpu" in out


def test_threading_layer_is_thread_safe_or_guarded():
    # workqueue aborts the process under concurrent launches: the package asks for omp/tbb and,
    # where neither loads, serialises its parallel launches with a lock
    from numba_dsconv import _config

    layer = threading_layer()
    if layer == "workqueue":
        assert _config.call_guard() is _config._WORKQUEUE_LOCK
    else:
        assert layer in ("omp", "tbb")
        assert _config.call_guard() is _config._NULL_GUARD


def test_python_dash_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "numba_dsconv", "info"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "threading layer" in proc.stdout
