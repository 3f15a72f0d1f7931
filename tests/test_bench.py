"""The benchmark engine and `numba-dsconv bench`: end to end on a tiny layer, JSON fields,
roofline arithmetic. No timing assertions: this machine's clock says nothing reliable."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest

from numba_dsconv import bench, cli
from numba_dsconv.bench import cases, machine, report, run, suite
from numba_dsconv.cpu import peak

TINY = suite.Layer(99, "tiny", 8, 4, 8, 1)
TINY_S2 = suite.Layer(98, "tiny", 9, 4, 8, 2)


@pytest.fixture
def small_ceilings(monkeypatch):
    """Measure the ceilings on small arrays (a 128^3 SGEMM, a 1 MiB copy): fast, same code."""
    small = functools.partial(bench.measure_ceilings, repeat=2, sgemm_n=128, copy_bytes=1 << 20)
    monkeypatch.setattr(run, "measure_ceilings", small)
    return small


@pytest.fixture
def tiny_layers(monkeypatch):
    """Let `--layers 99,98` name the tiny layers on the command line."""
    real = run.suite_layer
    extra = {TINY.number: TINY, TINY_S2.number: TINY_S2}
    monkeypatch.setattr(run, "suite_layer", lambda n: extra.get(n) or real(n))


SIDE_FIELDS = {
    "name",
    "median_s",
    "samples_s",
    "number",
    "gflops",
    "gbs",
    "pct_roofline",
    "pct_fma_peak",
    "error_rel",
    "ok",
}
LAYER_FIELDS = {
    "layer",
    "name",
    "hw",
    "c_in",
    "c_out",
    "stride",
    "op",
    "batch",
    "device",
    "flops",
    "nbytes",
    "intensity",
    "floor_s",
    "ours",
    "anchors",
    "speedup",
    "ok",
}
MACHINE_FIELDS = {
    "date",
    "cpu",
    "cores",
    "cores_available",
    "load_average",
    "numba_threads",
    "threading_layer",
    "blas",
    "platform",
    "versions",
    "commit",
    "config",
    "gpus",
}
VERSION_FIELDS = {"python", "numpy", "numba", "llvmlite", "torch", "numba_dsconv"}
CEILING_FIELDS = {
    "device",
    "sgemm_gflops",
    "copy_gbs",
    "sgemm_n",
    "copy_bytes",
    "sgemm_samples_s",
    "copy_samples_s",
    "sgemm_source",
    "copy_source",
    "fma_gflops",
    "fma_source",
    "block_gflops",
    "block_source",
    "ridge_flop_per_byte",
    "compute_gflops",
}
SETTINGS_FIELDS = {
    "device",
    "batch",
    "op",
    "layers",
    "repeat",
    "min_sample_s",
    "threads",
    "dtype",
    "rtol",
    "bias",
    "activation",
}


def _check_side(side: dict, repeat: int) -> None:
    assert set(side) == SIDE_FIELDS
    assert len(side["samples_s"]) == repeat
    assert all(s > 0 for s in side["samples_s"])
    assert side["median_s"] > 0 and side["number"] >= 1
    assert side["gflops"] > 0 and side["gbs"] > 0 and side["pct_roofline"] > 0
    assert side["pct_fma_peak"] > 0
    assert side["error_rel"] < bench.RTOL_FLOAT32 and side["ok"] is True


def _check_json(d: dict, *, op: str, layers: list[int], repeat: int, anchors: list[str]) -> None:
    assert set(d) == {"machine", "ceilings", "settings", "anchors", "anchor_note", "layers", "ok"}
    assert MACHINE_FIELDS <= set(d["machine"])
    assert set(d["machine"]["versions"]) == VERSION_FIELDS
    assert d["machine"]["numba_threads"] >= 1
    assert set(d["ceilings"]) == CEILING_FIELDS
    assert d["ceilings"]["sgemm_gflops"] > 0 and d["ceilings"]["copy_gbs"] > 0
    assert d["ceilings"]["fma_gflops"] > 0 and d["ceilings"]["block_gflops"] > 0
    assert set(d["settings"]) == SETTINGS_FIELDS
    assert d["settings"]["op"] == op and d["settings"]["layers"] == layers
    assert d["anchors"] == anchors
    assert d["ok"] is True
    assert [row["layer"] for row in d["layers"]] == layers
    for row in d["layers"]:
        assert set(row) == LAYER_FIELDS
        assert row["op"] == op
        _check_side(row["ours"], repeat)
        assert set(row["anchors"]) == set(anchors) == set(row["speedup"])
        for side in row["anchors"].values():
            _check_side(side, repeat)
        assert all(v > 0 for v in row["speedup"].values())
        lay = {TINY.number: TINY, TINY_S2.number: TINY_S2}[row["layer"]]
        w = bench.work(lay, op, row["batch"])
        assert (row["flops"], row["nbytes"]) == (w.flops, w.nbytes)
        c = d["ceilings"]
        # the roofline's compute ceiling: the FMA peak where measured (the CPU), else SGEMM
        fma = c["fma_gflops"]
        compute = fma if math.isfinite(fma) and fma > 0 else c["sgemm_gflops"]
        assert c["compute_gflops"] == pytest.approx(compute)
        floor = bench.roofline_floor(row["flops"], row["nbytes"], compute, c["copy_gbs"])
        assert row["floor_s"] == pytest.approx(floor)
        assert row["ours"]["pct_roofline"] == pytest.approx(
            100 * row["floor_s"] / row["ours"]["median_s"]
        )


# --------------------------------------------------------------------------------------------
# roofline arithmetic


def test_roofline_floor_takes_the_slower_ceiling():
    # 2 GFLOP at 100 GFLOP/s = 20 ms; 1 GB at 10 GB/s = 100 ms -> memory-bound, 100 ms.
    assert bench.roofline_floor(2e9, 1e9, 100.0, 10.0) == pytest.approx(0.1)
    # 2 GFLOP at 10 GFLOP/s = 200 ms -> compute-bound.
    assert bench.roofline_floor(2e9, 1e9, 10.0, 10.0) == pytest.approx(0.2)
    # An unknown SGEMM ceiling (GPU without torch) leaves the bandwidth term.
    assert bench.roofline_floor(2e9, 1e9, math.nan, 10.0) == pytest.approx(0.1)


def test_roofline_computes_at_the_fma_peak_where_measured():
    from numba_dsconv.bench.machine import Ceilings

    def ceilings(fma: float) -> Ceilings:
        return Ceilings("cpu", 250.0, 40.0, 1, 1, (), (), "", "", fma_gflops=fma)

    # measured: the roof is the FMA peak (a tuned GEMM runs above numpy's SGEMM), SGEMM below
    c = ceilings(500.0)
    assert (c.compute_gflops, c.compute_name, c.ridge) == (500.0, "FMA peak", 12.5)
    # unmeasured (the GPU): the SGEMM rate
    c = ceilings(math.nan)
    assert (c.compute_gflops, c.compute_name, c.ridge) == (250.0, "SGEMM", 6.25)


def test_work_counts_layer_1_by_hand():
    lay = suite.layer(1)  # 112x112x32 -> 64, stride 1, K=3, padding 1
    pix = 112 * 112
    sep = bench.work(lay, "separable", 1)
    assert sep.flops == 2 * pix * (9 * 32 + 32 * 64)
    # x + dw + pw + output, float32; the intermediate is not counted.
    assert sep.nbytes == 4 * (pix * 32 + 9 * 32 + 32 * 64 + pix * 64)
    dw = bench.work(lay, "depthwise", 1)
    assert dw.flops == 2 * pix * 9 * 32
    assert dw.nbytes == 4 * (pix * 32 + 9 * 32 + pix * 32)
    conv = bench.work(lay, "conv2d", 2)
    assert conv.flops == 2 * 2 * pix * 9 * 32 * 64
    assert conv.nbytes == 4 * (2 * pix * 32 + 9 * 32 * 64 + 2 * pix * 64)
    assert sep.intensity == pytest.approx(sep.flops / sep.nbytes)


def test_work_pointwise_is_the_stage_after_a_strided_depthwise():
    lay = suite.layer(2)  # 112x112x64 -> 128, stride 2: the pointwise sees 56x56x64
    pw = bench.work(lay, "pointwise", 1)
    assert pw.x_shape == (1, 56, 56, 64) and pw.out_shape == (1, 56, 56, 128)
    assert pw.flops == 2 * 56 * 56 * 64 * 128
    assert pw.nbytes == 4 * (56 * 56 * 64 + 64 * 128 + 56 * 56 * 128)


def test_percent_of_roofline_is_floor_over_time():
    w = bench.work(TINY, "separable", 1)
    floor = bench.roofline_floor(w.flops, w.nbytes, 100.0, 10.0)
    side = report.side("x", [2 * floor, 4 * floor, 3 * floor], 1, w, floor, 0.0, 50.0)
    assert side.median_s == pytest.approx(3 * floor)
    assert side.pct_roofline == pytest.approx(100 / 3)
    assert side.gflops == pytest.approx(w.flops / (3 * floor) / 1e9)
    assert side.pct_fma_peak == pytest.approx(2 * side.gflops)


def test_fma_peak_counts_its_flops():
    # the rate is finite, and the loop computes what it counts: each chain's x -> m x + a
    rate, samples = peak.fma_peak_gflops(1, seconds=0.01, repeat=3)
    assert math.isfinite(rate) and rate > 0 and len(samples) == 3
    lanes = peak.VEC_BYTES // 4
    seed = np.array([[0.5] * lanes, [1.0] * lanes, [0.0] * lanes], np.float32)
    out = np.empty((1, lanes), np.float32)
    peak.FMA(seed, out, 3)  # x -> 0.5 x + 1 three times from 0: 1.75 per chain
    np.testing.assert_allclose(out, 1.75 * peak.FMA_CHAINS)


def test_block_peak_runs_the_gemm_micro_kernel():
    # the rate is finite, and every task's block holds a @ panel (float64 reference), however
    # many rounds recomputed it
    rate, samples = peak.block_peak_gflops(1, seconds=0.01, repeat=3)
    assert math.isfinite(rate) and rate > 0 and len(samples) == 3
    a, panel = peak.block_operands(np.random.default_rng(0), np.dtype(np.float32), depth=40)
    want = a.astype(np.float64) @ panel.astype(np.float64)
    for rounds in (1, 3):
        out = np.full((2, peak.BLOCK_ROWS, panel.shape[1]), np.nan, np.float32)
        peak.BLOCK(a, panel, out, rounds)
        for t in range(2):
            np.testing.assert_allclose(out[t], want, rtol=1e-5, atol=1e-5)


def test_parse_layers():
    assert [lay.number for lay in bench.parse_layers("1,3,7")] == [1, 3, 7]
    assert [lay.number for lay in bench.parse_layers("1-3, 11")] == [1, 2, 3, 11]
    assert len(bench.parse_layers(None)) == len(suite.LAYERS)
    assert bench.parse_layers([TINY]) == [TINY]
    for bad in ("12", "0", "0-3", "11-12"):
        with pytest.raises(ValueError, match="layer must be 1..11"):
            bench.parse_layers(bad)
    for bad in ("3-2", "1-999999999999", "5-100"):  # refused before expanding
        with pytest.raises(ValueError, match="is not a range of suite layers"):
            bench.parse_layers(bad)
    with pytest.raises(ValueError, match="layers must look like"):
        bench.parse_layers("one")


# --------------------------------------------------------------------------------------------
# end to end


@pytest.mark.parametrize("op", bench.OPS)
def test_run_bench_on_tiny_layers(op, small_ceilings):
    seen = []
    result = bench.run_bench(
        "cpu",
        1,
        [TINY, TINY_S2],
        op,
        repeat=2,
        ceilings=small_ceilings("cpu"),
        min_sample_s=0.0,
        progress=lambda *a: seen.append(a),
    )
    assert result.ok
    phases = {p for p, *_ in seen}
    assert {"compile", "measure"} <= phases
    assert seen[-1][2:] == (seen[-1][3], seen[-1][3])  # finished
    d = json.loads(json.dumps(result.to_dict()))
    _check_json(d, op=op, layers=[99, 98], repeat=2, anchors=result.anchors)


def test_run_bench_without_torch(monkeypatch, small_ceilings):
    monkeypatch.setattr(machine, "torch_module", lambda: None)
    monkeypatch.setattr(run, "torch_module", lambda: None)
    monkeypatch.setattr(cases, "torch_module", lambda: None)
    result = bench.run_bench("cpu", 2, [TINY], "separable", 2, ceilings=small_ceilings("cpu"))
    assert result.anchors == [] and result.anchor_note == "torch not installed"
    assert result.layers[0].anchors == {} and result.layers[0].speedup == {}
    assert result.layers[0].batch == 2


def test_anchors_are_timed_when_torch_is_installed(small_ceilings):
    pytest.importorskip("torch")
    result = bench.run_bench("cpu", 1, [TINY], "separable", 2, ceilings=small_ceilings("cpu"))
    assert result.anchors == ["torch_channels_last", "torch_nchw"]
    assert set(result.layers[0].speedup) == set(result.anchors)


def test_the_nchw_anchor_is_timed_alone(monkeypatch, small_ceilings):
    """torch's NCHW anchor is sampled in a group of its own, after ours and torch
    channels_last sampled interleaved (its fresh memory per call disturbed its neighbours)."""
    pytest.importorskip("torch")
    import numba_dsconv.bench.run as run

    groups = []
    real = run.time_interleaved

    def spy(fns, repeat, **kw):
        groups.append(list(fns))
        return real(fns, repeat, **kw)

    monkeypatch.setattr(run, "time_interleaved", spy)
    result = bench.run_bench("cpu", 1, [TINY], "separable", 2, ceilings=small_ceilings("cpu"))
    assert groups == [["numba_dsconv", "torch_channels_last"], ["torch_nchw"]]
    assert len(result.layers[0].anchors["torch_nchw"].samples_s) == 2


def test_a_wrong_result_is_flagged(monkeypatch, small_ceilings):
    real = bench.Case.numba_fn

    def broken(self):
        fn, sync = real(self)
        return (lambda: fn() * 1.01), sync

    monkeypatch.setattr(bench.Case, "numba_fn", broken)
    result = bench.run_bench("cpu", 1, [TINY], "depthwise", 2, ceilings=small_ceilings("cpu"))
    assert not result.ok
    assert result.layers[0].ours.error_rel == pytest.approx(0.01, rel=1e-3)


def test_cuda_without_gpu_raises_not_implemented():
    if bench.gpu_available():
        pytest.skip("a GPU (or the CUDA simulator) is available here")
    with pytest.raises(NotImplementedError, match="no usable CUDA GPU"):
        bench.Case(TINY, "separable", 1, "cuda")
    with pytest.raises(NotImplementedError, match="no usable CUDA GPU"):
        bench.run_bench("cuda", 1, [TINY])


def test_bad_arguments():
    with pytest.raises(ValueError, match="op must be one of"):
        bench.run_bench("cpu", 1, [TINY], "dense")
    with pytest.raises(ValueError, match="device must be one of"):
        bench.run_bench("tpu", 1, [TINY])
    with pytest.raises(ValueError, match="batch must be >= 1"):
        bench.run_bench("cpu", 0, [TINY])


def test_cli_bench_writes_json_and_plot(tmp_path, small_ceilings, tiny_layers, capsys):
    out = tmp_path / "bench.json"
    png = tmp_path / "roofline.png"
    argv = ["bench", "--layers", "99,98", "--op", "separable", "--repeat", "2"]
    argv += ["--json", str(out)]
    try:
        import matplotlib  # noqa: F401

        argv += ["--plot", str(png)]
        plot = True
    except ImportError:
        plot = False
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "ceilings: SGEMM" in text and "% roof" in text
    d = json.loads(out.read_text())
    _check_json(d, op="separable", layers=[99, 98], repeat=2, anchors=d["anchors"])
    if plot:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bench_without_torch_says_so(monkeypatch, tmp_path, small_ceilings, tiny_layers):
    monkeypatch.setattr(machine, "torch_module", lambda: None)
    monkeypatch.setattr(run, "torch_module", lambda: None)
    monkeypatch.setattr(cases, "torch_module", lambda: None)
    out = tmp_path / "b.json"
    assert cli.main(["bench", "--layers", "99", "--repeat", "1", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["anchors"] == [] and d["anchor_note"] == "torch not installed"
    assert d["machine"]["versions"]["torch"] is None


def test_cli_bench_rejects_bad_layers(capsys):
    assert cli.main(["bench", "--layers", "0"]) == 2
    assert "layer must be 1..11" in capsys.readouterr().err


def test_plot_needs_matplotlib_with_a_clear_message(monkeypatch, tmp_path, small_ceilings):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    result = bench.run_bench("cpu", 1, [TINY], "pointwise", 1, ceilings=small_ceilings("cpu"))
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match=r"numba-dsconv\[bench\]"):
        bench.plot_roofline(result, tmp_path / "r.png")


def test_cli_errors_print_brackets_literally(monkeypatch, capsys):
    """An error message with brackets (an extra's name) is not eaten as rich markup."""
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert cli.main(["bench", "--layers", "9", "--plot", "r.png"]) == 2
    assert "pip install 'numba-dsconv[bench]'" in capsys.readouterr().err


def test_python_share_times_the_call_against_its_kernel(tiny_layers, capsys, monkeypatch):
    import time

    from numba_dsconv import api
    from numba_dsconv.cpu import backend

    rows = bench.python_share([TINY, TINY_S2], "separable", 1, repeat=2)
    assert [r.layer for r in rows] == [TINY, TINY_S2]
    for r in rows:
        assert r.call_s > 0 and r.kernel_s > 0 and 0 < r.python_s < r.call_s
        assert r.cells()[:2] == [str(r.layer.number), r.layer.name]
    # 3 ms more Python per call count as the library's, 3 ms more in the kernel as the kernel's
    real_key, kernel = api._fast_key, backend.KERNELS["separable"]

    def slow(fn):
        return lambda *a: (time.sleep(0.003), fn(*a))[1]

    monkeypatch.setattr(api, "_fast_key", slow(real_key))
    (py,) = bench.python_share([TINY], "separable", 1, repeat=1)
    assert py.python_s >= 0.003 and py.kernel_s < 0.003, py
    monkeypatch.setattr(api, "_fast_key", real_key)
    patched = kernel._replace(parallel=slow(kernel.parallel), serial=slow(kernel.serial))
    monkeypatch.setitem(backend.KERNELS, "separable", patched)
    (kern,) = bench.python_share([TINY], "separable", 1, repeat=1)
    assert kern.kernel_s >= 0.003 and kern.python_s < 0.003, kern
    assert backend.KERNELS["separable"] is patched  # the table as it was, no timed wrapper
    assert not api._FAST  # nor a remembered launch holding one
    with pytest.raises(ValueError, match="bare_launch times the CUDA kernel launch"):
        bench.Case(TINY, "separable", 1).bare_launch()
    assert cli.main(["bench", "--python-share", "--layers", "99", "--repeat", "2"]) == 0
    text = capsys.readouterr().out
    assert "python" in text and "99:tiny" in text
    assert cli.main(["bench", "--python-share", "--device", "cuda", "--layers", "99"]) == 2
    for op in bench.OPS:  # every op (depthwise: nothing to pack)
        rows = bench.python_share([TINY], op, 1, repeat=1)
        assert rows[0].call_s > 0 and rows[0].kernel_s > 0, op
    assert cli.main(["bench", "--python-share", "--op", "depthwise", "--layers", "99",
                     "--repeat", "1"]) == 0  # fmt: skip


def test_cli_bench_cuda_without_gpu_is_a_clean_error(capsys):
    if bench.gpu_available():
        pytest.skip("a GPU (or the CUDA simulator) is available here")
    assert cli.main(["bench", "--device", "cuda", "--layers", "9"]) == 2
    assert "no usable CUDA GPU" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# peers (bench/peers.py): each runtime in its own worker process


def test_peers_worker_checks_and_times_ours():
    from numba_dsconv.bench import peers

    for ours in (peers.OURS, peers.OURS_PACKED):
        med, err = peers.worker(ours, 1, [9], 1, 3)["9"]
        assert med > 0 and err < bench.RTOL_FLOAT32


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime", "openvino", "litert"])
def test_peers_workers_agree_with_float64(runtime):
    from numba_dsconv.bench import peers

    if runtime not in peers.available():
        pytest.skip(f"{runtime} not installed (the peers extra)")
    med, err = peers.worker(runtime, 1, [9], 1, 2)["9"]
    assert med > 0 and err < bench.RTOL_FLOAT32


def test_litert_is_checked_against_its_own_padding():
    # LiteRT's model pads as TensorFlow's 'same' (bench/peers.py): at stride 2 (layer 9) the
    # same shape and work as the other runtimes' padding 1, other values, so its output has a
    # reference of its own (and the same one at stride 1)
    from numba_dsconv.bench import peers

    for number, differs in ((9, True), (10, False)):
        lay = suite.layer(number)
        args = peers._arrays(lay, "separable", 1)
        same = peers._reference(lay, "separable", *args, padding=peers.LITERT_PADDING)
        ref = peers._reference(lay, "separable", *args)
        assert same.shape == ref.shape
        assert np.allclose(same, ref) is not differs


@pytest.mark.parametrize(
    "runtime", ["numba_dsconv", "numba_dsconv+pack", "torch", "onnxruntime", "openvino", "litert"]
)
def test_peers_time_conv2d_against_float64(runtime):
    from numba_dsconv.bench import peers

    if runtime not in peers.available():
        pytest.skip(f"{runtime} not installed (the peers extra)")
    med, err = peers.worker(runtime, 1, [9], 1, 2, op="conv2d")["9"]
    assert med > 0 and err < bench.RTOL_FLOAT32
    # the reference is the conv2d one: the separable layer's result is another array
    lay = suite.layer(9)
    x, weights = peers._arrays(lay, "conv2d", 1)
    ref = peers._reference(lay, "conv2d", x, weights)
    sep = peers._reference(lay, "separable", *peers._arrays(lay, "separable", 1))
    assert ref.shape == (1, 14, 14, 64) and not np.allclose(ref, sep)


def test_peers_command_times_conv2d_and_names_its_ops(tmp_path, capsys):
    from numba_dsconv.bench import peers

    out = tmp_path / "peers.json"
    argv = ["bench", "--peers", "--op", "conv2d", "--layers", "9", "--rounds", "1",
            "--repeat", "1", "--no-torch", "--json", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    d = json.loads(out.read_text())
    assert d["op"] == "conv2d" and d["fma_peak_gflops"] > 0
    timed = d["seconds_and_error"]
    assert {peers.OURS, peers.OURS_PACKED} <= set(timed) and "torch" not in timed
    for runtime, rows in timed.items():
        med, err = rows["9"]
        assert med > 0 and err < bench.RTOL_FLOAT32, runtime
    assert "conv2d, N=1" in capsys.readouterr().out
    assert cli.main(["bench", "--peers", "--op", "depthwise", "--layers", "9"]) == 2
    assert "--peers times separable or conv2d" in capsys.readouterr().err


def test_peers_take_only_their_ops():
    from numba_dsconv.bench import peers

    with pytest.raises(ValueError, match="op must be one of"):
        peers.worker(peers.OURS, 1, [9], 1, 2, op="depthwise")


def test_peers_rounds_alternate_processes_and_keep_the_best():
    from numba_dsconv.bench import peers

    best = peers.run_peers(1, [9], [peers.OURS], 1, rounds=2, repeat=2)
    med, err = best[peers.OURS][9]
    assert med > 0 and err < bench.RTOL_FLOAT32
    rows = peers.table({"numba_dsconv": {9: (2e-6, 0.0)}, "x": {9: (4e-6, 0.0)}}, [9])
    assert rows == [["9", "2", "4", "0.50"]]
    both = {"numba_dsconv": {9: (2e-6, 0.0)}, "numba_dsconv+pack": {9: (1e-6, 0.0)},
            "x": {9: (4e-6, 0.0)}, "y": {9: (8e-6, 0.0)}}  # fmt: skip
    assert peers.table(both, [9]) == [["9", "2", "1", "4", "8", "0.50", "0.25"]]
    assert peers.ratio_columns(list(both)) == ["vs fastest", "packed vs fastest"]
    assert peers.ratio_columns(["numba_dsconv", "numba_dsconv+pack"]) == []
    assert peers.geomean([0.5, 2.0]) == pytest.approx(1.0)


def test_peers_table_gives_our_share_of_the_fma_peak():
    # the % FMA column: ours (packed where timed so) GFLOP/s on the op over the peak given
    from numba_dsconv.bench import peers

    flops = {op: bench.work(suite.layer(9), op, 8).flops for op in ("separable", "conv2d")}
    both = {"numba_dsconv": {9: (flops["separable"] / 100e9, 0.0)},
            "numba_dsconv+pack": {9: (flops["separable"] / 200e9, 0.0)},
            "x": {9: (1.0, 0.0)}}  # fmt: skip
    rows = peers.table(both, [9], batch=8, fma_gflops=400.0)
    assert rows[0][-1] == "50%"  # the packed run: 200 of 400 GFLOP/s
    assert peers.fma_columns(list(both), 400.0) == ["% FMA packed"]
    plain = {k: v for k, v in both.items() if k != "numba_dsconv+pack"}
    assert peers.table(plain, [9], batch=8, fma_gflops=400.0)[0][-1] == "25%"
    assert peers.fma_columns(list(plain), 400.0) == ["% FMA"]
    conv = {"numba_dsconv": {9: (flops["conv2d"] / 300e9, 0.0)}}
    assert peers.table(conv, [9], op="conv2d", batch=8, fma_gflops=400.0)[0][-1] == "75%"
    assert peers.fma_columns(list(both), float("nan")) == []
    assert peers.table(both, [9], batch=8) == [rows[0][:-1]]  # no peak: no column


# --------------------------------------------------------------------------------------------
# the training step (bench/train.py): on the CPU each side in its own processes, alternating


def test_train_bench_times_each_side_in_its_own_processes(monkeypatch):
    pytest.importorskip("torch")
    from numba_dsconv.bench import timing, train

    calls = []
    real = timing.subprocess.run

    def spy(cmd, **kwargs):
        calls.append(cmd[cmd.index("-m") + 1 : cmd.index("-m") + 3])
        return real(cmd, **kwargs)

    monkeypatch.setattr(timing.subprocess, "run", spy)
    # not a suite layer; and a chain of MobileNetV1's first layer
    result = train.run_train_bench("cpu", 1, [TINY], repeat=2, rounds=2, chain=1)
    # two rounds, each side once per round, in that order
    worker = "numba_dsconv.bench.train"
    assert calls == [[worker, "ours"], [worker, "torch"]] * 2
    (row,) = result.rows
    assert set(row.samples) == {"ours", "torch"}
    assert all(len(v) == 2 and min(v) > 0 for v in row.samples.values())
    # each side's time is the best of its rounds' medians
    assert row.ours_s == min(row.samples["ours"]) and row.torch_s == min(row.samples["torch"])
    assert row.ratio == pytest.approx(row.ours_s / row.torch_s)
    assert row.grad_error < 1e-4  # float32 gradients against torch's
    # the chain's step timed in the same processes, the best of its rounds likewise
    chain = result.chain
    assert chain.layers == 1 and set(chain.samples) == {"ours", "torch"}
    assert all(len(v) == 2 and min(v) > 0 for v in chain.samples.values())
    assert chain.ours_s == min(chain.samples["ours"])
    assert chain.ratio == pytest.approx(chain.ours_s / chain.torch_s)
    assert result.to_dict()["chain"]["torch_s"] == chain.torch_s


def test_the_chains_two_sides_start_from_the_same_weights():
    """The MobileNetV1 chain's step (train.chain_step_fns): ours and torch's layers hold the
    same initial weights, so one step gives both the same weight gradients."""
    torch = pytest.importorskip("torch")
    from numba_dsconv.bench import train

    fns = train.chain_step_fns(1, "cpu", 2)
    models = {}
    for side, (step, _) in fns.items():
        step()
        models[side] = step.__defaults__[0]
    ours = [p.grad for p in models["ours"].parameters()]
    theirs = [p.grad for p in models["torch"].parameters()]
    assert len(ours) == len(theirs) == 6  # dw, pw, bias per layer
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b.view_as(a), rtol=1e-4, atol=1e-4)


def test_a_failing_worker_is_named():
    from numba_dsconv.bench import timing

    with pytest.raises(RuntimeError, match="the ours worker failed"):
        timing.alternating_processes("numba_dsconv.bench.train", ["ours"], ["cpu"], 1, 1)
