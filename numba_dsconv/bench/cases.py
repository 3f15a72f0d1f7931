"""One benchmark case: a suite layer x op x batch x device, its arrays, the numba_dsconv call
(optionally with ``out=`` or under other _config settings), the PyTorch anchors, and the float64
reference every timed result is checked against."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .. import _config, api
from .._spec import ConvSpec, make_spec
from ..packing import pack
from . import reference
from .machine import gpu_available, tf32, torch_module
from .suite import Layer
from .timing import Timed, no_sync, rotating
from .work import OPS, work

DEVICES: tuple[str, ...] = ("cpu", "cuda")

# A float32 result whose largest error, relative to the largest |value| of the float64
# reference, exceeds this is flagged as a mismatch.
RTOL_FLOAT32 = 1e-4

# GPU inputs are rotated through enough copies to cover this many bytes, so that a call does
# not find its input in L2 left there by the previous call (H200: 60 MB of L2).
GPU_ROTATE_BYTES = 128 * 1024 * 1024

# Anchor names and their labels, per device.
ANCHORS: dict[str, tuple[tuple[str, str], ...]] = {
    "cpu": (("torch_channels_last", "torch CL"), ("torch_nchw", "torch NCHW")),
    "cuda": (("torch_fp32", "torch fp32"), ("torch_default", "torch default")),
}
OURS = "numba_dsconv"
# anchors timed on their own after the interleaved rounds: torch's NCHW convolution takes tens
# of MB of fresh memory per call at the big layers (9,400 page faults a call at layer 1, N=8),
# and the calls interleaved with it then met fresh memory too (ours 161 faults a call: 6.7 ms
# against 3.0 without it beside them, torch channels_last likewise)
TIMED_ALONE = frozenset({"torch_nchw"})


@contextlib.contextmanager
def config(knobs: dict[str, Any]) -> Iterator[None]:
    """_config tunables set to ``knobs`` inside the block, restored on exit."""
    saved = {k: getattr(_config, k) for k in knobs}
    try:
        for k, v in knobs.items():
            setattr(_config, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(_config, k, v)


def check_case(op: str, batch: int, device: str) -> None:
    """Raise for a case that cannot run (NotImplementedError where no GPU is usable: asv reads
    that as "skip")."""
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}; got {op!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1; got {batch!r}")
    if device == "cuda" and not gpu_available():
        raise NotImplementedError("device='cuda': no usable CUDA GPU on this machine")


class Case:
    """One layer x op x batch x device: its arrays, the numba_dsconv call and the anchors."""

    def __init__(self, lay: Layer, op: str, batch: int, device: str = "cpu") -> None:
        check_case(op, batch, device)
        self.layer, self.op, self.batch, self.device = lay, op, batch, device
        self.work = work(lay, op, batch)
        x, dw, pw = lay.arrays(batch)
        rng = np.random.default_rng(1000 + lay.number)
        if op == "pointwise":
            # The pointwise stage of the layer: its input is the depthwise output's shape.
            x = rng.standard_normal(self.work.x_shape, dtype=np.float32)
        self.host: dict[str, np.ndarray] = {"x": x}
        if op in ("separable", "depthwise"):
            self.host["dw"] = dw
        if op in ("separable", "pointwise"):
            self.host["pw"] = pw
        if op == "conv2d":
            self.host["w"] = lay.conv2d_weight()
        self._rotation = 1
        if device == "cuda":
            self._rotation = max(1, min(4096, math.ceil(GPU_ROTATE_BYTES / x.nbytes)))

    def spec(self) -> ConvSpec:
        lay, x = self.layer, self.host["x"]
        pointwise = self.op == "pointwise"
        return make_spec(
            self.op,
            x_shape=x.shape,
            layout="NHWC",
            kernel=(1, 1) if pointwise else (lay.kernel, lay.kernel),
            c_in_kernel=lay.c_in,
            multiplier=1,
            c_out=lay.c_out if self.op != "depthwise" else lay.c_in,
            stride=1 if pointwise else lay.stride,
            padding="valid" if pointwise else lay.padding,
        )

    # -- numba_dsconv --------------------------------------------------------------------

    def _arrays(self) -> tuple[list[Any], dict[str, Any], Callable[[], None]]:
        h = self.host
        if self.device == "cuda":
            from numba import cuda

            xs = [cuda.to_device(h["x"]) for _ in range(self._rotation)]
            ws = {k: cuda.to_device(v) for k, v in h.items() if k != "x"}
            return xs, ws, cuda.synchronize
        return [h["x"]], {k: v for k, v in h.items() if k != "x"}, no_sync

    def numba_fn(
        self, *, out: bool = False, knobs: dict[str, Any] | None = None, packed: bool = False
    ) -> Timed:
        """(call, sync): one numba_dsconv call on the next input, and the wait for it; with
        ``out`` into one preallocated result, with ``knobs`` under those _config settings, with
        ``packed`` (CPU) its GEMM weights packed once beforehand (``numba_dsconv.pack``;
        depthwise has none)."""
        xs, ws, sync = self._arrays()
        lay = self.layer
        kw: dict[str, Any] = {"device": self.device}
        if self.op != "pointwise":
            kw.update(stride=lay.stride, padding=lay.padding)
        fn = getattr(api, self.op)
        weights = [ws[k] for k in ("w", "dw", "pw") if k in ws]
        if packed and self.op != "depthwise":
            weights[-1] = pack(weights[-1])  # pw or w: the GEMM's weights come last
        if out:
            kw["out"] = fn(xs[0], *weights, **kw)
        if len(xs) == 1 and not knobs:  # the public call itself, no wrapper frame around it
            return functools.partial(fn, xs[0], *weights, **kw), sync

        def one(x: Any) -> Any:
            return fn(x, *weights, **kw)

        if knobs:

            def varied(x: Any) -> Any:
                with config(knobs):
                    return one(x)

            return rotating(varied, xs), sync
        return rotating(one, xs), sync

    def numba_grad_fn(self) -> Timed:
        """(call, sync): the backward of the case's call (numba_dsconv.<op>_grad, every
        gradient: x, weights) for a random grad of the result, on the next input."""
        from .. import grad as grads

        xs, ws, sync = self._arrays()
        lay = self.layer
        kw: dict[str, Any] = {"device": self.device}
        if self.op != "pointwise":
            kw.update(stride=lay.stride, padding=lay.padding)
        weights = [ws[k] for k in ("w", "dw", "pw") if k in ws]
        y = getattr(api, self.op)(xs[0], *weights, **kw)
        rng = np.random.default_rng(7)
        g = rng.standard_normal(tuple(y.shape), dtype=np.float32)
        if self.device == "cuda":
            from numba import cuda

            g = cuda.to_device(g)
        fn = getattr(grads, f"{self.op}_grad")

        def one(x: Any) -> Any:
            return fn(g, x, *weights, **kw)

        return rotating(one, xs), sync

    def bare_launch(self) -> Timed:
        """The CUDA kernel launch the call ends in, configured once (the call's time minus this
        is the library's work per call; on the CPU ``bench.python_share`` times the kernel
        inside the call instead)."""
        if self.device != "cuda":
            raise ValueError("bare_launch times the CUDA kernel launch; device is 'cpu'")
        from numba import cuda

        from .._dispatch import Device
        from ..cuda.backend import CudaBackend

        spec = self.spec()
        xs, ws, sync = self._arrays()
        be = CudaBackend(Device("cuda"), xs[0])
        weights = tuple(ws[k] for k in ("w", "dw", "pw") if k in ws)
        biases = (None, None) if self.op == "separable" else (None,)
        with be.context:  # the device current for every CUDA step, as in a call
            target = cuda.device_array(spec.out_nhwc, np.float32)
            dt = np.dtype(np.float32)
            launch, args = be.kernel_call(spec, dt, xs[0], weights, biases, target)

        def bare() -> None:
            with be.context:
                launch(*args)

        return bare, sync

    # -- the anchors -----------------------------------------------------------------------

    def torch_fns(self) -> dict[str, Timed]:
        """The PyTorch anchors by name ({} without torch, or without a CUDA torch on GPU)."""
        torch = torch_module()
        if torch is None or (self.device == "cuda" and not torch.cuda.is_available()):
            return {}
        import torch.nn.functional as F

        lay, h = self.layer, self.host
        dev = "cuda" if self.device == "cuda" else "cpu"
        x_nchw = torch.from_numpy(h["x"]).permute(0, 3, 1, 2)
        weights = {}
        if "dw" in h:
            weights["dw"] = torch.from_numpy(h["dw"]).permute(2, 0, 1).unsqueeze(1)
        if "pw" in h:
            weights["pw"] = torch.from_numpy(h["pw"]).t()[:, :, None, None]
        if "w" in h:
            weights["w"] = torch.from_numpy(h["w"]).permute(3, 2, 0, 1)
        s, p, groups = lay.stride, lay.padding, lay.c_in

        def build(fmt: Any) -> tuple[list[Any], dict[str, Any]]:
            xs = [
                x_nchw.to(dev).contiguous(memory_format=fmt).clone(memory_format=fmt)
                for _ in range(self._rotation)
            ]
            return xs, {k: v.to(dev).contiguous(memory_format=fmt) for k, v in weights.items()}

        def op_fn(ws: dict[str, Any], allow_tf32: bool | None) -> Callable[[Any], Any]:
            def depthwise(x: Any) -> Any:
                return F.conv2d(x, ws["dw"], stride=s, padding=p, groups=groups)

            calls = {
                "separable": lambda x: F.conv2d(depthwise(x), ws["pw"]),
                "depthwise": depthwise,
                "pointwise": lambda x: F.conv2d(x, ws["pw"]),
                "conv2d": lambda x: F.conv2d(x, ws["w"], stride=s, padding=p),
            }
            fn = calls[self.op]

            def call(x: Any) -> Any:
                with torch.inference_mode(), tf32(allow_tf32):
                    return fn(x)

            return call

        if self.device == "cpu":
            out = {}
            for name, fmt in (
                ("torch_channels_last", torch.channels_last),
                ("torch_nchw", torch.contiguous_format),
            ):
                xs, ws = build(fmt)
                out[name] = (rotating(op_fn(ws, None), xs), no_sync)
            return out
        xs, ws = build(torch.channels_last)
        sync = torch.cuda.synchronize
        return {
            "torch_fp32": (rotating(op_fn(ws, False), xs), sync),  # TF32 off: strict fp32
            "torch_default": (rotating(op_fn(ws, None), xs), sync),  # torch's own defaults
        }

    # -- correctness -----------------------------------------------------------------------

    def reference(self) -> np.ndarray:
        """The float64 NumPy result (NHWC)."""
        h = self.host
        weights = tuple(h[k] for k in ("w", "dw", "pw") if k in h)
        biases = (None, None) if self.op == "separable" else (None,)
        return reference.compute(self.spec(), h["x"], weights, biases)

    @staticmethod
    def relative_error(result: Any, ref: np.ndarray) -> float:
        """max |result - ref| / max |ref| (result: NHWC array, device array or NCHW tensor)."""
        got = _to_host_nhwc(result)
        if got.shape != ref.shape:
            return float("inf")
        scale = float(np.max(np.abs(ref))) if ref.size else 1.0
        err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
        return err / max(scale, 1e-30)


def _to_host_nhwc(a: Any) -> np.ndarray:
    if type(a).__module__.startswith("torch"):
        return a.detach().permute(0, 2, 3, 1).cpu().numpy().astype(np.float64)
    if hasattr(a, "copy_to_host"):
        a = a.copy_to_host()
    return np.asarray(a, np.float64)
