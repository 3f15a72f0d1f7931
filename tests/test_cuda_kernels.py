"""The CUDA backend's own behaviour (simulator or GPU): halo tiles, launch plans, device arrays,
out=, non-contiguous and non-finite inputs. Every kernel specialisation against the float64
reference is in the case table (tests/cases.py, run by tests/test_ops.py on device='cuda').

Runs under the simulator (NUMBA_ENABLE_CUDASIM=1, set before Python starts, as .ci/run does)
or on a real GPU; elsewhere it skips. Tiles and blocks are patched small so tiny inputs still
span several blocks and every grid-stride loop turns more than once.
"""

from __future__ import annotations

import numpy as np
import pytest
from cases import make_case, params, select
from helpers import (
    SIMULATOR,
    assert_close,
    check_against_reference,
    cuda_usable,
    randn,
    ref_fn,
    small_cuda_blocks,
)

import numba_dsconv as nd

requires_cuda = pytest.mark.skipif(
    not cuda_usable(), reason="no CUDA GPU and not under the simulator (NUMBA_ENABLE_CUDASIM=1)"
)
TILE_CONFIGS = ["small-blocks"] if SIMULATOR else ["small-blocks", "default-blocks"]


@pytest.fixture(params=TILE_CONFIGS)
def cuda_config(request, monkeypatch):
    if request.param == "small-blocks":
        small_cuda_blocks(monkeypatch)
    return request.param


pytestmark = [requires_cuda, pytest.mark.usefixtures("cuda_config")]

# every specialised (K, K, s, s) build
SPECIALISED = [(k, s) for k in (3, 5, 7) for s in (1, 2)]


@pytest.fixture
def halo_builds(monkeypatch):
    """Force the halo-tiled separable build where one exists and record each GEMM build's
    halo shape."""
    from numba_dsconv import _config
    from numba_dsconv.cuda import backend, gemm

    monkeypatch.setattr(_config, "CUDA_HALO", "always")
    monkeypatch.setattr(backend, "_PLANS", {})  # every call below plans (and builds) afresh
    seen = []
    real = gemm.gemm_kernel

    def spy(op, kh, kw, sh, sw, dtype, tile, halo=(0, 0), registers=0):
        seen.append(halo)
        return real(op, kh, kw, sh, sw, dtype, tile, halo, registers)

    monkeypatch.setattr(gemm, "gemm_kernel", spy)
    return seen


@pytest.mark.parametrize("mult", [1, 2])
@pytest.mark.parametrize("k,s", SPECIALISED)
def test_separable_halo_tiles(rng, halo_builds, k, s, mult):
    """Halo tiles: partial rectangles at the right and bottom edges, padding inside the halo,
    several channel chunks and output-channel tiles, depth multipliers, both activations."""
    x, w, b, red = make_case(
        rng, "separable", n=2, h=k + 4, w=k + 3, c=3, kh=k, kw=k, mult=mult, c_out=5, biases=True
    )
    check_against_reference(
        "separable",
        x,
        w,
        red,
        device="cuda",
        stride=s,
        padding="same",
        mid_activation="relu",
        activation="relu6",
        **b,
    )
    assert halo_builds and all(h != (0, 0) for h in halo_builds), halo_builds


@pytest.mark.parametrize("s", [1, 2])
def test_separable_halo_tiles_rectangular(rng, halo_builds, monkeypatch, s):
    """A tile of 8 pixels with 4 x 2 outputs per thread: 2 x 4 halo rectangles."""
    from numba_dsconv import _config

    monkeypatch.setattr(_config, "CUDA_GEMM_TILE", (8, 4, 2, 4, 2))
    x, w, b, red = make_case(rng, "separable", n=2, h=7, w=9, c=3, c_out=5, biases=True)
    check_against_reference("separable", x, w, red, device="cuda", stride=s, padding=1, **b)
    assert halo_builds == [(2, 4)]


@pytest.mark.parametrize("halo", ["always", "never"])
def test_shipped_tile(rng, monkeypatch, halo):
    """The shipped tile (256 threads, 8 x 8 halo rectangles, 16-channel chunks) on a layer with
    a partial last chunk (20 channels), a partial output-channel tile (70) and more tiles
    than blocks."""
    from numba_dsconv import _config

    monkeypatch.setattr(_config, "CUDA_GEMM_TILE", (64, 64, 16, 4, 4))
    monkeypatch.setattr(_config, "CUDA_HALO", halo)
    x, w, b, red = make_case(rng, "separable", n=2, h=9, w=10, c=20, c_out=70, biases=True)
    check_against_reference(
        "separable", x, w, red, device="cuda", padding=1, activation="relu6", **b
    )


@pytest.mark.parametrize(
    "geo",
    [dict(padding=(2, 0)), dict(padding=((0, 2), (1, 0))), dict(padding="valid", stride=(1, 1))],
)
def test_separable_halo_tiles_asymmetric_padding(rng, halo_builds, geo):
    x, w, b, red = make_case(rng, "separable", n=1, h=7, w=6, c=5, c_out=3)
    check_against_reference("separable", x, w, red, device="cuda", **geo)
    assert halo_builds == [halo_builds[0]] and halo_builds[0] != (0, 0)


def test_separable_halo_not_for_dilation_or_float64(rng, halo_builds):
    """No halo build for dilated or float64 separable layers: they take the flat tiles."""
    x, w, b, red = make_case(rng, "separable", n=1, h=7, w=6)
    check_against_reference("separable", x, w, red, device="cuda", padding=2, dilation=2)
    x64, w64, _, _ = make_case(rng, "separable", n=1, h=7, w=6, xdtype=np.float64)
    check_against_reference("separable", x64, w64, red, device="cuda", padding=1)
    assert halo_builds == [(0, 0), (0, 0)]


def test_launch_plans_follow_the_config(rng, halo_builds, monkeypatch):
    """A launch plan is reused for the same call, and re-made when a _config knob changes."""
    from numba_dsconv import _config

    x, w, b, red = make_case(rng, "separable", n=1, h=6, w=6)
    for _ in range(2):
        check_against_reference("separable", x, w, red, device="cuda", padding=1)
    assert len(halo_builds) == 1 and halo_builds[0] != (0, 0)
    monkeypatch.setattr(_config, "CUDA_HALO", "never")
    check_against_reference("separable", x, w, red, device="cuda", padding=1)
    assert halo_builds[1:] == [(0, 0)]
    x64, w64, _, _ = make_case(rng, "separable", n=1, h=6, w=6, xdtype=np.float64)
    check_against_reference("separable", x64, w64, red, device="cuda", padding=1)
    assert len(halo_builds) == 3  # another dtype: another plan


def test_non_contiguous_and_read_only_inputs(rng):
    x, (dw, pw), b, red = make_case(rng, "separable", n=2, h=6, w=8, c=3, c_out=4)
    xs = x[:, ::-1, ::2]  # negative and non-unit strides
    dwf = np.asfortranarray(dw)
    pwr = pw.copy()
    pwr.flags.writeable = False
    before = [a.copy() for a in (xs, dwf, pwr)]
    check_against_reference("separable", xs, (dwf, pwr), red, device="cuda", padding=1)
    for a, a0 in zip((xs, dwf, pwr), before, strict=True):
        np.testing.assert_array_equal(a, a0)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_out_host_poisoned(rng, layout):
    x, (dw, pw), b, red = make_case(rng, "separable", layout=layout)
    expected = ref_fn("separable")(x, dw, pw, padding=1, layout=layout)
    out = np.full(expected.shape, np.nan, np.float32)
    got = __import__("numba_dsconv").separable(
        x, dw, pw, padding=1, layout=layout, device="cuda", out=out
    )
    assert got is out
    assert not np.isnan(out).any()
    assert_close(out, expected, np.float32, red)


def _device(a):
    from numba import cuda

    return cuda.to_device(np.ascontiguousarray(a))


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("batched", [True, False])
def test_device_arrays_stay_on_device(rng, layout, batched):
    import numba_dsconv as nd

    x, (dw, pw), b, red = make_case(rng, "separable", layout=layout, batched=batched)
    expected = ref_fn("separable")(x, dw, pw, padding=1, layout=layout)
    y = nd.separable(_device(x), _device(dw), _device(pw), padding=1, layout=layout)
    assert type(y).__module__.startswith("numba.cuda")  # same array type back, no host trip
    assert_close(y.copy_to_host(), expected, np.float32, red)
    # device out=, poisoned first, in both layouts
    out = _device(np.full(expected.shape, np.nan, np.float32))
    got = nd.separable(_device(x), _device(dw), _device(pw), padding=1, layout=layout, out=out)
    assert got is out
    assert_close(out.copy_to_host(), expected, np.float32, red)


def test_device_array_with_cpu_device_is_an_error(rng):
    import numba_dsconv as nd

    x, (dw, pw), b, red = make_case(rng, "separable")
    with pytest.raises(ValueError, match="x lives on a CUDA device"):
        nd.separable(_device(x), dw, pw, device="cpu")


def test_out_overlapping_device_input_is_an_error(rng):
    import numba_dsconv as nd

    x = _device(randn(rng, (1, 4, 4, 3), np.float32))
    pw = randn(rng, (3, 3), np.float32)
    with pytest.raises(ValueError, match="out"):
        nd.pointwise(x, pw, out=x)


def test_nan_and_inf_propagate(rng):
    x, (dw, pw), b, red = make_case(rng, "separable", n=1, h=6, w=6)
    x[0, 1, 1, 0] = np.nan
    x[0, 4, 4, 1] = np.inf
    expected = ref_fn("separable")(x, dw, pw, padding=1, activation="relu")
    y = __import__("numba_dsconv").separable(x, dw, pw, padding=1, activation="relu", device="cuda")
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    assert_close(y, expected, np.float32, red)


@pytest.mark.parametrize("op", ["conv2d", "depthwise", "separable"])
def test_nonfinite_weight_times_padding_zero(op):
    """A padded tap contributes 0 * weight: a NaN weight makes every output NaN (torch agrees)."""
    import numba_dsconv as nd

    x = np.ones((1, 4, 4, 1))
    weights = {
        "conv2d": (np.ones((3, 3, 1, 1)),),
        "depthwise": (np.ones((3, 3, 1)),),
        "separable": (np.ones((3, 3, 1)), np.ones((1, 1))),
    }[op]
    weights[0][0, 0, 0] = np.nan
    y = getattr(nd, op)(x, *weights, padding="same", device="cuda")
    assert np.isnan(y).all()


def test_fortran_and_permuted_device_weights(rng):
    """Non-C-contiguous device weights (a torch (C_out, C_in, 1, 1) weight permuted to
    (1, 1, C_in, C_out) is F-ordered) must be copied, never reinterpreted."""
    import numba_dsconv as nd

    x, (dw, pw), b, red = make_case(rng, "separable", c=3, c_out=4)
    expected = ref_fn("separable")(x, dw, pw, padding=1)
    pw4 = np.asfortranarray(pw[None, None])
    assert pw4.flags.f_contiguous and not pw4.flags.c_contiguous
    dwf = np.asfortranarray(dw[..., None])  # (K, K, C, 1), F-ordered
    from numba import cuda

    y = nd.separable(_device(x), cuda.to_device(dwf), cuda.to_device(pw4), padding=1)
    assert_close(y.copy_to_host(), expected, np.float32, red)


@pytest.mark.parametrize("lib", ["torch", "cupy"])
@pytest.mark.parametrize("case", params(select("small")))
def test_foreign_cuda_arrays_in_and_out(case, lib, rng):
    """torch CUDA tensors and CuPy arrays through every op, both dtypes, multiplier 2, every
    layout, an empty batch, mixed dtypes: zero-copy in, the caller's type out on its device."""
    if SIMULATOR:
        pytest.skip("torch and CuPy need a real GPU")
    mod = pytest.importorskip(lib)
    if lib == "torch" and not mod.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    x, weights, kwargs = case.make(rng)
    expected = ref_fn(case.op)(x, *weights, **kwargs)

    def dev(a):
        a = np.ascontiguousarray(a)
        return mod.from_numpy(a).cuda() if lib == "torch" else mod.asarray(a)

    kw = {k: dev(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    y = getattr(nd, case.op)(dev(x), *(dev(w) for w in weights), **kw)
    if lib == "torch":
        assert isinstance(y, mod.Tensor) and y.is_cuda
    else:
        assert isinstance(y, mod.ndarray)
    assert_close(y, expected, case.result_dtype, case.reduction_len)


def test_bench_engine_cuda_paths(monkeypatch):
    """What benchmarks/gpu_check.py runs on a GPU, on a tiny layer: the CUDA ceilings (a small
    copy; no SGEMM without a CUDA torch), separable variants checked against float64, and the
    call breakdown down to the bare kernel launch (built without monkeypatching)."""
    from numba_dsconv import bench
    from numba_dsconv.bench import suite

    tiny = suite.Layer(99, "tiny", 6, 4, 8, 1)
    c = bench.measure_ceilings("cuda", repeat=1, sgemm_n=64, copy_bytes=1 << 12)
    assert c.device == "cuda" and c.copy_gbs > 0 and c.copy_bytes == 1 << 12
    case = bench.Case(tiny, "separable", 1, "cuda")
    variants = [("flat tiles", {"CUDA_HALO": "never"}), ("halo tiles", {"CUDA_HALO": "always"})]
    times, errors = bench.time_variants(case, variants, repeat=2)
    assert set(times) == set(errors) == {"shipped", "flat tiles", "halo tiles"}
    assert all(t > 0 for t in times.values())
    assert all(e <= bench.RTOL_FLOAT32 for e in errors.values()), errors
    parts = bench.call_breakdown(case, reps=3)
    assert set(parts) == {"call", "call+sync", "call out=", "bare launch", "bare launch+sync"}
    assert all(t > 0 for t in parts.values())
    fn, sync = case.bare_launch()
    fn()
    sync()
