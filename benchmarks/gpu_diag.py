"""Where the CUDA time goes: the kernels alone versus the Python call around them.

    PYTHONPATH=$PWD python3 benchmarks/gpu_diag.py [--batch 64] [--layers 1-11]

gpu_check.py times back-to-back calls, which on a machine with slow driver calls can measure
the host's launch path instead of the GPU. This script separates the two:

1. kernel time: the stream is kept busy by a sleep kernel (torch.cuda._sleep) while the host
   enqueues REPS launches between two CUDA events, so the events time the GPU's work alone,
   for our bare kernel launch and for cuDNN (F.conv2d, channels_last, TF32 off);
2. the host's share of one call: a cProfile of the N=1 layer 7 separable call.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch

from numba_dsconv import bench
from numba_dsconv.bench.machine import tf32
from numba_dsconv.bench.suite import layer

REPS = 20


def gpu_time(fn, reps: int = REPS, rounds: int = 5) -> tuple[float, float]:
    """(median GPU seconds per call with the host's enqueue hidden, host seconds per enqueue)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times, hosts = [], []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(60_000_000)  # ~30 ms of GPU time at 2 GHz: the host enqueues behind it
        a.record()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        host = (time.perf_counter() - t0) / reps
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / reps)
        hosts.append(host)
    return statistics.median(times), statistics.median(hosts)


def kernel_table(batch: int, layers: str) -> None:
    print(f"kernel time only (GPU busy while the host enqueues), N={batch}, us")
    print(f"{'op':>10} {'layer':>5} {'ours':>9} {'cuDNN fp32':>11} {'ours/cuDNN':>10} "
          f"{'host us/launch':>14}")  # fmt: skip
    for op in ("separable", "depthwise"):
        for lay in bench.parse_layers(layers):
            case = bench.Case(lay, op, batch, "cuda")
            launch, _ = case.bare_launch()
            ours, host = gpu_time(launch)
            fns = case.torch_fns()
            theirs_fn, _ = fns["torch_fp32"]
            with tf32(False):
                theirs, _ = gpu_time(theirs_fn)
            print(f"{op:>10} {lay.number:>5} {ours * 1e6:>9.1f} {theirs * 1e6:>11.1f} "
                  f"{ours / theirs:>10.2f} {host * 1e6:>14.1f}")  # fmt: skip


def host_profile() -> None:
    case = bench.Case(layer(7), "separable", 1, "cuda")
    fn, sync = case.numba_fn()
    launch, _ = case.bare_launch()
    for _ in range(50):
        fn()
        launch()
    sync()
    for name, f in (("call", fn), ("bare launch", launch)):
        walls = []
        for _ in range(200):
            t0 = time.perf_counter()
            f()
            walls.append(time.perf_counter() - t0)
        sync()
        print(f"host {name}: median {statistics.median(walls) * 1e6:.1f} us")
    for name, f in (("call", fn), ("bare launch", launch)):
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            f()
        prof.disable()
        sync()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
        print(f"---- cProfile, 200 x {name} (tottime)")
        print("\n".join(s.getvalue().splitlines()[6:32]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--layers", default="1-11")
    args = ap.parse_args()
    try:
        import numba_cuda

        print("numba-cuda", getattr(numba_cuda, "__version__", "?"))
    except ImportError:
        pass
    host_profile()
    kernel_table(1, "7")
    kernel_table(args.batch, args.layers)


if __name__ == "__main__":
    main()
