"""The separable layer, or the layer's standard 3x3 convolution (conv2d), against the CPU
runtimes users would otherwise pick: ONNX Runtime, OpenVINO and LiteRT (TensorFlow Lite's
runtime, whose CPU path is XNNPACK; the ``peers`` extra), PyTorch (channels_last) and
numba_dsconv itself, each timed in a process of its own (two runtimes'
thread pools in one process disturb each other), the processes alternating round after round;
per layer, the best of the rounds' medians (a shared machine has slow rounds; the best is the
least disturbed). Every runtime's output (its first call's, kept) is checked against the float64
reference after the timings.

    numba-dsconv bench --peers [--op separable|conv2d] [--batch N] [--layers 1-7] [--rounds 7]
                       [--repeat 9]

A worker (``python -m numba_dsconv.bench.peers RUNTIME OP BATCH LAYERS THREADS REPEAT``) prints
one JSON object: {layer: [median seconds, relative error]}.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .machine import serial_blas
from .suite import Layer, aligned, layer
from .timing import alternating_processes
from .work import work

OURS = "numba_dsconv"
# ours with the GEMM's weights (pw, or conv2d's w) packed once (numba_dsconv.pack), as ONNX
# Runtime and OpenVINO pack theirs when they load the model
OURS_PACKED = "numba_dsconv+pack"
OPS = ("separable", "conv2d")
# runtime -> the module that must be importable for it
RUNTIMES: dict[str, str] = {
    OURS: "numba",
    OURS_PACKED: "numba",
    "torch": "torch",
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
    "litert": "ai_edge_litert",
}
# LiteRT's padding: its model pads as TFLite's SAME, TensorFlow's 'same' (the odd extra row and
# column after, where the other runtimes pad 1 on every side). The same at stride 1; at stride 2
# the same output shape and work, other values: its output is checked against a float64
# reference with this padding.
LITERT_PADDING = "same"


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


def _arrays(lay: Layer, op: str, batch: int) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """x (NHWC) and the weights of ``op`` on this layer: (dw, pw) for the separable layer,
    (w,) (K,K,C_in,C_out) for conv2d."""
    x, dw, pw = lay.arrays(batch)
    return x, ((dw, pw) if op == "separable" else (lay.conv2d_weight(),))


def _reference(lay: Layer, op: str, x, weights, padding: object = None) -> np.ndarray:
    """The float64 NHWC result of ``op`` (the bench's reference formulas), with the layer's
    padding or ``padding``."""
    import numba_dsconv as nd

    from .. import api
    from . import reference

    call = nd.separable if op == "separable" else nd.conv2d
    geo = {"stride": lay.stride, "padding": lay.padding if padding is None else padding}
    spec = api.plan(call, x, weights, geo).spec
    f = np.float64
    w64 = [w.astype(f) for w in weights]
    if op == "separable":
        return reference.separable(x.astype(f), *w64, None, None, spec)
    return reference.conv2d(x.astype(f), w64[0], None, spec)


def _torch_weights(op: str, weights) -> list[np.ndarray]:
    """The weights in torch's (and ONNX's) OIHW shapes: depthwise (C,1,K,K) and pointwise
    (C_out,C,1,1), or conv2d's (C_out,C_in,K,K)."""
    if op == "separable":
        dw, pw = weights
        return [dw.transpose(2, 0, 1)[:, None], pw.T[:, :, None, None]]
    return [weights[0].transpose(3, 2, 0, 1)]


def _onnx_model(lay: Layer, op: str, weights, batch: int, nhwc: bool) -> bytes:
    """``op`` as a float32 ONNX model: the separable layer as a depthwise Conv (group = C) then
    a 1x1 Conv, or conv2d's one Conv; NCHW input and output, or with ``nhwc`` NHWC ones
    (Transpose nodes around the convolutions, which a runtime may fold into its own layout
    choice)."""
    from onnx import TensorProto, helper, numpy_helper

    c, k, p, hw = lay.c_in, lay.kernel, lay.padding, lay.hw
    names = ["wd", "wp"] if op == "separable" else ["w"]
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(w), name)
        for w, name in zip(_torch_weights(op, weights), names, strict=True)
    ]
    src, dst = ("xt", "yt") if nhwc else ("x", "y")
    geo = dict(kernel_shape=[k, k], pads=[p, p, p, p], strides=[lay.stride, lay.stride])
    if op == "separable":
        nodes = [
            helper.make_node("Conv", [src, "wd"], ["mid"], group=c, **geo),
            helper.make_node("Conv", ["mid", "wp"], [dst], kernel_shape=[1, 1]),
        ]
    else:
        nodes = [helper.make_node("Conv", [src, "w"], [dst], **geo)]
    shape = [batch, c, hw, hw]
    if nhwc:
        nodes.insert(0, helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]))
        nodes.append(helper.make_node("Transpose", ["yt"], ["y"], perm=[0, 2, 3, 1]))
        shape = [batch, hw, hw, c]
    graph = helper.make_graph(
        nodes,
        op,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _tflite_model(lay: Layer, op: str, weights, batch: int) -> bytes:
    """``op`` as a float32 TFLite flatbuffer (built with the schema's generated object API that
    LiteRT ships): the separable layer as DEPTHWISE_CONV_2D then a 1x1 CONV_2D, or conv2d's one
    CONV_2D; NHWC in and out (TFLite's layout), zero biases (TFLite's float convolutions take a
    bias tensor), SAME padding (LITERT_PADDING)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as fb

    c, k, hw, s = lay.c_in, lay.kernel, lay.hw, lay.stride
    o = -(-hw // s)  # 'same'
    model = fb.ModelT()
    model.version = 3
    model.buffers = [fb.BufferT()]  # buffer 0: the empty sentinel
    tensors: list = []

    def tensor(name: str, shape: tuple, data: np.ndarray | None = None) -> int:
        t = fb.TensorT()
        t.name, t.shape, t.type, t.buffer = name, list(shape), fb.TensorType.FLOAT32, 0
        if data is not None:
            buf = fb.BufferT()
            buf.data = np.ascontiguousarray(data, np.float32).reshape(-1).view(np.uint8)
            model.buffers.append(buf)
            t.buffer = len(model.buffers) - 1
        tensors.append(t)
        return len(tensors) - 1

    def operator(code: int, kind: int, options: Any, stride: int, inputs: list, outputs: list):
        options.padding = fb.Padding.SAME
        options.strideW = options.strideH = stride
        options.dilationWFactor = options.dilationHFactor = 1
        options.fusedActivationFunction = fb.ActivationFunctionType.NONE
        op_ = fb.OperatorT()
        op_.opcodeIndex = code
        op_.builtinOptionsType, op_.builtinOptions = kind, options
        op_.inputs, op_.outputs = inputs, outputs
        return op_

    codes = []
    for builtin in (fb.BuiltinOperator.CONV_2D, fb.BuiltinOperator.DEPTHWISE_CONV_2D):
        oc = fb.OperatorCodeT()
        oc.builtinCode = oc.deprecatedBuiltinCode = builtin
        oc.version = 1
        codes.append(oc)
    x = tensor("x", (batch, hw, hw, c))
    if op == "separable":
        dw, pw = weights
        mid = tensor("mid", (batch, o, o, c))
        y = tensor("y", (batch, o, o, lay.c_out))
        dopt = fb.DepthwiseConv2DOptionsT()
        dopt.depthMultiplier = 1
        first = operator(1, fb.BuiltinOptions.DepthwiseConv2DOptions, dopt, s,
                         [x, tensor("wd", (1, k, k, c), dw), tensor("bd", (c,), np.zeros(c))],
                         [mid])  # fmt: skip
        wp = tensor("wp", (lay.c_out, 1, 1, c), pw.T)
        bp = tensor("bp", (lay.c_out,), np.zeros(lay.c_out))
        ops = [first, operator(0, fb.BuiltinOptions.Conv2DOptions, fb.Conv2DOptionsT(), 1,
                               [mid, wp, bp], [y])]  # fmt: skip
    else:
        (w,) = weights  # (K, K, C_in, C_out) -> TFLite's (C_out, K, K, C_in)
        y = tensor("y", (batch, o, o, lay.c_out))
        wt = tensor("w", (lay.c_out, k, k, c), w.transpose(3, 0, 1, 2))
        b = tensor("b", (lay.c_out,), np.zeros(lay.c_out))
        ops = [operator(0, fb.BuiltinOptions.Conv2DOptions, fb.Conv2DOptionsT(), s, [x, wt, b],
                        [y])]  # fmt: skip
    graph = fb.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs, graph.operators = tensors, [x], [y], ops
    graph.name = op
    model.operatorCodes, model.subgraphs = codes, [graph]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _runner(name: str, lay: Layer, op: str, x, weights, threads: int) -> Callable[[], Any]:
    """A no-argument call of runtime ``name`` running ``op`` on this layer, returning NHWC
    float32."""
    nchw = aligned(x.transpose(0, 3, 1, 2))  # (on a 64-byte boundary, as x: Layer.arrays)
    geo = {"stride": lay.stride, "padding": lay.padding}
    if name in (OURS, OURS_PACKED):
        import numba_dsconv as nd

        if name == OURS_PACKED:  # the GEMM's weights: pw, or conv2d's w
            weights = (*weights[:-1], nd.pack(weights[-1]))
        if op == "conv2d":
            return lambda: nd.conv2d(x, *weights, **geo)
        return lambda: nd.separable(x, *weights, **geo)
    if name == "torch":
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(threads)
        xt = torch.from_numpy(nchw).contiguous(memory_format=torch.channels_last)
        ws = [torch.from_numpy(np.ascontiguousarray(w)) for w in _torch_weights(op, weights)]

        def call() -> np.ndarray:
            with torch.no_grad():
                if op == "conv2d":
                    y = F.conv2d(xt, ws[0], **geo)
                else:
                    y = F.conv2d(F.conv2d(xt, ws[0], groups=lay.c_in, **geo), ws[1])
                return y.permute(0, 2, 3, 1).numpy()

        return call
    if name == "onnxruntime":  # NCHW, its native layout
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        model = _onnx_model(lay, op, weights, x.shape[0], nhwc=False)
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        return lambda: sess.run(None, {"x": nchw})[0].transpose(0, 2, 3, 1)
    if name == "openvino":
        # NHWC in and out (its CPU plugin folds the transposes into its own blocked layout:
        # 3-4x faster than NCHW in and out on row 1 here), the input a shared-memory tensor
        import openvino as ov

        core = ov.Core()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{op}.onnx")
            with open(path, "wb") as f:
                f.write(_onnx_model(lay, op, weights, x.shape[0], nhwc=True))
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
    if name == "litert":  # the default delegate (XNNPACK) on `threads` threads, NHWC
        from ai_edge_litert.interpreter import Interpreter

        interp = Interpreter(
            model_content=_tflite_model(lay, op, weights, x.shape[0]), num_threads=threads
        )
        interp.allocate_tensors()
        interp.set_tensor(interp.get_input_details()[0]["index"], x)  # kept between calls
        result = interp.tensor(interp.get_output_details()[0]["index"])

        def call_litert() -> np.ndarray:
            interp.invoke()
            return result()  # a view of its output buffer

        return call_litert
    raise ValueError(f"unknown runtime {name!r}; expected one of {sorted(RUNTIMES)}")


def worker(
    name: str, batch: int, layers: list[int], threads: int, repeat: int, op: str = "separable"
) -> dict:
    """{layer: [median seconds of ``repeat`` calls after warm-up, relative error vs float64]}
    for runtime ``name`` running ``op`` in this process."""
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}; got {op!r}")
    timed: dict[int, tuple[float, np.ndarray]] = {}
    for number in layers:
        lay = layer(number)
        x, weights = _arrays(lay, op, batch)
        fn = _runner(name, lay, op, x, weights, threads)
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
            pad = LITERT_PADDING if name == "litert" else None
            ref = _reference(lay, op, *_arrays(lay, op, batch), padding=pad)
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
    op: str = "separable",
) -> dict[str, dict[int, tuple[float, float]]]:
    """{runtime: {layer: (best of the rounds' medians in seconds, relative error)}} for ``op``:
    each round runs every runtime's worker once, in that order (so they alternate)."""
    best: dict[str, dict[int, tuple[float, float]]] = {r: {} for r in runtimes}
    args = [op, str(batch), ",".join(map(str, layers)), str(threads), str(repeat)]
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


def fma_columns(runtimes: list[str], fma_gflops: float) -> list[str]:
    """The column ``table`` adds after the ratios where the FMA peak is measured (finite):
    the share of it ours reaches (packed where timed so, as the peers pack theirs)."""
    if not (math.isfinite(fma_gflops) and fma_gflops > 0):
        return []
    return ["% FMA packed" if OURS_PACKED in runtimes else "% FMA"]


def table(
    best: dict[str, dict[int, tuple[float, float]]],
    layers: list[int],
    *,
    op: str = "separable",
    batch: int = 1,
    fma_gflops: float = float("nan"),
) -> list[list[str]]:
    """Rows: layer, microseconds per runtime, then per variant of ours (``ratio_columns``) its
    time / the fastest other runtime's (below 1: we lead), then (``fma_columns``, where
    ``fma_gflops``, the machine's FMA peak, is given) ours' GFLOP/s on ``op`` at ``batch`` as a
    percentage of it: measured here, in a process of ours alone, where the in-process tables'
    rate meets the anchors' spinning thread pools."""
    rows = []
    peers = [r for r in best if r not in RATIOS]
    pct_of = OURS_PACKED if OURS_PACKED in best else OURS
    for number in layers:
        cells = [str(number)]
        for r in best:
            med, err = best[r][number]
            cells.append(f"{med * 1e6:.0f}" + ("" if err < 1e-4 else f" (err {err:.0e})"))
        if peers:
            fastest = min(best[r][number][0] for r in peers)
            cells += [f"{best[r][number][0] / fastest:.2f}" for r in RATIOS if r in best]
        if fma_columns(list(best), fma_gflops) and pct_of in best:
            flops = work(layer(number), op, batch).flops
            cells.append(f"{100 * flops / best[pct_of][number][0] / 1e9 / fma_gflops:.0f}%")
        rows.append(cells)
    return rows


def geomean(values: list[float]) -> float:
    return float(np.exp(np.mean(np.log(values)))) if values else float("nan")


if __name__ == "__main__":  # a worker
    rt, op_, n, lays, th, rep = sys.argv[1:7]
    print(json.dumps(worker(rt, int(n), [int(v) for v in lays.split(",")], int(th), int(rep), op_)))
