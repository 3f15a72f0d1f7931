"""The GPU proof of the CUDA backend, in one run on a CUDA machine.

    PYTHONPATH=$PWD python3 benchmarks/gpu_check.py [--quick] [--json FILE] [--skip-tests]

With the project on PYTHONPATH (torch, numba-cuda and optionally CuPy installed), it

1. runs the CUDA test module for real (tests/test_cuda_kernels.py, small and default blocks),
2. compares every operation with torch.nn.functional.conv2d on the GPU over random
   configurations (fp32 with TF32 off, and fp64),
3. checks a depthwise over more than 2**31 elements (1 x 32800 x 32800 x 2, NHWC) against
   cuDNN, so 64-bit indexing is exercised for real,
4. checks zero-copy round trips for torch and CuPy inputs on a non-default stream (result type,
   device, data pointer of out=, ordering on the caller's stream),
5. times the MobileNet suite at N=64 against cuDNN in the same run (strict fp32 with TF32 off,
   and torch's default), with the fp32 roofline from a measured SGEMM and device copy; each
   call timed alone and back to back; the separable kernel also under the VARIANTS settings
   (flat / halo tiles, no launch bounds, a larger tile) so one run shows which is faster,
6. times the whole Python call at N=1 on layer 7 (returning, synchronised, with out=, and the
   bare kernel launch it ends in),

and prints short tables last. Exit status 1 if any check failed. (Not yet run on a GPU: its
duration is unknown; most of it should be kernel compilation. --skip-tests and --layers
shorten it.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback

import numpy as np

RESULTS: dict = {"checks": {}, "timings": [], "ceilings": {}}
DEVICE = "cuda"  # a CPU smoke test of the comparison logic sets "cpu"


def log(msg: str) -> None:
    print(msg, flush=True)


def check(name: str, ok: bool, detail: str = "") -> bool:
    RESULTS["checks"][name] = {"ok": bool(ok), "detail": detail}
    log(f"[{'PASS' if ok else 'FAIL'}] {name} {detail}")
    return ok


# ----------------------------------------------------------------------------------------------
# 1. the CUDA tests, for real


def run_cuda_tests() -> None:
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "tests/test_cuda_kernels.py"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    check(
        "pytest tests/test_cuda_kernels.py on the GPU",
        proc.returncode == 0,
        f"({time.perf_counter() - t0:.0f} s) " + " | ".join(tail),
    )


# ----------------------------------------------------------------------------------------------
# 2. every op against torch on the GPU


def torch_ops(torch):
    F = torch.nn.functional

    def t_depthwise(x, dw, stride, pad, dil):  # x NHWC tensor, dw (KH,KW,C,M)
        kh, kw, c, m = dw.shape
        w = dw.permute(2, 3, 0, 1).reshape(c * m, 1, kh, kw)
        xn = F.pad(x.permute(0, 3, 1, 2), (pad[2], pad[3], pad[0], pad[1]))
        return F.conv2d(xn, w, stride=stride, dilation=dil, groups=c).permute(0, 2, 3, 1)

    def t_pointwise(y, pw):
        return F.conv2d(y.permute(0, 3, 1, 2), pw.t()[:, :, None, None]).permute(0, 2, 3, 1)

    def t_conv2d(x, w, stride, pad, dil):
        xn = F.pad(x.permute(0, 3, 1, 2), (pad[2], pad[3], pad[0], pad[1]))
        return F.conv2d(xn, w.permute(3, 2, 0, 1), stride=stride, dilation=dil).permute(0, 2, 3, 1)

    return t_depthwise, t_pointwise, t_conv2d


def compare_with_torch(torch, nd, n_configs: int) -> None:
    from numba_dsconv._spec import padding_amounts

    t_dw, t_pw, t_conv = torch_ops(torch)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    rng = np.random.default_rng(7)
    worst = {}
    for cfg in range(n_configs):
        k = int(rng.integers(1, 8))
        kw_ = int(rng.choice([k, max(1, k - 1)]))
        s = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        dil = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
        m = int(rng.choice([1, 2]))
        c = int(rng.integers(1, 40))
        co = int(rng.integers(1, 70))
        n = int(rng.integers(1, 4))
        h, w = int(rng.integers(k * 2, 40)), int(rng.integers(k * 2, 40))
        padding = [0, "same", (int(rng.integers(0, 3)), int(rng.integers(0, 3)))][cfg % 3]
        dtype = torch.float32 if cfg % 4 else torch.float64
        x = torch.randn(n, h, w, c, device=DEVICE, dtype=dtype)
        dw = torch.randn(k, kw_, c, m, device=DEVICE, dtype=dtype)
        pw = torch.randn(c * m, co, device=DEVICE, dtype=dtype)
        wc = torch.randn(k, kw_, c, co, device=DEVICE, dtype=dtype)
        ym = torch.randn(n, h, w, c * m, device=DEVICE, dtype=dtype)
        b = torch.randn(co, device=DEVICE, dtype=dtype)
        pad = padding_amounts(padding, (h, w), (k, kw_), s, dil)
        geo = dict(stride=s, padding=padding, dilation=dil)
        cases = {
            "depthwise": (nd.depthwise(x, dw, **geo), t_dw(x, dw, s, pad, dil), k * kw_),
            "pointwise": (nd.pointwise(ym, pw, bias=b), t_pw(ym, pw) + b, c * m),
            "conv2d": (nd.conv2d(x, wc, **geo), t_conv(x, wc, s, pad, dil), k * kw_ * c),
            "separable": (
                nd.separable(x, dw, pw, **geo, bias=b, activation="relu6"),
                torch.clamp(t_pw(t_dw(x, dw, s, pad, dil), pw) + b, 0, 6),
                k * kw_ * c * m,
            ),
        }
        for op, (ours, ref, red) in cases.items():
            assert isinstance(ours, torch.Tensor) and ours.device == x.device, f"{op}: {type(ours)}"
            err = (ours - ref).abs().max().item() / (ref.abs().max().item() + 1e-30)
            key = f"{op} {str(dtype).split('.')[-1]}"
            worst[key] = max(worst.get(key, 0.0), err / math.sqrt(red))
    tol = {"float32": 2e-6, "float64": 1e-13}  # max relative error per sqrt(reduction length)
    for key, err in sorted(worst.items()):
        check(
            f"vs torch conv2d on {DEVICE}: {key} ({n_configs} configs)",
            err < tol[key.split()[1]],
            f"worst rel err/sqrt(K) {err:.2e}",
        )


# ----------------------------------------------------------------------------------------------
# 3. more than 2**31 elements


def check_large_depthwise(torch, nd) -> None:
    h = w = 32800
    c = 2
    torch.backends.cudnn.allow_tf32 = False
    x = torch.randn(1, h, w, c, device="cuda")
    dw = torch.randn(3, 3, c, device="cuda")
    log(f"large depthwise: {x.numel():,} elements (> 2**31 = {2**31:,})")
    ours = nd.depthwise(x, dw, padding=1)
    t_dw, _, _ = torch_ops(torch)
    ref = t_dw(x, dw[..., None], (1, 1), (1, 1, 1, 1), (1, 1))
    torch.cuda.synchronize()
    err = (ours - ref).abs().max().item()
    tail = (ours[0, -3:, -3:] - ref[0, -3:, -3:]).abs().max().item()
    del x, ours, ref
    torch.cuda.empty_cache()
    check(
        "depthwise over > 2**31 elements (1x32800x32800x2)",
        err < 1e-4 and tail < 1e-4,
        f"max abs err {err:.2e}, last rows {tail:.2e}",
    )


# ----------------------------------------------------------------------------------------------
# 4. zero-copy round trips on a non-default stream


def check_interop(torch, nd) -> None:
    from numba_dsconv.suite import layer

    lay = layer(3)
    x, dw, pw = (torch.from_numpy(a).cuda() for a in lay.arrays(4))
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
    ok = (
        isinstance(y, torch.Tensor) and y.device == x.device and y2 is out and out.data_ptr() == ptr
    )
    err = max(np.abs(y.cpu().numpy() - ref).max(), np.abs(out.cpu().numpy() - ref).max())
    check(
        "torch round trip on a non-default stream (type, device, out= pointer)",
        ok and err < 1e-3,
        f"err {err:.2e}",
    )
    xg = x.detach().requires_grad_(True)
    yg = nd.separable(xg, dw, pw, padding=1)
    check(
        "torch tensor that requires grad is accepted (detached)",
        isinstance(yg, torch.Tensor) and not yg.requires_grad,
    )
    try:
        import cupy
    except ImportError:
        check("CuPy round trip", True, "(CuPy not installed: skipped)")
        return
    cs = cupy.cuda.Stream(non_blocking=True)
    with cs:
        xc = cupy.asarray(x.cpu().numpy())
        yc = nd.separable(
            xc, cupy.asarray(dw.cpu().numpy()), cupy.asarray(pw.cpu().numpy()), padding=1
        )
        outc = cupy.full(yc.shape, cupy.nan, dtype=yc.dtype)
        yc2 = nd.separable(
            xc, cupy.asarray(dw.cpu().numpy()), cupy.asarray(pw.cpu().numpy()), padding=1, out=outc
        )
    cs.synchronize()
    errc = max(float(abs(cupy.asnumpy(yc) - ref).max()), float(abs(cupy.asnumpy(outc) - ref).max()))
    check(
        "CuPy round trip on a non-default stream",
        isinstance(yc, cupy.ndarray) and yc2 is outc and errc < 1e-3,
        f"err {errc:.2e}",
    )


# ----------------------------------------------------------------------------------------------
# 5. timings against cuDNN


def _event_time(torch, fn, reps: int) -> float:
    """Median seconds of fn() measured with CUDA events on the current stream."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return statistics.median(times)


def _pipelined_time(torch, fn, reps: int) -> float:
    """Seconds per call of ``reps`` back-to-back calls between two events: the Python work of
    a call overlaps the previous call's kernel, so this is the GPU-bound throughput, where
    _event_time (one call between its events) also counts a launch the GPU waits for."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a = torch.cuda.Event(enable_timing=True)
    b = torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e-3 / reps


def measure_ceilings(torch) -> tuple[float, float]:
    torch.backends.cuda.matmul.allow_tf32 = False
    mats = [torch.randn(8192, 8192, device="cuda") for _ in range(2)]
    t = _event_time(torch, lambda: mats[0] @ mats[1], 10)
    sgemm = 2 * 8192**3 / t
    bufs = [torch.randn(512 * 1024 * 1024, device="cuda")]  # 2 GiB
    bufs.append(torch.empty_like(bufs[0]))
    t = _event_time(torch, lambda: bufs[1].copy_(bufs[0]), 10)
    bw = 2 * bufs[0].numel() * 4 / t
    mats.clear()
    bufs.clear()
    torch.cuda.empty_cache()
    RESULTS["ceilings"] = {"sgemm_fp32_flops": sgemm, "copy_bytes_per_s": bw}
    return sgemm, bw


def _layer_fns(torch, nd, lay, xr, dw, pw):
    """The four timed callables of one layer, rotating over the input copies ``xr``."""
    F = torch.nn.functional
    xcl = [t.permute(0, 3, 1, 2) for t in xr]  # channels_last NCHW views of the NHWC data
    wdw = dw.permute(2, 0, 1)[:, None].contiguous(memory_format=torch.channels_last)
    wpw = pw.t()[:, :, None, None].contiguous(memory_format=torch.channels_last)
    it = [0]

    def nxt() -> int:
        it[0] = (it[0] + 1) % len(xr)
        return it[0]

    def ours_sep():
        return nd.separable(xr[nxt()], dw, pw, stride=lay.stride, padding=1)

    def ours_dw():
        return nd.depthwise(xr[nxt()], dw, stride=lay.stride, padding=1)

    def torch_sep():
        y = F.conv2d(xcl[nxt()], wdw, stride=lay.stride, padding=1, groups=lay.c_in)
        return F.conv2d(y, wpw)

    def torch_dw():
        return F.conv2d(xcl[nxt()], wdw, stride=lay.stride, padding=1, groups=lay.c_in)

    return ours_sep, ours_dw, torch_sep, torch_dw


# Alternatives to the shipped CUDA settings, timed beside them so one GPU run can say which is
# faster: (label, {_config knob: value}).
VARIANTS = (
    ("flat tiles", {"CUDA_HALO": "never"}),
    ("halo tiles", {"CUDA_HALO": "always"}),
    ("no launch bounds", {"CUDA_GEMM_REGISTERS": 0}),
    # 8 x 4 outputs per thread need more than 128 registers: one block per multiprocessor
    ("tile 128x64 r8x4", {"CUDA_GEMM_TILE": (128, 64, 8, 8, 4), "CUDA_GEMM_REGISTERS": 255}),
)


def separable_variants(torch, fn, reps: int) -> dict[str, float]:
    """Median seconds of ``fn`` under each VARIANTS setting (the shipped ones restored)."""
    from numba_dsconv import _config

    out = {}
    for label, knobs in VARIANTS:
        saved = {k: getattr(_config, k) for k in knobs}
        try:
            for k, v in knobs.items():
                setattr(_config, k, v)
            out[label] = _event_time(torch, fn, reps)
        finally:
            for k, v in saved.items():
                setattr(_config, k, v)
    return out


def n1_call_times(nd, cuda) -> dict[str, float]:
    """Layer 7 at N=1 on numba device arrays: median wall seconds of (a) the call until it
    returns (the launch is asynchronous), (b) the call and a device synchronise, (c) the same
    with out= (no allocation), (d) the bare configured-kernel launch the call ends in, with
    the same arguments (so (a) - (d) is this library's Python work)."""
    from numba_dsconv.cuda import backend as cb
    from numba_dsconv.suite import layer

    lay = layer(7)
    xs, dws, pws = lay.arrays(1)
    xd, dwd, pwd = cuda.to_device(xs), cuda.to_device(dws), cuda.to_device(pws)
    outd = nd.separable(xd, dwd, pwd, padding=1)
    captured = {}
    real_plan = cb.CudaBackend._plan

    class Recorder:  # stands in for the kernel build: records the configured launch
        def __init__(self, kern):
            self.kern = kern

        def __getitem__(self, config):
            launch = self.kern[config]

            def record(*args):
                captured["call"] = (launch, args)
                return launch(*args)

            return record

    def spy(self, spec, dtype):
        kern, blocks, threads, ints = real_plan(self, spec, dtype)
        return Recorder(kern), blocks, threads, ints

    cb.CudaBackend._plan = spy
    try:
        nd.separable(xd, dwd, pwd, padding=1)
    finally:
        cb.CudaBackend._plan = real_plan
    launch, args = captured["call"]

    def med(fn, sync_inside: bool) -> float:
        for _ in range(20):
            fn()
        cuda.synchronize()
        walls = []
        for _ in range(300):
            t0 = time.perf_counter()
            fn()
            if sync_inside:
                cuda.synchronize()
            walls.append(time.perf_counter() - t0)
            if not sync_inside:
                cuda.synchronize()
        return statistics.median(walls)

    return {
        "call": med(lambda: nd.separable(xd, dwd, pwd, padding=1), False),
        "call+sync": med(lambda: nd.separable(xd, dwd, pwd, padding=1), True),
        "call out=": med(lambda: nd.separable(xd, dwd, pwd, padding=1, out=outd), False),
        "bare launch": med(lambda: launch(*args), False),
        "bare launch+sync": med(lambda: launch(*args), True),
    }


def suite_timings(torch, nd, batch: int, reps: int, layers) -> list[dict]:
    from numba import cuda

    from numba_dsconv.suite import LAYERS

    sgemm, bw = measure_ceilings(torch)
    log(f"ceilings: SGEMM fp32 {sgemm / 1e12:.1f} TFLOP/s, copy {bw / 1e9:.0f} GB/s")
    rows = []
    for lay in LAYERS:
        if lay.number not in layers:
            continue
        xs, dws, pws = lay.arrays(batch)
        x_bytes = xs.nbytes
        nrot = max(1, min(8, math.ceil(200e6 / x_bytes)))  # rotate inputs past the L2 cache
        xr = [torch.from_numpy(xs).cuda() * (1 + 0.01 * i) for i in range(nrot)]
        dw, pw = torch.from_numpy(dws).cuda(), torch.from_numpy(pws).cuda()
        ours_sep, ours_dw, torch_sep, torch_dw = _layer_fns(torch, nd, lay, xr, dw, pw)
        res = {"layer": lay.number, "name": lay.name, "batch": batch}
        with torch.inference_mode():
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            res["ours_sep_s"] = _event_time(torch, ours_sep, reps)
            res["cudnn_fp32_sep_s"] = _event_time(torch, torch_sep, reps)
            res["ours_dw_s"] = _event_time(torch, ours_dw, reps)
            res["cudnn_dw_s"] = _event_time(torch, torch_dw, reps)
            torch.backends.cudnn.allow_tf32 = True  # torch's defaults
            res["cudnn_default_sep_s"] = _event_time(torch, torch_sep, reps)
            torch.backends.cudnn.allow_tf32 = False
            res["variants_s"] = separable_variants(torch, ours_sep, reps)
            res["ours_sep_pipelined_s"] = _pipelined_time(torch, ours_sep, reps)
            res["cudnn_fp32_sep_pipelined_s"] = _pipelined_time(torch, torch_sep, reps)
        c = nd.cost((batch, lay.hw, lay.hw, lay.c_in), 3, lay.c_out, stride=lay.stride, padding=1)
        oh, ow = c.output_shape[1:3]
        flops = 2 * c.separable_macs
        nbytes = 4 * (xs.size + dws.size + pws.size + batch * oh * ow * lay.c_out)
        floor = max(flops / sgemm, nbytes / bw)
        dw_bytes = 4 * (xs.size + dws.size + batch * oh * ow * lay.c_in)
        res.update(
            roofline_floor_s=floor,
            pct_roofline=100 * floor / res["ours_sep_s"],
            ratio_fp32=res["ours_sep_s"] / res["cudnn_fp32_sep_s"],
            ratio_default=res["ours_sep_s"] / res["cudnn_default_sep_s"],
            ratio_dw=res["ours_dw_s"] / res["cudnn_dw_s"],
            dw_pct_copy_bw=100 * dw_bytes / res["ours_dw_s"] / bw,
        )
        rows.append(res)
        log(
            f"layer {lay.number}: ours {res['ours_sep_s'] * 1e6:.0f} us, cuDNN fp32 "
            f"{res['cudnn_fp32_sep_s'] * 1e6:.0f} us, "
            f"default {res['cudnn_default_sep_s'] * 1e6:.0f} us"
        )
        xr.clear()
        torch.cuda.empty_cache()
    # the whole Python call at N=1 on device arrays (layer 7)
    RESULTS["timings"] = rows
    RESULTS["n1_layer7_wall_s"] = n1_call_times(nd, cuda)
    return rows


def print_table(rows: list[dict]) -> None:
    import torch

    log("")
    log(
        f"GPU: {torch.cuda.get_device_name()}  (torch {torch.__version__}, N={rows[0]['batch']})"
        if rows
        else "no timings"
    )
    hdr = (
        f"{'layer':>5} {'ours sep us':>11} {'cuDNN fp32':>10} {'ratio':>6} {'cuDNN def':>9} "
        f"{'ratio':>6} {'%roof':>6} {'ours dw':>8} {'cuDNN dw':>8} {'ratio':>6} {'dw %bw':>6}"
    )
    log(hdr)
    for r in rows:
        log(
            f"{r['layer']:>5} {r['ours_sep_s'] * 1e6:>11.0f} {r['cudnn_fp32_sep_s'] * 1e6:>10.0f} "
            f"{r['ratio_fp32']:>6.2f} {r['cudnn_default_sep_s'] * 1e6:>9.0f} "
            f"{r['ratio_default']:>6.2f} {r['pct_roofline']:>6.1f} {r['ours_dw_s'] * 1e6:>8.0f} "
            f"{r['cudnn_dw_s'] * 1e6:>8.0f} {r['ratio_dw']:>6.2f} {r['dw_pct_copy_bw']:>6.1f}"
        )
    if rows and "ours_sep_pipelined_s" in rows[0]:
        log("separable, back-to-back calls (us per call; Python overlapped with the GPU):")
        log(f"{'layer':>5} {'ours':>8} {'cuDNN fp32':>10} {'ratio':>6}")
        for r in rows:
            o, c = r["ours_sep_pipelined_s"], r["cudnn_fp32_sep_pipelined_s"]
            log(f"{r['layer']:>5} {o * 1e6:>8.0f} {c * 1e6:>10.0f} {o / c:>6.2f}")
    if rows and "variants_s" in rows[0]:
        labels = list(rows[0]["variants_s"])
        log("separable variants, time / shipped time (below 1: the variant is faster):")
        log(f"{'layer':>5} " + " ".join(f"{lab:>18}" for lab in labels))
        for r in rows:
            v = r["variants_s"]
            cells = " ".join(f"{v[lab] / r['ours_sep_s']:>18.3f}" for lab in labels)
            log(f"{r['layer']:>5} {cells}")
    if "n1_layer7_wall_s" in RESULTS:
        w = RESULTS["n1_layer7_wall_s"]
        log(
            "Python call, N=1, layer 7, numba device arrays (median of 300, us): "
            + ", ".join(f"{k} {v * 1e6:.1f}" for k, v in w.items())
        )
    failed = [k for k, v in RESULTS["checks"].items() if not v["ok"]]
    log(
        f"checks: {len(RESULTS['checks']) - len(failed)} passed, {len(failed)} failed"
        + (f": {failed}" if failed else "")
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer configs and repetitions")
    ap.add_argument("--skip-tests", action="store_true", help="skip the pytest run")
    ap.add_argument("--skip-large", action="store_true", help="skip the > 2**31 check")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--layers", default="1,2,3,4,5,6,7,8,9,10,11")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    args = ap.parse_args()
    import torch

    import numba_dsconv as nd

    log(f"torch {torch.__version__}, GPU {torch.cuda.get_device_name()}")
    steps = []
    if not args.skip_tests:
        steps.append(("cuda tests", run_cuda_tests))
    steps += [
        ("torch comparison", lambda: compare_with_torch(torch, nd, 12 if args.quick else 60)),
        ("interop", lambda: check_interop(torch, nd)),
    ]
    if not args.skip_large:
        steps.append(("> 2**31 elements", lambda: check_large_depthwise(torch, nd)))
    layers = [int(v) for v in args.layers.split(",")]
    rows: list[dict] = []

    def timing() -> None:
        rows.extend(suite_timings(torch, nd, args.batch, 20 if args.quick else 100, layers))

    steps.append(("timings", timing))
    for name, fn in steps:
        try:
            fn()
        except Exception:
            check(f"{name} ran without an exception", False, traceback.format_exc(limit=4))
    with open(args.json, "w") as fh:
        json.dump(RESULTS, fh, indent=1, default=float)
    print_table(rows)
    return 0 if all(v["ok"] for v in RESULTS["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
