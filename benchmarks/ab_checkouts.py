"""Time two checkouts of numba_dsconv against each other.

    python benchmarks/ab_checkouts.py OLD_TREE NEW_TREE [--layers 3,7] [--batches 1,8]
        [--op separable] [--rounds 5] [--repeat 9] [--in-process [--packed]]

Each round runs ``python -m numba_dsconv bench --no-torch --json`` once per tree and batch
(OLD, NEW, OLD, NEW, ...; each tree on PYTHONPATH in its own process, so the two builds never
share a process or a thread pool), then prints, per layer and batch, the median over the rounds
of each tree's median time and the ratio NEW / OLD (below 1: NEW is faster), and the same for
the best round (shared machines have slow rounds; the best is the least disturbed). Kernels are
compiled (or loaded from each tree's cache) before anything is timed, by the bench itself.

``--in-process``: both in one process instead, OLD_TREE's package copied under another name
(its imports within the package are relative), calls interleaved A B A B ... by
numba_dsconv.bench.timing, after a warm-up and a check that both give the same result. On a
shared machine whose speed drifts between processes this is the steadier comparison (both run
within milliseconds of each other, on one Numba thread pool); NEW_TREE must be the tree this
script is run from (it is imported as numba_dsconv). ``--packed``: the GEMM's weights (pw,
conv2d's w) packed once by each tree's ``pack``, as the peers' comparisons run them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _bench(tree: str, args: argparse.Namespace, batch: int, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()))
    cmd = [sys.executable, "-m", "numba_dsconv", "bench", "--no-torch", "--layers", args.layers]
    cmd += ["--batch", str(batch), "--op", args.op, "--repeat", str(args.repeat)]
    cmd += ["--json", str(out)]
    subprocess.run(cmd, env=env, cwd=tempfile.gettempdir(), check=True, capture_output=True)
    return json.loads(out.read_text())


def _in_process(args: argparse.Namespace) -> int:
    import numpy as np

    import numba_dsconv as new
    from numba_dsconv.bench.cases import Case
    from numba_dsconv.bench.suite import layer
    from numba_dsconv.bench.timing import no_sync, time_interleaved

    with tempfile.TemporaryDirectory() as tmp:
        name = "numba_dsconv_ab_old"
        src = Path(args.old).resolve() / "numba_dsconv"
        shutil.copytree(src, Path(tmp) / name, ignore=shutil.ignore_patterns("__pycache__"))
        sys.path.insert(0, tmp)
        old = importlib.import_module(name)
        print(f"{args.op}: old {src} vs new {Path(new.__file__).parent}, one process")
        print(f"{'layer':>5} {'N':>3} {'old us':>9} {'new us':>9} {'new/old':>8}")
        for batch in (int(b) for b in args.batches.split(",")):
            for number in (int(v) for v in args.layers.split(",")):
                lay = layer(number)
                host = Case(lay, args.op, batch).host  # x, then the op's weights
                a = (host["x"], *(host[k] for k in ("w", "dw", "pw") if k in host))
                kw = {} if args.op == "pointwise" else {"stride": lay.stride, "padding": 1}

                def call(module, a=a, kw=kw):
                    if args.packed and args.op != "depthwise":  # the GEMM's weights, last
                        a = (*a[:-1], module.pack(a[-1]))
                    return lambda: getattr(module, args.op)(*a, **kw)

                fa, fb = call(old), call(new)
                np.testing.assert_allclose(fa(), fb(), rtol=1e-5, atol=1e-4)
                fns = {"old": (fa, no_sync), "new": (fb, no_sync)}
                samples, _ = time_interleaved(fns, args.rounds * args.repeat)
                o, n = statistics.median(samples["old"]), statistics.median(samples["new"])
                print(f"{number:>5} {batch:>3} {o * 1e6:>9.1f} {n * 1e6:>9.1f} {n / o:>8.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--layers", default="3,7")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--op", default="separable")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--in-process", action="store_true", help="both trees in one process")
    ap.add_argument("--packed", action="store_true", help="with --in-process: weights packed")
    args = ap.parse_args(argv)
    if args.packed and not args.in_process:
        ap.error("--packed needs --in-process")
    if args.in_process:
        return _in_process(args)
    times: dict[tuple[str, int, int], list[float]] = {}
    commits = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for batch in (int(b) for b in args.batches.split(",")):
                for label, tree in (("old", args.old), ("new", args.new)):
                    d = _bench(tree, args, batch, Path(tmp) / f"{label}.json")
                    commits[label] = d["machine"]["commit"]
                    for row in d["layers"]:
                        key = (label, row["layer"], batch)
                        times.setdefault(key, []).append(row["ours"]["median_s"])
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    print(f"{args.op}: old {args.old} ({commits['old']}) vs new {args.new} ({commits['new']})")
    head = f"{'layer':>5} {'N':>3} {'old us':>9} {'new us':>9} {'new/old':>8}"
    print(f"{head} {'best old':>9} {'best new':>9} {'new/old':>8}  per-round ratios")
    for (label, layer, batch), old in sorted(times.items()):
        if label != "old":
            continue
        new = times[("new", layer, batch)]
        ratios = " ".join(f"{n / o:.3f}" for o, n in zip(old, new, strict=True))
        o, n = statistics.median(old), statistics.median(new)
        bo, bn = min(old), min(new)
        cells = f"{o * 1e6:>9.1f} {n * 1e6:>9.1f} {n / o:>8.3f} {bo * 1e6:>9.1f} {bn * 1e6:>9.1f}"
        print(f"{layer:>5} {batch:>3} {cells} {bn / bo:>8.3f}  {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
