"""The command line: ``numba-dsconv demo | info | bench`` (also ``python -m numba_dsconv``)."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import api
from ._dispatch import parse_device
from ._spec import make_spec
from .bench import reference
from .bench.suite import LAYERS
from .bench.suite import layer as suite_layer
from .cost import cost

# No rich markup anywhere: every message prints as it is written (a "[bench]" in a pip
# command stays); styles are given as styles.
console = Console(markup=False, emoji=False, highlight=False)


def _wide(width: int) -> Console:
    """Piped output defaults to 80 columns, too narrow for the tables."""
    return Console(markup=False, emoji=False, highlight=False, width=max(console.width, width))


def _error(message: str) -> int:
    """Print ``message`` as an error on stderr; the exit status 2 (argparse's, for usage)."""
    err = Console(stderr=True, markup=False, emoji=False, highlight=False)
    err.print(Text.assemble(("error: ", "red"), message))
    return 2


# argparse types: a bad value is a usage error (a message and exit status 2), never a traceback


def _count(minimum: int):  # noqa: ANN202
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}; got {value}")
        return value

    return parse


def _layer_number(text: str) -> int:
    try:
        return suite_layer(int(text)).number
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _device(text: str) -> str:
    try:
        parse_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _check_writable(path: str, option: str) -> None:
    """Fail before measuring, not after, when an output file cannot be written."""
    p = Path(path)
    existed = p.exists()
    try:
        with open(p, "ab"):
            pass
    except OSError as exc:
        raise ValueError(f"{option} {path}: cannot write there ({exc.strerror or exc})") from None
    if not existed:
        p.unlink()


def _cost_table(title: str, c) -> Table:  # noqa: ANN001
    t = Table(title=title)
    t.add_column("")
    t.add_column("standard conv", justify="right")
    t.add_column("depthwise separable", justify="right")
    t.add_column("separable / standard", justify="right")
    t.add_row(
        "multiply-adds",
        f"{c.standard_macs:,}",
        f"{c.depthwise_macs:,} + {c.pointwise_macs:,} = {c.separable_macs:,}",
        f"{c.mac_ratio:.4f}",
    )
    t.add_row(
        "weights (no bias)",
        f"{c.standard_params:,}",
        f"{c.separable_params:,}",
        f"{c.param_ratio:.4f}",
    )
    return t


def _run_case(title: str, x, dw, pw, *, padding, stride, device) -> float:  # noqa: ANN001
    """Run separable on one case, print shapes, costs and the error against float64."""
    t0 = time.perf_counter()
    y = api.separable(x, dw, pw, stride=stride, padding=padding, device=device)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    y = api.separable(x, dw, pw, stride=stride, padding=padding, device=device)
    second = time.perf_counter() - t0
    y = np.asarray(y)
    spec = make_spec(
        "separable",
        x_shape=x.shape,
        layout="NHWC",
        kernel=dw.shape[:2],
        c_in_kernel=dw.shape[2],
        multiplier=1,
        c_out=pw.shape[-1],
        stride=stride,
        padding=padding,
    )
    x4 = x if x.ndim == 4 else x[None]
    mid = reference.depthwise(x4, dw, None, spec)
    ref = reference.pointwise(mid, pw.reshape(pw.shape[-2], pw.shape[-1]), None)
    ref = ref if x.ndim == 4 else ref[0]
    err = float(np.max(np.abs(y - ref))) if y.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 1.0
    t = Table(title=title)
    for col in ("input", "depthwise kernel", "pointwise kernel", "intermediate", "output"):
        t.add_column(col)
    t.add_row(
        str(x.shape),
        str(dw.shape),
        str(pw.shape),
        str(mid.shape[1:] if x.ndim == 3 else mid.shape),
        str(y.shape),
    )
    console.print(t)
    c = cost(x.shape, dw.shape[:2], pw.shape[-1], stride=stride, padding=padding)
    console.print(_cost_table("Section 3.3 cost comparison", c))
    console.print(
        Text.assemble(
            f"dtype {y.dtype}, device {device or 'cpu'}: largest |error| vs float64 reference ",
            (f"{err:.3g}", "bold"),
            f" (largest |value| {scale:.3g}); first call {first * 1e3:.1f} ms "
            f"(includes JIT compile or cache load), second {second * 1e3:.2f} ms",
        )
    )
    return err / max(scale, 1e-30)


def demo(args: argparse.Namespace) -> int:
    device = args.device
    if device is not None:
        api.backend_for(device, None)  # no usable GPU: the ValueError that says so, up front
    console.rule(Text("numba_dsconv demo: the worked example", style="bold"))
    x = np.arange(4 * 4 * 3, dtype=np.float64).reshape(4, 4, 3) / 10.0
    dw = np.linspace(-1.0, 1.0, 27).reshape(3, 3, 3)
    pw = np.array([[[[1.0, -1.0], [0.5, 2.0], [-0.25, 0.75]]]])
    rel1 = _run_case(
        "4x4x3 input, 3x3x3 depthwise, 1x1x3x2 pointwise, padding='valid'",
        x,
        dw,
        pw,
        padding="valid",
        stride=1,
        device=device,
    )
    lay = suite_layer(args.layer)
    console.rule(Text(f"one MobileNet layer: {lay.name}, N={args.batch}, float32", style="bold"))
    xl, dwl, pwl = lay.arrays(args.batch)
    rel2 = _run_case(
        f"MobileNet layer {lay.name}",
        xl,
        dwl,
        pwl,
        padding=lay.padding,
        stride=lay.stride,
        device=device,
    )
    ok = rel1 < 1e-12 and rel2 < 1e-5
    console.print("OK" if ok else "MISMATCH against the reference", style="green" if ok else "red")
    return 0 if ok else 1


def info(args: argparse.Namespace) -> int:
    import llvmlite
    import numba

    from . import __version__, _config
    from .cpu.backend import threading_layer

    t = Table(title="numba_dsconv info")
    t.add_column("item")
    t.add_column("value")
    t.add_row("numba_dsconv", __version__)
    t.add_row("python", sys.version.split()[0])
    t.add_row("numba", numba.__version__)
    t.add_row("llvmlite", llvmlite.__version__)
    t.add_row("numpy", np.__version__)
    try:
        import torch

        t.add_row("torch", torch.__version__)
    except ImportError:
        t.add_row("torch", "not installed")
    t.add_row("platform", f"{platform.platform()} ({platform.machine()})")
    t.add_row("threading layer", threading_layer())
    t.add_row("threads", str(numba.get_num_threads()))
    t.add_row("fastmath flags", ", ".join(sorted(_config.FASTMATH)))
    t.add_row("disk cache", "on" if _config.CACHE else "off")
    t.add_row("devices", ", ".join(_devices()))
    console.print(t)
    return 0


def _devices() -> list[str]:
    devs = ["cpu"]
    from . import cuda

    devs.extend(cuda.describe_devices())
    return devs


def bench(args: argparse.Namespace) -> int:
    """Ceilings, then each layer timed against the PyTorch anchors, as rich tables."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from . import bench as engine
    from .bench import report

    if args.dask:
        return _bench_dask(args)
    try:
        lays = engine.parse_layers(args.layers)
    except ValueError as exc:
        return _error(str(exc))
    if args.pass_ == "train":
        return _bench_train(args, lays)
    if args.peers:
        return _bench_peers(args, lays)
    if args.python_share:
        return _bench_python_share(args, lays)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return _error("--plot needs matplotlib: pip install 'numba-dsconv[bench]'")
    if args.device == "cuda" and not engine.gpu_available():
        return _error("--device cuda: no usable CUDA GPU on this machine")
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            _check_writable(path, option)
    phases = {"ceilings": "measuring ceilings", "compile": "compiling", "measure": "measuring"}
    columns = (
        TextColumn("{task.fields[phase]:<18}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}", markup=False),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        tasks: dict[str, object] = {}

        def progress(phase: str, label: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(label, total=total, phase=phases.get(phase, phase))
            bar.update(tasks[phase], description=label, completed=done, total=total)

        try:
            result = engine.run_bench(
                device=args.device,
                batch=args.batch,
                layers=lays,
                op=args.op,
                repeat=args.repeat,
                anchors=not args.no_torch,
                progress=progress,
            )
        except (NotImplementedError, ValueError) as exc:
            return _error(str(exc))
    wide = console if console.is_terminal else _wide(170)
    for line in report.headline(result):
        wide.print(line)
    wide.print(report.rich_table(result))
    if args.json:
        engine.write_json(result, args.json)
        console.print(f"wrote {args.json}")
    if args.plot:
        engine.plot_roofline(result, args.plot)
        console.print(f"wrote {args.plot}")
    if not result.ok:
        console.print("MISMATCH: a result differs from the float64 reference", style="red")
        return 1
    return 0


def tune(args: argparse.Namespace) -> int:
    """Time the CPU GEMM blocking around the cache-derived defaults; keep the best."""
    import os

    from . import _config
    from .bench import parse_layers
    from .bench import tune as engine

    if args.reset:
        path = _config.tuning_file()
        if os.path.exists(path):
            os.remove(path)
            console.print(Text(f"removed {path}: the cache-derived defaults apply again"))
        else:
            console.print(Text(f"no tuning file at {path}"))
        return 0
    layers = [lay.number for lay in parse_layers(args.layers)]
    batches = [int(b) for b in args.batches.split(",")]
    if any(b < 1 for b in batches):
        return _error(f"--batches must be positive whole numbers; got {args.batches!r}")
    with console.status("tuning") as status:
        result = engine.tune(
            layers, batches, args.rounds, save=not args.dry_run,
            progress=lambda stage, done, total: status.update(f"{stage}: {done}/{total}"),
        )  # fmt: skip
    t = Table(
        title=Text(
            f"separable on {', '.join(result.workloads)}: time / the defaults' time "
            f"(geometric mean; best of {args.rounds} interleaved rounds)"
        )
    )
    for col in ("stage", "tile bytes", "tile pixels", "reduction block", "time / defaults"):
        t.add_column(Text(col), justify="right")
    for trial in result.trials:
        v = trial["values"]
        t.add_row(
            Text(trial["stage"]), Text(str(v["CPU_TILE_BYTES"])),
            Text(str(v["CPU_TILE_MAX_PIXELS"])), Text(str(v["CPU_GEMM_KC"])),
            Text(f"{trial['score']:.3f}"),
        )  # fmt: skip
    console.print(t)
    chosen = ", ".join(f"{k}={v}" for k, v in result.chosen.items())
    console.print(Text(f"chosen: {chosen} ({result.score:.3f} of the defaults' time)"))
    if result.path:
        console.print(Text(f"written to {result.path}: later processes on this machine use it"))
    return 0


def _bench_python_share(args: argparse.Namespace, lays: list) -> int:
    """Each layer's call, whole and inside its kernel (bench.python_share)."""
    import numba

    from .bench import python_share

    if args.device != "cpu":
        return _error("--python-share times the CPU calls")
    repeat = args.repeat or 15
    with console.status("timing calls and their kernels"):
        rows = python_share(lays, args.op, args.batch, repeat)
    t = Table(
        title=Text(
            f"{args.op}, N={args.batch}, float32, {numba.get_num_threads()} threads: the public "
            f"call (weights packed once beforehand), {20 * repeat} calls each timed whole and "
            f"inside its kernel's dispatcher, medians; microseconds"
        ),
        caption=Text(
            "python = the median of each call's time less its kernel's: the library's work per "
            "call (fast-path lookup, plan, result allocation, dispatch), as it runs between "
            "kernels (from cold caches)"
        ),
    )
    for col in ("#", "layer", "call", "kernel", "python"):
        t.add_column(Text(col), justify="right")
    for r in rows:
        t.add_row(*(Text(c) for c in r.cells()))
    console.print(t)
    return 0


def _bench_peers(args: argparse.Namespace, lays: list) -> int:
    """The separable layer (or conv2d) against ONNX Runtime, OpenVINO, LiteRT and torch, each in
    its own processes, alternating (bench/peers.py)."""
    import numba

    from .bench import peers
    from .bench.machine import _cpu_model

    if args.device != "cpu" or args.op not in peers.OPS:
        return _error(f"--peers times {' or '.join(peers.OPS)} on the CPU")
    runtimes = peers.available()
    if args.no_torch and "torch" in runtimes:
        runtimes.remove("torch")
    numbers = [lay.number for lay in lays]
    threads = numba.get_num_threads()
    rounds = args.rounds or 7
    repeat = args.repeat or 9
    with console.status("peers") as status:
        status.update("FMA peak")
        from .cpu.peak import fma_peak_gflops

        fma, _ = fma_peak_gflops(threads)
        best = peers.run_peers(
            args.batch, numbers, runtimes, threads, rounds, repeat,
            progress=lambda done, total: status.update(f"worker processes {done}/{total}"),
            op=args.op,
        )  # fmt: skip
    t = Table(
        title=Text(
            f"{args.op}, N={args.batch}, float32, {threads} threads, {_cpu_model()}: each "
            f"runtime in its own process, {rounds} alternating rounds, best of the rounds' "
            f"medians of {repeat} calls; microseconds"
        ),
        caption=Text(
            "vs fastest = ours / the fastest other runtime (below 1: numba_dsconv leads); "
            "packed: ours with the GEMM's weights (pw, conv2d's w) packed once "
            "(numba_dsconv.pack), as the peers pack theirs at load; % FMA: ours' GFLOP/s "
            f"/ the FMA peak measured just before ({fma:.0f} GFLOP/s)"
        ),
    )
    ratio_cols = peers.ratio_columns(runtimes)
    for col in ["#", *runtimes, *ratio_cols, *peers.fma_columns(runtimes, fma)]:
        t.add_column(Text(col), justify="right")
    rows = peers.table(best, numbers, op=args.op, batch=args.batch, fma_gflops=fma)
    for cells in rows:
        t.add_row(*(Text(c) for c in cells))
    console.print(t)
    for i, col in enumerate(ratio_cols):
        ratios = [float(r[1 + len(runtimes) + i]) for r in rows]
        console.print(Text(f"geometric mean of {col}: {peers.geomean(ratios):.2f}"))
    missing = sorted(set(peers.RUNTIMES) - set(runtimes) - ({"torch"} if args.no_torch else set()))
    if missing:
        console.print(
            Text(f"not installed: {', '.join(missing)} (pip install 'numba-dsconv[peers]')")
        )
    if args.json:
        import json

        data = {r: {str(k): v for k, v in d.items()} for r, d in best.items()}
        with open(args.json, "w") as f:
            json.dump({"op": args.op, "batch": args.batch, "threads": threads, "rounds": rounds,
                       "repeat": repeat, "cpu": _cpu_model(), "fma_peak_gflops": fma,
                       "seconds_and_error": data}, f,
                      indent=2)  # fmt: skip
    return 0


def _bench_train(args: argparse.Namespace, lays: list) -> int:
    """One training step per layer, ours (numba_dsconv.torch) against torch's layers, one step
    of MobileNetV1's 13 separable layers in a chain, and what autograd keeps for them
    (bench/train.py)."""
    import json

    from . import bench as engine
    from .bench.machine import torch_module
    from .bench.report import json_ready

    if torch_module() is None:
        return _error("--pass train needs torch: pip install torch")
    if args.device == "cuda" and not engine.gpu_available():
        return _error("--device cuda: no usable CUDA GPU on this machine")
    if args.json:
        _check_writable(args.json, "--json")
    from .bench import train

    with console.status("training step benchmark") as status:
        result = train.run_train_bench(
            args.device, args.batch, lays, args.repeat,
            progress=lambda phase, label, done, total: status.update(f"{label} ({done}/{total})"),
            rounds=args.rounds or 5, chain=len(train.MOBILENET_V1),
        )  # fmt: skip
        status.update("saved tensors of MobileNetV1's 13 separable layers")
        saved = train.saved_bytes(args.batch, args.device)
    t = Table(
        title=Text(
            f"training step (forward + backward, grads of x, weights, biases), N={args.batch}, "
            f"{args.device}, {result.threads} threads: numba_dsconv.torch.separable vs torch "
            f"Conv2d(groups=C) + Conv2d(1x1), channels_last; "
            + (
                f"each in its own processes, {args.rounds or 5} alternating rounds, best of the "
                "rounds' medians; ms"
                if args.device == "cpu"
                else "interleaved, median ms"
            )
        )
    )
    for col in ("#", "layer", "ours ms", "torch ms", "ours / torch", "grad error"):
        t.add_column(Text(col), justify="left" if col == "layer" else "right")
    for r in result.rows:
        t.add_row(*(Text(c) for c in (str(r.layer), r.name, f"{r.ours_s * 1e3:.3f}",
                                      f"{r.torch_s * 1e3:.3f}", f"{r.ratio:.2f}x",
                                      f"{r.grad_error:.1e}")))  # fmt: skip
    wide = console if console.is_terminal else _wide(150)
    wide.print(t)
    wide.print(f"geometric mean ours / torch: {result.geomean:.2f}x (below 1: ours is faster)")
    if result.chain is not None:
        c = result.chain
        wide.print(
            f"one training step of MobileNetV1's {c.layers} separable layers in a chain (relu6 "
            f"after each stage; the input needs no gradient), N={args.batch}, timed as the "
            f"layers: ours {c.ours_s * 1e3:.1f} ms, torch {c.torch_s * 1e3:.1f} ms "
            f"({c.ratio:.2f}x)"
        )
    ours, theirs = saved["ours"], saved["torch"]
    wide.print(
        f"saved for backward, MobileNetV1's 13 separable layers (relu6 after each stage), "
        f"N={args.batch}: ours {ours['raw'] / 2**20:.1f} MiB, torch {theirs['raw'] / 2**20:.1f}"
        f" MiB ({ours['raw'] / theirs['raw']:.2f}x) counting every saved tensor; distinct "
        f"storages {ours['unique'] / 2**20:.1f} vs {theirs['unique'] / 2**20:.1f} MiB "
        f"({ours['unique'] / theirs['unique']:.2f}x)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(json_ready({**result.to_dict(), "saved_bytes": saved}), f, indent=1)
        console.print(f"wrote {args.json}")
    return 0


def _bench_dask(args: argparse.Namespace) -> int:
    """Strong scaling and per-task overhead on dask.distributed (bench/scaleout.py)."""
    try:
        import dask  # noqa: F401
        import distributed  # noqa: F401
    except ImportError:
        return _error("--dask needs dask and distributed: pip install 'numba-dsconv[dask]'")
    import json

    from .bench import scaleout
    from .bench.report import json_ready

    if args.json:
        _check_writable(args.json, "--json")
    with console.status("dask scale-out benchmark") as status:
        result = scaleout.run_dask_bench(
            repeat=args.repeat or 5, quick=args.quick, progress=lambda m: status.update(m)
        )
    head, rows = scaleout.table(result)
    t = Table(title=Text("numba_dsconv on dask.distributed: separable, 1 thread per worker"))
    for col in head:
        t.add_column(Text(col), justify="left" if col == "workload" else "right")
    for row in rows:
        t.add_row(*(Text(c) for c in row))
    wide = console if console.is_terminal else _wide(150)
    wide.print(t)
    for name, line in result.guidance.items():
        wide.print(f"{name}: {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(json_ready(result.json_ready()), f, indent=1)
        console.print(f"wrote {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="numba-dsconv", description="Depthwise separable convolutions with Numba."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="run the worked example and one MobileNet layer")
    p_demo.add_argument(
        "--device", type=_device, default=None, help="cpu | cuda | cuda:N (default: cpu)"
    )
    p_demo.add_argument(
        "--layer", type=_layer_number, default=3, help=f"suite layer 1-{len(LAYERS)} (default 3)"
    )
    p_demo.add_argument("--batch", type=_count(1), default=1, help="batch size (default 1)")
    p_demo.set_defaults(func=demo)
    p_tune = sub.add_parser(
        "tune",
        help="tune the CPU GEMM blocking on this machine (used automatically afterwards)",
        description="Time the fused separable kernel with other tile sizes and reduction "
        "blocks than the cache-derived defaults, and write the best beside the kernel cache "
        "(NUMBA_CACHE_DIR, else the user's cache directory; NUMBA_DSCONV_TUNING_FILE names "
        "another file); every later process on a machine with the same CPU uses it.",
    )
    p_tune.add_argument("--layers", default="3,5,7", help="suite layers (default 3,5,7)")
    p_tune.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    p_tune.add_argument("--rounds", type=_count(1), default=3, help="interleaved rounds")
    p_tune.add_argument("--dry-run", action="store_true", help="measure, write nothing")
    p_tune.add_argument("--reset", action="store_true", help="remove the tuning file")
    p_tune.set_defaults(func=tune)
    p_info = sub.add_parser("info", help="versions, threading layer, threads and devices")
    p_info.set_defaults(func=info)
    p_bench = sub.add_parser(
        "bench",
        help="time the layer suite against PyTorch, with the machine's roofline",
        description="Measure SGEMM rate and copy bandwidth, then time each layer "
        "(interleaved with the PyTorch anchors, median of several runs) and report time, "
        "ratios, GFLOP/s, GB/s, % of roofline and the error against float64.",
    )
    p_bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p_bench.add_argument("--batch", type=_count(1), default=1, help="batch size N (default 1)")
    p_bench.add_argument(
        "--layers", default="1-11", help="suite layers, e.g. 1,3,7 or 1-11 (default all)"
    )
    p_bench.add_argument(
        "--op", choices=("separable", "depthwise", "pointwise", "conv2d"), default="separable"
    )
    p_bench.add_argument(
        "--pass",
        dest="pass_",
        choices=("forward", "train"),
        default="forward",
        help="train: one training step per layer (forward + backward) through "
        "numba_dsconv.torch against torch's layers, one step of MobileNetV1's 13 separable "
        "layers in a chain, and the memory autograd keeps for them (needs torch)",
    )
    p_bench.add_argument(
        "--repeat",
        type=_count(1),
        default=None,
        help="samples per side (default 7-15 by call time)",
    )
    p_bench.add_argument("--json", metavar="FILE", help="write every number as JSON")
    p_bench.add_argument("--plot", metavar="FILE.png", help="draw a roofline chart")
    p_bench.add_argument("--no-torch", action="store_true", help="skip the PyTorch anchors")
    p_bench.add_argument(
        "--peers",
        action="store_true",
        help="instead: the separable layer (--op conv2d: its 3x3 standard convolution) against "
        "ONNX Runtime, OpenVINO, LiteRT (XNNPACK) and torch (those installed: pip install "
        "'numba-dsconv[peers]'), "
        "each in its own processes, alternating",
    )
    p_bench.add_argument(
        "--rounds",
        type=_count(1),
        default=None,
        help="with --peers, or --pass train on the CPU: alternating rounds of processes "
        "(default 7 with --peers, 5 with --pass train)",
    )
    p_bench.add_argument(
        "--python-share",
        action="store_true",
        help="instead: each layer's call timed whole and inside its kernel (CPU): the "
        "library's own time per call",
    )
    p_bench.add_argument(
        "--dask",
        action="store_true",
        help="instead: strong scaling and per-task overhead on 1 and 2 dask worker processes "
        "(a batch of layer 3 and one large image, against the in-memory call)",
    )
    p_bench.add_argument(
        "--quick", action="store_true", help="with --dask: small sizes (a smoke run)"
    )
    p_bench.set_defaults(func=bench)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError, OSError) as exc:  # a clean message, never a traceback
        return _error(str(exc))
    except MemoryError as exc:
        return _error(f"not enough memory ({exc}); try a smaller --batch")
    except KeyboardInterrupt:
        return _error("interrupted")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
