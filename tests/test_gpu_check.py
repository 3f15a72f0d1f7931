"""benchmarks/gpu_check.py, the one-run GPU proof, smoke-tested on the CPU.

GPU time is scarce, so the script must not rot between GPU sessions: with torch's CUDA events
and transfers replaced by host stand-ins, its timing flow (every kernel variant, both timing
modes) and every table it prints run here on a tiny layer. Nothing is timed or asserted about
speed; the numbers it prints here mean nothing.
"""

from __future__ import annotations

import importlib.util
import pathlib
import time

import pytest

torch = pytest.importorskip("torch")

import numba_dsconv as nd  # noqa: E402
from numba_dsconv import _config, suite  # noqa: E402

TINY = suite.Layer(99, "tiny", 8, 4, 8, 1)


def _load_gpu_check():
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class HostEvent:
    """torch.cuda.Event's timing interface on the host clock."""

    def __init__(self, enable_timing: bool = True) -> None:
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: HostEvent) -> float:
        return (end.t - self.t) * 1e3


def test_timing_flow_and_tables_run_on_the_host(monkeypatch, capsys):
    gc = _load_gpu_check()
    monkeypatch.setattr(torch.cuda, "Event", HostEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "host stand-in")
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(gc, "measure_ceilings", lambda torch: (1e12, 1e11))
    n1 = {"call": 3e-5, "call+sync": 4e-5, "call out=": 2e-5, "bare launch": 1e-5}
    monkeypatch.setattr(gc, "n1_call_times", lambda nd, cuda: n1)
    monkeypatch.setattr(suite, "LAYERS", (TINY,))
    knobs = (_config.CUDA_HALO, _config.CUDA_GEMM_REGISTERS, tuple(_config.CUDA_GEMM_TILE))

    rows = gc.suite_timings(torch, nd, 1, 2, [TINY.number])
    gc.print_table(rows)
    out = capsys.readouterr().out

    assert [r["layer"] for r in rows] == [TINY.number]
    row = rows[0]
    assert list(row["variants_s"]) == [label for label, _ in gc.VARIANTS]
    timed = [v for k, v in row.items() if k.endswith("_s") and isinstance(v, float)]
    assert all(v > 0 for v in timed + list(row["variants_s"].values()))
    for text in ("ours sep us", "back-to-back", "separable variants", "call out= 20.0"):
        assert text in out, text
    # the variants leave the shipped settings as they found them
    assert knobs == (
        _config.CUDA_HALO,
        _config.CUDA_GEMM_REGISTERS,
        tuple(_config.CUDA_GEMM_TILE),
    )
