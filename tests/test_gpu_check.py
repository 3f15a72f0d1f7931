"""benchmarks/gpu_check.py, the one-run GPU proof, smoke-tested on the CPU.

GPU time is scarce, so the script must not rot between GPU sessions: with ``--device cpu`` its
flow (the engine's runs with one set of ceilings, every separable variant, the call breakdown,
the tables and the JSON) runs here on a tiny layer. Nothing is timed or asserted about speed;
the numbers it prints here mean nothing.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numba_dsconv.bench as bench
from numba_dsconv import _config
from numba_dsconv.bench import run, suite

TINY = suite.Layer(99, "tiny", 8, 4, 8, 1)


def _load_gpu_check():
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flow_and_tables_run_on_the_host(monkeypatch, capsys, tmp_path):
    gc = _load_gpu_check()
    small = bench.measure_ceilings("cpu", repeat=1, sgemm_n=64, copy_bytes=1 << 16)
    monkeypatch.setattr(bench, "measure_ceilings", lambda device: small)
    monkeypatch.setattr(run, "suite_layer", lambda n: TINY if n == 99 else suite.layer(n))
    knobs = (_config.CUDA_HALO, _config.CUDA_GEMM_REGISTERS, tuple(_config.CUDA_GEMM_TILE))
    out = tmp_path / "gpu_check.json"

    args = ["--device", "cpu", "--layers", "99", "--batch", "1", "--quick", "--json", str(out),
            "--train-batches", "2", "--train-layers", "99", "--train-chain", "2"]  # fmt: skip
    assert gc.main(args) == 0
    text = capsys.readouterr().out

    for line in ("separable, N=1, cpu", "depthwise, N=1, cpu", "separable variants"):
        assert line in text, line
    assert "Python call, N=1, layer 7" in text and "call out=" in text
    # two runs, the variants of layer 99, the dask example (NumPy chunks on the host), and
    # with torch the training step's gradients and saved bytes
    try:
        import torch  # noqa: F401

        assert "checks: 6 passed, 0 failed" in text
        assert "training step, N=2, cpu" in text and "saved for backward" in text
        assert d_train(out)[0]["rows"][0]["layer"] == 99
        # the chain's step, a step of its own: its line and its JSON
        assert "first 2 separable layers in a chain, N=2, cpu" in text
        chain = json.loads(out.read_text())["chain"]
        assert chain["layers"] == 2 and chain["batch"] == 2 and chain["ours_s"] > 0
    except ImportError:
        assert "checks: 6 passed, 0 failed" in text  # the training steps skipped: no torch
    assert "[PASS] dask, numpy chunks, threaded scheduler: equal to the in-memory call" in text
    d = json.loads(out.read_text())
    assert [r["settings"]["op"] for r in d["runs"]] == ["separable", "depthwise"]
    assert all(r["ok"] for r in d["runs"])
    assert d["runs"][0]["ceilings"]["sgemm_n"] == 64  # one set of ceilings for both runs
    variants = d["variants"]["99"]
    assert set(variants) == {"shipped", *(label for label, _ in gc.VARIANTS)}
    assert all(v > 0 for v in variants.values())
    # the variants leave the shipped settings as they found them
    assert knobs == (
        _config.CUDA_HALO,
        _config.CUDA_GEMM_REGISTERS,
        tuple(_config.CUDA_GEMM_TILE),
    )


def d_train(path):
    return json.loads(path.read_text())["train"]
