"""Regenerate BENCHMARKS.md: ``python benchmarks/make_benchmarks_md.py`` (repository root).

Runs ``numba_dsconv.bench.run_bench`` on the CPU for layers 1-11 at N=1 and N=8 for every
operation (separable first), against the PyTorch anchors when torch is installed, with the
ceilings measured once at the start, and writes the markdown tables (and, with --json-dir,
every number as JSON). A few minutes on 2 cores. Not an asv benchmark: asv imports this module
during discovery and finds nothing to run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    except OSError:
        return ""
    return out.stdout.strip()


def _peers_section(
    batches: list[int], layers: str, rounds: int, console, fma: float, op: str = "separable"
) -> list[str]:
    """``op`` (the separable layer, or its 3x3 standard convolution: conv2d) against the CPU
    runtimes installed (bench/peers.py); ``fma``: the FMA peak measured in this run."""
    import numba

    from numba_dsconv import bench
    from numba_dsconv.bench import peers

    runtimes = peers.available()
    if rounds <= 0 or len(runtimes) < 2:
        return []
    numbers = [lay.number for lay in bench.parse_layers(layers)]
    flag = "" if op == "separable" else f" --op {op}"
    what = "the pointwise weights" if op == "separable" else "the weights"
    model = "model" if op == "separable" else "model (one Conv)"
    out = [
        f"## {op} against the CPU runtimes (`numba-dsconv bench --peers{flag}`)",
        "",
        f"Each runtime in its own worker processes ({', '.join(runtimes)}), {rounds} "
        "alternating rounds, per layer the best of the rounds' medians of 9 calls after 5 "
        "warm-up calls, every output checked against float64 (an error above 1e-4 would be "
        "printed next to its time); "
        f"{numba.get_num_threads()} threads each; ONNX Runtime on an NCHW ONNX {model}, "
        "OpenVINO on the same model with NHWC input and output and f32 precision, LiteRT "
        "(XNNPACK, its CPU delegate) on a TFLite model of the same operators, NHWC, with "
        "TensorFlow's 'same' padding (at stride 2 the odd extra row after: the same work, its "
        "own float64 reference), torch "
        f"channels_last; `numba_dsconv+pack`: ours with {what} packed once "
        "(`numba_dsconv.pack`), as the other runtimes pack theirs when they load the "
        "model. Microseconds; `vs fastest` (`packed vs fastest`) = ours (packed) / the fastest "
        "other runtime (below 1: numba_dsconv leads); `% FMA packed` = ours' GFLOP/s (packed) "
        "/ the FMA peak of this run: our rate in a process of its own, where the per-op "
        "tables' rate is measured beside torch's thread pool.",
        "",
    ]
    for n in batches:
        console.print(f"peers {op} N={n}")
        best = peers.run_peers(n, numbers, runtimes, numba.get_num_threads(), rounds, op=op)
        rows = peers.table(best, numbers, op=op, batch=n, fma_gflops=fma)
        ratio_cols = peers.ratio_columns(runtimes)
        head = ["#", *runtimes, *ratio_cols, *peers.fma_columns(runtimes, fma)]
        out += [f"### N={n}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        gms = [
            f"`{col}` {peers.geomean([float(r[1 + len(runtimes) + i]) for r in rows]):.2f}"
            for i, col in enumerate(ratio_cols)
        ]
        worst = max(err for runs in best.values() for _, err in runs.values())
        out += ["", f"Geometric means: {', '.join(gms)}. Largest relative error against "
                f"float64, any runtime and layer: {worst:.1e}.", ""]  # fmt: skip
    return out


def _train_section(batches: list[int], layers: str, console) -> list[str]:
    """One training step per layer, ours against torch's (``numba-dsconv bench --pass train``),
    one of MobileNetV1's 13 separable layers in a chain, and what autograd keeps for that
    chain (bench/train.py); nothing without torch."""
    from numba_dsconv import bench
    from numba_dsconv.bench import train
    from numba_dsconv.bench.machine import torch_module

    if torch_module() is None:
        return []
    out = [
        "## training step (`numba-dsconv bench --pass train`)",
        "",
        "Forward + backward with the gradients of x, both weights and both biases, through "
        "`numba_dsconv.torch.separable` against torch's `Conv2d(groups=C)` + `Conv2d(1x1)` on "
        "channels_last tensors, the same thread count, each side in its own worker processes, "
        "5 alternating rounds, the best of the rounds' medians (in one process the two OpenMP "
        "pools disturbed each other); ms. "
        "`ours / torch` below 1: ours is faster; `grad error` = the largest difference of any "
        "gradient from torch's, relative to its largest value.",
        "",
    ]
    for n in batches:
        console.print(f"training step N={n}")
        result = train.run_train_bench("cpu", n, bench.parse_layers(layers),
                                       chain=len(train.MOBILENET_V1))  # fmt: skip
        out += [f"### N={n}", "", "| # | layer | ours ms | torch ms | ours / torch | grad error |",
                "|---|---|---|---|---|---|"]  # fmt: skip
        out += [f"| {r.layer} | {r.name} | {r.ours_s * 1e3:.3f} | {r.torch_s * 1e3:.3f} | "
                f"{r.ratio:.2f} | {r.grad_error:.1e} |" for r in result.rows]  # fmt: skip
        c = result.chain
        out += ["", f"Geometric mean of `ours / torch`: {result.geomean:.2f}. One training "
                f"step of MobileNetV1's {c.layers} separable layers in a chain (relu6 after each "
                f"stage, the input needing no gradient), timed as the layers: ours "
                f"{c.ours_s * 1e3:.1f} ms, torch {c.torch_s * 1e3:.1f} ms ({c.ratio:.2f}x).",
                ""]  # fmt: skip
    saved = train.saved_bytes(8)
    ours, theirs = saved["ours"]["raw"], saved["torch"]["raw"]
    out += [f"Saved for the backward by MobileNetV1's 13 separable layers (relu6 after each "
            f"stage) at N=8: ours {ours / 2**20:.1f} MiB, torch {theirs / 2**20:.1f} MiB "
            f"({ours / theirs:.2f}x).", ""]  # fmt: skip
    return out


def _python_share_section(layers: str, console) -> list[str]:
    """The library's own time per call: each separable layer's call at N=1, whole and inside
    its kernel (``numba-dsconv bench --python-share``)."""
    import numba

    from numba_dsconv import bench

    console.print("python share")
    rows = bench.python_share(bench.parse_layers(layers), "separable", 1)
    shares = [r.python_s * 1e6 for r in rows]
    return [
        "## the Python share of a call (`numba-dsconv bench --python-share`)",
        "",
        f"separable, N=1, {numba.get_num_threads()} threads: the public call (weights packed "
        "once beforehand), 300 calls, each timed whole and inside its kernel's dispatcher "
        "(wrapped for the measurement), medians; µs. `python` = the median of each call's "
        "time less its kernel's: the library's work per call (the fast path's lookup, the "
        "plan, the result's allocation, the call into the kernel), as it runs between kernels, "
        "from cold caches.",
        "",
        "| # | layer | call | kernel | python |",
        "|---|---|---|---|---|",
        *("| " + " | ".join(r.cells()) + " |" for r in rows),
        "",
        f"Python share: median {statistics.median(shares):.1f} µs, largest {max(shares):.1f} µs.",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--ops", default="separable,depthwise,pointwise,conv2d")
    parser.add_argument("--layers", default="1-11")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--json-dir", default=None, help="also write one JSON file per run")
    parser.add_argument(
        "--peer-rounds", type=int, default=7,
        help="alternating rounds of the peers' separable and conv2d tables (0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--no-train", dest="train", action="store_false",
        help="no training-step tables (they need torch)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    import numba
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from numba_dsconv import bench
    from numba_dsconv.bench import report

    console = Console(stderr=True)
    batches = [int(b) for b in args.batches.split(",")]
    ops = [o.strip() for o in args.ops.split(",")]
    runs = [(op, n) for op in ops for n in batches]
    with bench.thread_limits(numba.get_num_threads()):
        ceilings = bench.measure_ceilings("cpu")
    results = []
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("runs", total=len(runs))
        for op, n in runs:
            bar.update(task, description=f"{op} N={n}")
            results.append(
                bench.run_bench("cpu", n, args.layers, op, args.repeat, ceilings=ceilings)
            )
            bar.advance(task)
            if args.json_dir:
                Path(args.json_dir).mkdir(parents=True, exist_ok=True)
                bench.write_json(results[-1], Path(args.json_dir) / f"{op}-n{n}.json")

    m = results[0].machine
    v = m["versions"]
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "numba_dsconv")
    c = ceilings
    out = [
        "# Benchmarks",
        "",
        "Regenerate with one command from the repository root (a few minutes on 2 cores):",
        "",
        "```bash",
        "python benchmarks/make_benchmarks_md.py",
        "```",
        "",
        f"Generated {m['date']} at commit `{commit}`"
        + (" (with uncommitted changes under numba_dsconv/)" if dirty else "")
        + ". The CPU kernels are still being optimised: rerun after changing them.",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores ({m['cores_available']} available to the process)",
        f"- threads: {m['numba_threads']} (Numba, threading layer `{m['threading_layer']}`); "
        f"torch and the BLAS ({m['blas']}) set to the same count",
        f"- versions: Python {v['python']}, NumPy {v['numpy']}, Numba {v['numba']}, llvmlite "
        f"{v['llvmlite']}, PyTorch {v['torch'] or 'not installed'}, numba_dsconv "
        f"{v['numba_dsconv']}",
        f"- platform: {m['platform']}",
        f"- ceilings measured in the same run: SGEMM **{c.sgemm_gflops:.1f} GFLOP/s** "
        f"({c.sgemm_source}), copy **{c.copy_gbs:.1f} GB/s** ({c.copy_source}); the roofline "
        f"at the {c.compute_name}, ridge {c.ridge:.1f} FLOP/byte; FMA peak "
        f"**{c.fma_gflops:.1f} GFLOP/s** ({c.fma_source}); "
        f"the kernels' GEMM micro-kernel on data in L1 **{c.block_gflops:.1f} GFLOP/s**, "
        f"{100 * c.block_gflops / c.fma_gflops:.0f} % of the FMA peak ({c.block_source}): the "
        "most a GEMM-bound layer can reach with the register block most GEMMs run (with AVX-512 "
        "the parts left on the 8 x 2 block, a panel left over and the 7- or 8-row tail after the "
        "wide block's groups, reach a few % less)",
        "",
        "## Method",
        "",
        "float32, NHWC input, no bias, no activation. After a warm-up (JIT compile outside the "
        "timed region) numba_dsconv and the PyTorch anchors (`F.conv2d` on a channels_last "
        "tensor and on an NCHW tensor, `torch.inference_mode()`, same thread count) are "
        "sampled interleaved (A B A B ...), except torch NCHW, timed on its own after them "
        "(its calls take tens of MB of fresh memory each at the big layers, and the calls "
        "beside them then met fresh memory too: 2-3x their time at layer 1, N=8); each sample "
        "averages enough back-to-back calls "
        "to last ~20 ms; the table shows the median. `vs X` = time(X) / time(numba_dsconv): "
        "above 1, numba_dsconv is faster. Roofline floor = max(FLOPs / FMA peak, bytes / "
        "copy bandwidth) (the FMA peak measured in the same run; the SGEMM rate where it is "
        "not measured), 2 FLOPs per multiply-add, bytes = inputs read once + output written "
        "once (the separable intermediate is not counted); % roof = floor / time. A call "
        "can pass 100 % on a memory-bound layer: data that stays in cache between calls moves "
        "faster than the copy ceiling (one-thread `numpy.copyto` of 256 MiB; a two-thread copy "
        "is ~10 % faster here); oneDNN's convolutions skip the taps on the padding, a few % "
        "fewer FLOPs than counted. "
        "`err` = max |result - float64 reference| / max |reference|. "
        "pointwise is the pointwise stage of the layer (its input has the depthwise output's "
        "shape); conv2d is the standard 3x3 convolution the separable layer replaces.",
        "",
        "The machine is shared and noisy: absolute times move from run to run, the ratios "
        "against the interleaved anchors much less. `% FMA` = GFLOP/s / the FMA peak.",
        "",
    ]
    out += _peers_section(batches, args.layers, args.peer_rounds, console, c.fma_gflops)
    out += _peers_section(
        batches, args.layers, args.peer_rounds, console, c.fma_gflops, op="conv2d"
    )
    out += _python_share_section(args.layers, console)
    if args.train:
        out += _train_section(batches, args.layers, console)
    for result in results:
        s = result.settings
        note = f" (anchors: {result.anchor_note})" if result.anchor_note else ""
        out += [f"## {s['op']}, N={s['batch']}{note}", "", *report.markdown_table(result), ""]
    design = (ROOT / "benchmarks" / "design_measurements.md").read_text().rstrip()
    out += ["## Design measurements", "", design, ""]
    Path(args.out).write_text("\n".join(out).rstrip() + "\n")
    console.print(f"wrote {args.out}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
