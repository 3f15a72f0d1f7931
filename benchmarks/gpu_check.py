"""The GPU proof of the CUDA backend, in one run on a CUDA machine.

    PYTHONPATH=$PWD python3 benchmarks/gpu_check.py [--quick] [--json FILE] [--skip-tests]

With the project on PYTHONPATH (torch, numba-cuda and optionally CuPy installed), it

1. runs the CUDA tests for real: the shared case table on device='cuda' against the float64
   reference and against torch (tests/test_ops.py, tests/test_torch_oracle.py) and the
   CUDA-specific tests (tests/test_cuda_kernels.py), small and default blocks;
2. checks a depthwise over more than 2**31 elements (1 x 32800 x 32800 x 2, NHWC) against
   cuDNN, so 64-bit indexing is exercised for real;
3. checks zero-copy round trips for torch and CuPy inputs on a non-default stream (result type,
   device, data pointer of out=, ordering on the caller's stream);
4. times the MobileNet suite at N=64 with numba_dsconv.bench (the engine behind
   `numba-dsconv bench`: the same ceilings, roofline, timing and tables): separable and
   depthwise against cuDNN in strict fp32 (TF32 off) and with torch's defaults; the separable
   kernel also under the VARIANTS settings (flat / halo tiles, no launch bounds, a larger
   tile), so one run shows which is faster;
5. times the whole Python call at N=1 on layer 7 (returning, synchronised, with out=, and the
   bare kernel launch it ends in),
6. runs the README's CUDA cluster example: CuPy chunks through dask (a dask-cuda
   LocalCUDACluster where installed), equal to the in-memory call bit for bit,
7. times one training step per layer (numba_dsconv.torch.separable forward + backward against
   cuDNN's Conv2d(groups=C) + Conv2d(1x1), channels_last, TF32 off) with the gradients checked
   against torch's, and the bytes autograd keeps for MobileNetV1's 13 separable layers,
8. times one training step of those 13 layers in a chain (relu6 after each stage, as
   ``numba-dsconv bench --pass train`` does; a step of its own, so that a failure there costs
   no other table),

and prints short tables last. Exit status 1 if any check failed. Every global setting it
touches (torch's TF32 flags, numba_dsconv._config) is restored. The flow is smoke-tested on the
CPU by tests/test_gpu_check.py (``--device cpu``: the same steps, where they apply).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import traceback

import numpy as np

from numba_dsconv import bench
from numba_dsconv.bench import report
from numba_dsconv.bench.machine import tf32
from numba_dsconv.bench.suite import layer

RESULTS: dict = {"checks": {}, "runs": [], "variants": {}, "call_breakdown": {}, "train": []}

# Alternatives to the shipped CUDA settings, timed beside them: (label, {_config knob: value}).
VARIANTS = (
    ("flat tiles", {"CUDA_HALO": "never"}),
    ("halo tiles", {"CUDA_HALO": "always"}),
    ("no launch bounds", {"CUDA_GEMM_REGISTERS": 0}),
    # 8 x 4 outputs per thread need more than 128 registers: one block per multiprocessor
    ("tile 128x64 r8x4", {"CUDA_GEMM_TILE": (128, 64, 8, 8, 4), "CUDA_GEMM_REGISTERS": 255}),
)


def log(msg: str) -> None:
    print(msg, flush=True)


def check(name: str, ok: bool, detail: str = "") -> bool:
    RESULTS["checks"][name] = {"ok": bool(ok), "detail": detail}
    log(f"[{'PASS' if ok else 'FAIL'}] {name} {detail}")
    return ok


def run_cuda_tests() -> None:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    files = ["tests/test_ops.py", "tests/test_torch_oracle.py", "tests/test_cuda_kernels.py",
             "tests/test_grad.py", "tests/test_torch_frontend.py"]  # fmt: skip
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", *files, "-k", "cuda"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    detail = f"({time.perf_counter() - t0:.0f} s) " + " | ".join(tail)
    check("pytest (case table, torch oracle, CUDA tests) on the GPU", proc.returncode == 0, detail)


def check_large_depthwise(torch, nd) -> None:
    F = torch.nn.functional
    h = w = 32800
    x = torch.randn(1, h, w, 2, device="cuda")
    dw = torch.randn(3, 3, 2, device="cuda")
    log(f"large depthwise: {x.numel():,} elements (> 2**31 = {2**31:,})")
    ours = nd.depthwise(x, dw, padding=1)
    with tf32(False):
        ref = F.conv2d(x.permute(0, 3, 1, 2), dw.permute(2, 0, 1)[:, None], padding=1, groups=2)
    ref = ref.permute(0, 2, 3, 1)
    torch.cuda.synchronize()
    err = (ours - ref).abs().max().item()
    tail = (ours[0, -3:, -3:] - ref[0, -3:, -3:]).abs().max().item()
    del x, ours, ref
    torch.cuda.empty_cache()
    detail = f"max abs err {err:.2e}, last rows {tail:.2e}"
    check("depthwise over > 2**31 elements (1x32800x32800x2)", err < 1e-4 and tail < 1e-4, detail)


def check_interop(torch, nd) -> None:
    x, dw, pw = (torch.from_numpy(a).cuda() for a in layer(3).arrays(4))
    ref = nd.separable(x.cpu().numpy(), dw.cpu().numpy(), pw.cpu().numpy(), padding=1)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        # work queued on s before our call must be seen by it: scale x on the stream first
        x2 = x * 1.0
        y = nd.separable(x2, dw, pw, padding=1)
        out = torch.full_like(y, float("nan"))
        ptr = out.data_ptr()
        y2 = nd.separable(x2, dw, pw, padding=1, out=out)
    s.synchronize()
    ok = isinstance(y, torch.Tensor) and y.device == x.device
    ok = ok and y2 is out and out.data_ptr() == ptr
    err = max(np.abs(y.cpu().numpy() - ref).max(), np.abs(out.cpu().numpy() - ref).max())
    check("torch round trip on a non-default stream (type, out= pointer)", ok and err < 1e-3)
    xg = x.detach().requires_grad_(True)
    try:
        nd.separable(xg, dw, pw, padding=1)
        refused = False
    except TypeError as exc:
        refused = "numba_dsconv.torch" in str(exc)
    with torch.no_grad():
        yg = nd.separable(xg, dw, pw, padding=1)
    check(
        "a tensor that requires grad: refused in grad mode, read under no_grad",
        refused and not yg.requires_grad,
    )
    try:
        import cupy
    except ImportError:
        check("CuPy round trip", True, "(CuPy not installed: skipped)")
        return
    cs = cupy.cuda.Stream(non_blocking=True)
    with cs:
        xc, dwc, pwc = (cupy.asarray(t.cpu().numpy()) for t in (x, dw, pw))
        yc = nd.separable(xc, dwc, pwc, padding=1)
        outc = cupy.full(yc.shape, cupy.nan, dtype=yc.dtype)
        yc2 = nd.separable(xc, dwc, pwc, padding=1, out=outc)
    cs.synchronize()
    errc = max(float(abs(cupy.asnumpy(a) - ref).max()) for a in (yc, outc))
    ok = isinstance(yc, cupy.ndarray) and yc2 is outc and errc < 1e-3
    check("CuPy round trip on a non-default stream", ok, f"err {errc:.2e}")


def check_dask(gpu: bool, nd) -> None:
    """The README's CUDA cluster example: CuPy chunks (on the GPU; NumPy on the CPU smoke run)
    through a dask-cuda LocalCUDACluster (one worker per GPU) where dask-cuda is installed,
    else dask's threaded scheduler; the lazy result must equal the in-memory call bit for bit.
    Unmeasured (no timing)."""
    try:
        import dask.array as da
        import distributed
    except ImportError:
        check("dask", True, "(dask not installed: skipped)")
        return
    x, dw, pw = layer(3).arrays(4)
    to_host = np.asarray
    if gpu:
        try:
            import cupy
        except ImportError:
            check("dask with CuPy chunks", True, "(CuPy not installed: skipped)")
            return
        x, dw, pw = (cupy.asarray(a) for a in (x, dw, pw))
        to_host = cupy.asnumpy
    want = to_host(nd.separable(x, dw, pw, padding=1, stride=2))
    lazy = nd.separable(da.from_array(x, chunks=(1, 20, 28, 128), asarray=False), dw, pw,
                        padding=1, stride=2)  # fmt: skip
    where = "threaded scheduler"
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        LocalCUDACluster = None  # noqa: N806
    if gpu and LocalCUDACluster is not None:
        where = "LocalCUDACluster"
        with LocalCUDACluster() as cluster, distributed.Client(cluster) as client:
            got = client.compute(lazy).result()
    else:
        got = lazy.compute(scheduler="threads")
    got = to_host(got)
    chunk_type = type(lazy._meta).__module__.split(".")[0]
    ok = got.shape == want.shape and got.tobytes() == want.tobytes()
    check(f"dask, {chunk_type} chunks, {where}: equal to the in-memory call bit for bit", ok)


def suite_timings(device: str, batch: int, layers: str, repeat: int) -> None:
    """The suite through the engine: separable and depthwise against the anchors, with one set
    of ceilings; then the separable variants per layer."""
    ceilings = bench.measure_ceilings(device)
    for op in ("separable", "depthwise"):
        result = bench.run_bench(device, batch, layers, op, repeat, ceilings=ceilings)
        RESULTS["runs"].append(result)
        check(f"{op} N={batch}: every result matches float64", result.ok)
    for lay in bench.parse_layers(layers):
        case = bench.Case(lay, "separable", batch, device)
        times, errors = bench.time_variants(case, VARIANTS, repeat)
        RESULTS["variants"][lay.number] = times
        bad = {k: f"{e:.1e}" for k, e in errors.items() if not e <= bench.RTOL_FLOAT32}
        check(f"separable variants of layer {lay.number} match float64", not bad, str(bad or ""))


def train_timings(device: str, batches: list[int], layers: str, repeat: int) -> None:
    """The training step per layer against torch (cuDNN on a GPU, TF32 off), and what
    autograd keeps for MobileNetV1's 13 separable layers."""
    from numba_dsconv.bench import train
    from numba_dsconv.bench.machine import torch_module

    if torch_module() is None:
        check("training step", True, "(torch not installed: skipped)")
        return
    with tf32(False):
        for batch in batches:
            result = train.run_train_bench(device, batch, bench.parse_layers(layers), repeat)
            RESULTS["train"].append(result.to_dict())
            worst = max(r.grad_error for r in result.rows)
            check(f"training step N={batch}: gradients match torch's", worst < 1e-3,
                  f"(largest relative error {worst:.1e})")  # fmt: skip
        saved = train.saved_bytes(batches[-1], device)
    RESULTS["saved_bytes"] = saved
    ratio = saved["ours"]["raw"] / saved["torch"]["raw"]
    check("autograd keeps less than torch for MobileNetV1", ratio < 1, f"({ratio:.2f}x)")


def chain_timing(device: str, batch: int, layers: int, repeat: int) -> None:
    """One training step of MobileNetV1's first ``layers`` separable layers in a chain, ours
    against torch's (``bench.train.time_chain``: interleaved in this process), TF32 off."""
    from numba_dsconv.bench import train
    from numba_dsconv.bench.machine import torch_module

    if torch_module() is None:
        check("training chain", True, "(torch not installed: skipped)")
        return
    with tf32(False):
        step = train.time_chain(batch, device, layers, repeat)
    RESULTS["chain"] = {"device": device, "batch": batch, **dataclasses.asdict(step)}


def print_tables() -> None:
    from rich.console import Console

    console = Console(width=200)
    for result in RESULTS["runs"]:
        for line in report.headline(result):
            console.print(line, markup=False)
        console.print(report.rich_table(result))
    if RESULTS["variants"]:
        labels = [label for label, _ in VARIANTS]
        log("separable variants, time / shipped time (below 1: the variant is faster):")
        log(f"{'layer':>5} " + " ".join(f"{lab:>18}" for lab in labels))
        for number, v in RESULTS["variants"].items():
            log(f"{number:>5} " + " ".join(f"{v[lab] / v['shipped']:>18.3f}" for lab in labels))
    for label, times in RESULTS["call_breakdown"].items():
        cells = ", ".join(f"{k} {t * 1e6:.1f}" for k, t in times.items())
        log(f"Python call, {label} (median, us): {cells}")
    for run in RESULTS["train"]:
        log(f"training step, N={run['batch']}, {run['device']} (median ms; ours / torch):")
        for r in run["rows"]:
            log(
                f"  layer {r['layer']:>2} {r['name']:<26} ours {r['ours_s'] * 1e3:8.3f}  torch "
                f"{r['torch_s'] * 1e3:8.3f}  {r['ratio']:5.2f}x  grad err {r['grad_error']:.1e}"
            )
        log(f"  geometric mean {run['geomean_ratio']:.2f}x")
    if "chain" in RESULTS:
        c = RESULTS["chain"]
        log(
            f"training step of MobileNetV1's first {c['layers']} separable layers in a chain, "
            f"N={c['batch']}, {c['device']} (median ms): ours {c['ours_s'] * 1e3:.3f}, torch "
            f"{c['torch_s'] * 1e3:.3f} ({c['ratio']:.2f}x)"
        )
    if "saved_bytes" in RESULTS:
        o, t = RESULTS["saved_bytes"]["ours"], RESULTS["saved_bytes"]["torch"]
        log(
            f"saved for backward (MobileNetV1, 13 layers): ours {o['raw'] / 2**20:.1f} MiB, "
            f"torch {t['raw'] / 2**20:.1f} MiB ({o['raw'] / t['raw']:.2f}x)"
        )
    failed = [k for k, v in RESULTS["checks"].items() if not v["ok"]]
    log(
        f"checks: {len(RESULTS['checks']) - len(failed)} passed, {len(failed)} failed"
        + (f": {failed}" if failed else "")
    )


def write_json(path: str) -> None:
    out = dict(RESULTS, runs=[r.to_dict() for r in RESULTS["runs"]])
    with open(path, "w") as fh:
        json.dump(report.json_ready(out), fh, indent=1, default=float)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--skip-tests", action="store_true", help="skip the pytest run")
    ap.add_argument("--skip-large", action="store_true", help="skip the > 2**31 check")
    ap.add_argument("--skip-forward", action="store_true", help="skip the forward timings")
    ap.add_argument("--train-batches", default="8,64", help="batches of the training step")
    ap.add_argument("--train-layers", default="1-7", help="layers of the training step")
    ap.add_argument("--train-chain", type=int, default=13,
                    help="MobileNetV1 layers in the chain's training step (0: none)")  # fmt: skip
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--layers", default="1-11")
    ap.add_argument("--device", default="cuda", help="cpu: smoke-test this script's flow")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    args = ap.parse_args(argv)
    import numba_dsconv as nd

    gpu = args.device == "cuda"
    steps = []
    if gpu:
        import torch

        log(f"torch {torch.__version__}, GPU {torch.cuda.get_device_name()}")
        if not args.skip_tests:
            steps.append(("cuda tests", run_cuda_tests))
        steps.append(("interop", lambda: check_interop(torch, nd)))
        if not args.skip_large:
            steps.append(("> 2**31 elements", lambda: check_large_depthwise(torch, nd)))
    repeat = 5 if args.quick else 15

    def timings() -> None:
        suite_timings(args.device, args.batch, args.layers, repeat)

    def breakdown() -> None:
        case = bench.Case(layer(7), "separable", 1, args.device)
        RESULTS["call_breakdown"]["N=1, layer 7"] = bench.call_breakdown(case)

    def training() -> None:
        batches = [int(b) for b in args.train_batches.split(",") if b]
        train_timings(args.device, batches, args.train_layers, repeat)

    steps.append(("dask", lambda: check_dask(gpu, nd)))
    if not args.skip_forward:
        steps += [("timings", timings), ("N=1 call", breakdown)]
    steps.append(("training step", training))
    if args.train_chain:
        batch = int(args.train_batches.split(",")[0])

        def chain() -> None:
            chain_timing(args.device, batch, args.train_chain, repeat)

        steps.append(("training chain", chain))
    for name, fn in steps:
        try:
            fn()
        except Exception:
            check(f"{name} ran without an exception", False, traceback.format_exc(limit=4))
    write_json(args.json)
    print_tables()
    return 0 if all(v["ok"] for v in RESULTS["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
