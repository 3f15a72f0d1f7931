"""asv benchmarks of the four operations over the MobileNet layer suite.

The layers are numba_dsconv.bench.suite.LAYERS (the one definition the command line and the
tests use too); arrays, FLOP/byte counts and the timed calls come from numba_dsconv.bench.

Parameters: layer (all 11), batch (1 and 8 on the CPU, 1 and 64 on CUDA; the other
combinations are skipped) and device ("cuda" is skipped where no GPU is usable: setup raises
NotImplementedError). setup builds the arrays and calls the kernel twice, so JIT compilation
(or loading it from the disk cache) never lands in a timed region; CUDA calls synchronise
before returning.

NUMBA_DSCONV_ASV_QUICK=1 (used by CI with ``asv run --quick``) shrinks the selection to two
layers at N=1, so every benchmark function still runs at least once but the whole suite
finishes in a few minutes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import numba

from numba_dsconv import bench
from numba_dsconv.bench.suite import LAYERS
from numba_dsconv.bench.suite import layer as suite_layer

QUICK = os.environ.get("NUMBA_DSCONV_ASV_QUICK", "") not in ("", "0")

LAYER_NUMBERS = [3, 9] if QUICK else [lay.number for lay in LAYERS]
BATCHES = [1] if QUICK else [1, 8, 64]
DEVICE_BATCHES = {"cpu": (1, 8), "cuda": (1, 64)}


def _skip_unless_supported(batch: int, device: str) -> None:
    if batch not in DEVICE_BATCHES[device]:
        raise NotImplementedError(f"batch {batch} is not benchmarked on {device}")


# asv re-runs setup before every sample (asv#966); the warm case of the current parameters is
# kept here so that a re-run costs a dictionary look-up, not new arrays and warm-up calls.
_WARM: dict[tuple, tuple] = {}


def _warm_case(op: str, layer: int, batch: int, device: str, backward: bool = False) -> tuple:
    """(call, sync, work) for one case (its backward with ``backward``), built and warmed up
    once per process."""
    key = (op, layer, batch, device, backward)
    if key not in _WARM:
        _skip_unless_supported(batch, device)
        _WARM.clear()  # one case at a time: asv runs the parameters one after another
        case = bench.Case(suite_layer(layer), op, batch, device)
        fn, sync = case.numba_grad_fn() if backward else case.numba_fn()
        for _ in range(2):  # the first call compiles or loads the disk cache
            fn()
            sync()
        _WARM[key] = (fn, sync, case.work)
    return _WARM[key]


class _Op:
    """time_ and peakmem_ of one operation; subclasses set ``op`` and name the methods."""

    op = ""
    params = [LAYER_NUMBERS, BATCHES, ["cpu", "cuda"]]
    param_names = ["layer", "batch", "device"]
    timeout = 300.0

    def setup(self, layer: int, batch: int, device: str) -> None:
        self.fn, self.sync, _ = _warm_case(self.op, layer, batch, device)

    def _call(self) -> None:
        self.fn()
        self.sync()


class Separable(_Op):
    op = "separable"

    def time_separable(self, layer: int, batch: int, device: str) -> None:
        self._call()

    def peakmem_separable(self, layer: int, batch: int, device: str) -> None:
        self._call()


class Depthwise(_Op):
    op = "depthwise"

    def time_depthwise(self, layer: int, batch: int, device: str) -> None:
        self._call()

    def peakmem_depthwise(self, layer: int, batch: int, device: str) -> None:
        self._call()


class Pointwise(_Op):
    """The pointwise stage of each layer: (N, H_out, W_out, C_in) -> C_out."""

    op = "pointwise"

    def time_pointwise(self, layer: int, batch: int, device: str) -> None:
        self._call()

    def peakmem_pointwise(self, layer: int, batch: int, device: str) -> None:
        self._call()


class Conv2d(_Op):
    """The standard 3x3 convolution each separable layer replaces."""

    op = "conv2d"

    def time_conv2d(self, layer: int, batch: int, device: str) -> None:
        self._call()

    def peakmem_conv2d(self, layer: int, batch: int, device: str) -> None:
        self._call()


_COLD_CALL = textwrap.dedent(
    """
    import time
    import numba_dsconv
    from numba_dsconv.bench.suite import layer
    x, dw, pw = layer(3).arrays(1)
    t0 = time.perf_counter()
    numba_dsconv.separable(x, dw, pw, stride=1, padding=1)
    print(time.perf_counter() - t0)
    """
)


def track_cold_compile_seconds() -> float:
    """Seconds of the first separable call in a fresh process with an empty kernel cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, NUMBA_DSCONV_NO_CACHE="1")
        out = subprocess.run(
            [sys.executable, "-c", _COLD_CALL],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
    return float(out.stdout.strip().splitlines()[-1])


track_cold_compile_seconds.unit = "seconds"  # type: ignore[attr-defined]
track_cold_compile_seconds.timeout = 600.0  # type: ignore[attr-defined]


class SeparableRoofline:
    """% of the roofline floor (numba_dsconv.bench.work) the fused separable call reaches."""

    params = [LAYER_NUMBERS, BATCHES, ["cpu", "cuda"]]
    param_names = ["layer", "batch", "device"]
    unit = "%"
    timeout = 300.0

    def setup_cache(self) -> dict[str, bench.Ceilings]:
        """The machine's ceilings, measured once per run (with Numba's thread count)."""
        with bench.thread_limits(numba.get_num_threads()):
            out = {"cpu": bench.measure_ceilings("cpu")}
            if bench.gpu_available():
                out["cuda"] = bench.measure_ceilings("cuda")
        return out

    def setup(self, ceilings: dict, layer: int, batch: int, device: str) -> None:
        _skip_unless_supported(batch, device)
        if device not in ceilings:
            raise NotImplementedError(f"no {device} ceilings (no GPU)")
        self.fn, self.sync, self.work = _warm_case("separable", layer, batch, device)

    def track_separable_roofline_percent(
        self, ceilings: dict, layer: int, batch: int, device: str
    ) -> float:
        c = ceilings[device]
        with bench.thread_limits(numba.get_num_threads()):
            samples, _ = bench.time_interleaved({"ours": (self.fn, self.sync)}, repeat=7)
        samples["ours"].sort()
        median = samples["ours"][len(samples["ours"]) // 2]
        w = self.work
        floor = bench.roofline_floor(w.flops, w.nbytes, c.compute_gflops, c.copy_gbs)
        return round(100.0 * floor / median, 2)

    # the floor's compute ceiling became the FMA peak (it was numpy's SGEMM rate): a new series
    track_separable_roofline_percent.version = "fma-peak"  # type: ignore[attr-defined]


class SeparableBackward(_Op):
    """The backward of the fused separable layer (numba_dsconv.separable_grad: the gradients
    of x, dw and pw), which recomputes the depthwise intermediate tile by tile."""

    op = "separable"

    def setup(self, layer: int, batch: int, device: str) -> None:
        self.fn, self.sync, _ = _warm_case(self.op, layer, batch, device, backward=True)

    def time_separable_backward(self, layer: int, batch: int, device: str) -> None:
        self._call()

    def peakmem_separable_backward(self, layer: int, batch: int, device: str) -> None:
        self._call()
