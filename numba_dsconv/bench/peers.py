"""The separable layer against the CPU runtimes users would otherwise pick: ONNX Runtime and
OpenVINO (the ``peers`` extra), PyTorch (channels_last) and numba_dsconv itself, each timed in a
process of its own (two runtimes' thread pools in one process disturb each other), the processes
alternating round after round; per layer, the best of the rounds' medians (a shared machine has
slow rounds; the best is the least disturbed). Every runtime's output is checked against the
float64 reference before it is timed.

    numba-dsconv bench --peers [--batch N] [--layers 1-7] [--rounds 7] [--repeat 9]

A worker (``python -m numba_dsconv.bench.peers RUNTIME BATCH LAYERS THREADS REPEAT``) prints
one JSON object: {layer: [median seconds, relative error]} (None where it cannot run).
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .machine import serial_blas
from .suite import Layer, layer
from .timing import alternating_processes

OURS = "numba_dsconv"
# ours with the pointwise weights packed once (numba_dsconv.pack), as ONNX Runtime and OpenVINO
# pack theirs when they load the model
OURS_PACKED = "numba_dsconv+pack"
# runtime -> the module that must be importable for it
RUNTIMES: dict[str, str] = {
    OURS: "numba",
    OURS_PACKED: "numba",
    "torch": "torch",
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
}


def available() -> list[str]:
    """The runtimes installed here (numba_dsconv always; ONNX Runtime and OpenVINO also need
    onnx to build their model)."""
    out = []
    for name, mod in RUNTIMES.items():
        if importlib.util.find_spec(mod) is None:
            continue
        if name in ("onnxruntime", "openvino") and importlib.util.find_spec("onnx") is None:
            continue
        out.append(name)
    return out


def _reference(lay: Layer, x, dw, pw) -> np.ndarray:
    """The float64 NHWC separable result (the bench's reference formulas)."""
    import numba_dsconv as nd

    from .. import api
    from . import reference

    spec = api.plan(nd.separable, x, (dw, pw), {"stride": lay.stride, "padding": lay.padding}).spec
    f = np.float64
    return reference.separable(x.astype(f), dw.astype(f), pw.astype(f), None, None, spec)


def _onnx_model(lay: Layer, dw: np.ndarray, pw: np.ndarray, batch: int, nhwc: bool) -> bytes:
    """depthwise Conv (group = C) then 1x1 Conv, float32, as an ONNX model; NCHW input and
    output, or with ``nhwc`` NHWC ones (Transpose nodes around the convolutions, which a
    runtime may fold into its own layout choice)."""
    from onnx import TensorProto, helper, numpy_helper

    c, k, p, hw = lay.c_in, lay.kernel, lay.padding, lay.hw
    wd = numpy_helper.from_array(np.ascontiguousarray(dw.transpose(2, 0, 1)[:, None]), "wd")
    wp = numpy_helper.from_array(np.ascontiguousarray(pw.T[:, :, None, None]), "wp")
    src, dst = ("xt", "yt") if nhwc else ("x", "y")
    nodes = [
        helper.make_node("Conv", [src, "wd"], ["mid"], group=c, kernel_shape=[k, k],
                         pads=[p, p, p, p], strides=[lay.stride, lay.stride]),
        helper.make_node("Conv", ["mid", "wp"], [dst], kernel_shape=[1, 1]),
    ]  # fmt: skip
    shape = [batch, c, hw, hw]
    if nhwc:
        nodes.insert(0, helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]))
        nodes.append(helper.make_node("Transpose", ["yt"], ["y"], perm=[0, 2, 3, 1]))
        shape = [batch, hw, hw, c]
    graph = helper.make_graph(
        nodes,
        "separable",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[wd, wp],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _runner(name: str, lay: Layer, x, dw, pw, threads: int) -> Callable[[], np.ndarray]:
    """A no-argument call of runtime ``name`` on this layer, returning NHWC float32."""
    nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if name == OURS:
        import numba_dsconv as nd

        return lambda: nd.separable(x, dw, pw, stride=lay.stride, padding=lay.padding)
    if name == OURS_PACKED:
        import numba_dsconv as nd

        packed = nd.pack(pw)
        return lambda: nd.separable(x, dw, packed, stride=lay.stride, padding=lay.padding)
    if name == "torch":
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(threads)
        xt = torch.from_numpy(nchw).contiguous(memory_format=torch.channels_last)
        wd = torch.from_numpy(np.ascontiguousarray(dw.transpose(2, 0, 1)[:, None]))
        wp = torch.from_numpy(np.ascontiguousarray(pw.T[:, :, None, None]))

        def call() -> np.ndarray:
            with torch.no_grad():
                mid = F.conv2d(xt, wd, stride=lay.stride, padding=lay.padding, groups=lay.c_in)
                return F.conv2d(mid, wp).permute(0, 2, 3, 1).numpy()

        return call
    if name == "onnxruntime":  # NCHW, its native layout
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        model = _onnx_model(lay, dw, pw, x.shape[0], nhwc=False)
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        return lambda: sess.run(None, {"x": nchw})[0].transpose(0, 2, 3, 1)
    if name == "openvino":
        # NHWC in and out (its CPU plugin folds the transposes into its own blocked layout:
        # 3-4x faster than NCHW in and out on row 1 here), the input a shared-memory tensor
        import openvino as ov

        core = ov.Core()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "separable.onnx")
            with open(path, "wb") as f:
                f.write(_onnx_model(lay, dw, pw, x.shape[0], nhwc=True))
            compiled = core.compile_model(
                core.read_model(path),
                "CPU",
                # f32: on a CPU with bf16 units OpenVINO otherwise computes in bf16 (a
                # relative error of ~4e-3 here, on AMX hardware)
                {
                    "INFERENCE_NUM_THREADS": threads,
                    "PERFORMANCE_HINT": "LATENCY",
                    "INFERENCE_PRECISION_HINT": "f32",
                },
            )
        req = compiled.create_infer_request()
        req.set_input_tensor(ov.Tensor(x, shared_memory=True))

        def call_ov() -> np.ndarray:
            req.infer()
            return req.get_output_tensor(0).data

        return call_ov
    raise ValueError(f"unknown runtime {name!r}; expected one of {sorted(RUNTIMES)}")


def worker(name: str, batch: int, layers: list[int], threads: int, repeat: int) -> dict:
    """{layer: [median seconds of ``repeat`` calls after warm-up, relative error vs float64]}
    for runtime ``name`` in this process."""
    timed: dict[int, tuple[float, np.ndarray]] = {}
    for number in layers:
        lay = layer(number)
        x, dw, pw = lay.arrays(batch)
        fn = _runner(name, lay, x, dw, pw, threads)
        got = np.array(fn(), np.float32)  # a copy: a runtime may reuse its output buffer
        for _ in range(5):  # warm-up: thread pools, first-run allocations
            fn()
        samples = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        timed[number] = (statistics.median(samples), got)
        del fn
    # the references after every timing, on one BLAS thread: numpy's BLAS threads spin for a
    # while after a call, and took the cores from whatever was timed next (2x on rows 4-7 at
    # N=8)
    result: dict[str, Any] = {}
    for number, (med, got) in timed.items():
        lay = layer(number)
        with serial_blas():
            ref = _reference(lay, *lay.arrays(batch))
        err = float(np.max(np.abs(got - ref)) / max(1e-30, float(np.max(np.abs(ref)))))
        result[str(number)] = [med, err]
    return result


def run_peers(
    batch: int,
    layers: list[int],
    runtimes: list[str],
    threads: int,
    rounds: int = 7,
    repeat: int = 9,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict[int, tuple[float, float]]]:
    """{runtime: {layer: (best of the rounds' medians in seconds, relative error)}}: each
    round runs every runtime's worker once, in that order (so they alternate)."""
    best: dict[str, dict[int, tuple[float, float]]] = {r: {} for r in runtimes}
    args = [str(batch), ",".join(map(str, layers)), str(threads), str(repeat)]
    done = alternating_processes("numba_dsconv.bench.peers", runtimes, args, threads, rounds,
                                 progress)  # fmt: skip
    for name, outputs in done.items():
        for output in outputs:
            for key, (med, err) in output.items():
                old = best[name].get(int(key))
                if old is None or med < old[0]:
                    best[name][int(key)] = (med, err)
    return best


RATIOS = {OURS: "vs fastest", OURS_PACKED: "packed vs fastest"}


def ratio_columns(runtimes: list[str]) -> list[str]:
    """The ratio columns of ``table`` for these runtimes: one per variant of ours, where there
    is another runtime to compare with."""
    if not any(r not in RATIOS for r in runtimes):
        return []
    return [RATIOS[r] for r in RATIOS if r in runtimes]


def table(best: dict[str, dict[int, tuple[float, float]]], layers: list[int]) -> list[list[str]]:
    """Rows: layer, microseconds per runtime, then per variant of ours (``ratio_columns``) its
    time / the fastest other runtime's (below 1: we lead)."""
    rows = []
    peers = [r for r in best if r not in RATIOS]
    for number in layers:
        cells = [str(number)]
        for r in best:
            med, err = best[r][number]
            cells.append(f"{med * 1e6:.0f}" + ("" if err < 1e-4 else f" (err {err:.0e})"))
        if peers:
            fastest = min(best[r][number][0] for r in peers)
            cells += [f"{best[r][number][0] / fastest:.2f}" for r in RATIOS if r in best]
        rows.append(cells)
    return rows


def geomean(values: list[float]) -> float:
    return float(np.exp(np.mean(np.log(values)))) if values else float("nan")


if __name__ == "__main__":  # a worker
    rt, n, lays, th, rep = sys.argv[1:6]
    print(json.dumps(worker(rt, int(n), [int(v) for v in lays.split(",")], int(th), int(rep))))
