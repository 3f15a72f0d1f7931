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
    assert _config.launch_lock() is (_config._WORKQUEUE_LOCK if layer == "workqueue" else None)


def test_thread_count_is_numbas_per_thread_count():
    # read straight from the running pool (cpu.backend's launches key on it): each thread's own
    # count, as numba.get_num_threads gives it, before and after set_num_threads
    import threading

    import numba

    from numba_dsconv import _config

    threading_layer()  # the pool runs
    assert _config.thread_count() == numba.get_num_threads()
    seen = {}

    def one_thread() -> None:
        numba.set_num_threads(1)
        seen["other"] = (_config.thread_count(), numba.get_num_threads())

    t = threading.Thread(target=one_thread)
    t.start()
    t.join()
    assert seen["other"] == (1, 1)
    assert _config.thread_count() == numba.get_num_threads()  # (this thread: unchanged)


def test_python_dash_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "numba_dsconv", "info"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "threading layer" in proc.stdout
