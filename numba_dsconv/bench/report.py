"""Results: the records of a run, their JSON, one table model printed as a rich table (the
command line) or as markdown (BENCHMARKS.md), and the roofline chart."""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cases import ANCHORS, OURS, RTOL_FLOAT32
from .machine import Ceilings
from .work import Work


@dataclass
class SideResult:
    """One implementation on one layer: numba_dsconv or an anchor."""

    name: str
    median_s: float
    samples_s: list[float]
    number: int
    gflops: float
    gbs: float
    pct_roofline: float
    # GFLOP/s as a % of the machine's FMA peak (NaN where unmeasured: CUDA)
    pct_fma_peak: float
    error_rel: float
    ok: bool


@dataclass
class LayerResult:
    layer: int
    name: str
    hw: int
    c_in: int
    c_out: int
    stride: int
    op: str
    batch: int
    device: str
    flops: int
    nbytes: int
    intensity: float
    floor_s: float
    ours: SideResult
    anchors: dict[str, SideResult]
    # time(anchor) / time(numba_dsconv): above 1, numba_dsconv is faster.
    speedup: dict[str, float]
    ok: bool


@dataclass
class BenchResult:
    machine: dict[str, Any]
    ceilings: Ceilings
    settings: dict[str, Any]
    anchors: list[str]
    anchor_note: str | None
    layers: list[LayerResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every numba_dsconv result agreed with the float64 reference."""
        return all(row.ok for row in self.layers)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ceilings"]["ridge_flop_per_byte"] = self.ceilings.ridge
        d["ceilings"]["compute_gflops"] = self.ceilings.compute_gflops
        d["ok"] = self.ok
        return d


def side(
    name: str, samples: list[float], number: int, w: Work, floor: float, err: float, fma: float
):
    """A SideResult from its samples: median, rates, % of roofline and of the FMA peak
    ``fma`` (GFLOP/s), the error verdict."""
    med = statistics.median(samples)
    return SideResult(
        name=name,
        median_s=med,
        samples_s=list(samples),
        number=number,
        gflops=w.flops / med / 1e9,
        gbs=w.nbytes / med / 1e9,
        pct_roofline=100.0 * floor / med,
        pct_fma_peak=100.0 * w.flops / med / 1e9 / fma,
        error_rel=err,
        ok=err <= RTOL_FLOAT32,
    )


def json_ready(v: Any) -> Any:
    """``v`` with non-finite floats as None (JSON has no NaN or Infinity)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: json_ready(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_ready(x) for x in v]
    return v


def write_json(result: BenchResult, path: str | os.PathLike[str]) -> None:
    """Every number of ``result`` as JSON (non-finite floats written as null)."""
    Path(path).write_text(json.dumps(json_ready(result.to_dict()), indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# the table: one model, two renderings


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.2f}"


def table(result: BenchResult) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-layer table; a mismatch cell ends in ``MISMATCH``."""
    labels = dict(ANCHORS[result.settings["device"]])
    head = ["#", "layer", "ours ms"]
    for name in result.anchors:
        head += [f"{labels[name]} ms", f"vs {labels[name]}"]
    if not result.anchors:
        head.append(f"anchors ({result.anchor_note})")
    fma = math.isfinite(result.ceilings.fma_gflops)
    head += ["GFLOP/s", *(["% FMA"] if fma else []), "GB/s", "FLOP/B", "floor ms", "% roof"]
    head += [f"{labels[name]} % roof" for name in result.anchors]
    head.append("err")
    rows = []
    for r in result.layers:
        cells = [
            str(r.layer),
            f"{r.hw}x{r.hw}x{r.c_in}->{r.c_out} s{r.stride}",
            ms(r.ours.median_s),
        ]
        for name in result.anchors:
            cells += [ms(r.anchors[name].median_s), f"{r.speedup[name]:.2f}x"]
        if not result.anchors:
            cells.append("-")
        cells.append(f"{r.ours.gflops:.1f}")
        if fma:
            cells.append(f"{r.ours.pct_fma_peak:.0f}%")
        cells += [f"{r.ours.gbs:.1f}", f"{r.intensity:.1f}"]
        cells += [ms(r.floor_s), f"{r.ours.pct_roofline:.0f}%"]
        cells += [f"{r.anchors[name].pct_roofline:.0f}%" for name in result.anchors]
        cells.append(f"{r.ours.error_rel:.1e}" + ("" if r.ours.ok else " MISMATCH"))
        rows.append(cells)
    return head, rows


def headline(result: BenchResult) -> list[str]:
    """The run's settings, machine and ceilings, in two lines."""
    m, c, s = result.machine, result.ceilings, result.settings
    v = m["versions"]
    where = m["cpu"] if s["device"] == "cpu" else ", ".join(m.get("gpus") or ["cuda"])
    fma = f"; FMA peak {c.fma_gflops:.1f} GFLOP/s ({c.fma_source})"
    if math.isfinite(c.block_gflops):
        fma += (
            f"; GEMM block {c.block_gflops:.1f} GFLOP/s = {100 * c.block_gflops / c.fma_gflops:.0f}"
            f"% of it ({c.block_source})"
        )
    return [
        f"{s['op']}, N={s['batch']}, {s['device']}, float32 | {where} | {s['threads']} numba "
        f"threads ({m['threading_layer']}) | numpy {v['numpy']}, numba {v['numba']}, torch "
        f"{v['torch'] or 'not installed'}",
        f"ceilings: SGEMM {c.sgemm_gflops:.1f} GFLOP/s ({c.sgemm_source}); copy "
        f"{c.copy_gbs:.1f} GB/s ({c.copy_source}); roofline at the {c.compute_name}, ridge "
        f"{c.ridge:.1f} FLOP/byte" + (fma if math.isfinite(c.fma_gflops) else ""),
    ]


CAPTION = (
    "vs X = time(X) / time(numba_dsconv): above 1, numba_dsconv is faster. % roof = roofline "
    "floor / time (the floor: FLOPs at the FMA peak where measured, else at the SGEMM rate, or "
    "bytes at copy bandwidth, whichever is longer). % FMA = GFLOP/s / FMA peak. err = max "
    "|error| / max |value| vs float64."
)


def rich_table(result: Any) -> Any:
    """The table as a rich Table (mismatches in red). Every cell is a ``Text``, never markup:
    brackets in names and messages print as they are."""
    from rich.table import Table
    from rich.text import Text

    head, rows = table(result)
    t = Table(
        title=Text(f"numba_dsconv {result.settings['op']} vs anchors (median; ms)"),
        caption=Text(CAPTION),
    )
    for i, col in enumerate(head):
        t.add_column(Text(col), justify="left" if i == 1 else "right", no_wrap=i == 1)
    for cells in rows:
        texts = [Text(c) for c in cells]
        if cells[-1].endswith("MISMATCH"):
            texts[-1].stylize("red")
        t.add_row(*texts)
    return t


def markdown_table(result: BenchResult) -> list[str]:
    """The table as markdown lines (mismatches in bold)."""
    head, rows = table(result)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cells in rows:
        if cells[-1].endswith("MISMATCH"):
            cells = [*cells[:-1], cells[-1].replace("MISMATCH", "**MISMATCH**")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# --------------------------------------------------------------------------------------------
# the roofline chart

_ANCHOR_STYLE = {
    "torch_channels_last": ("tab:orange", "s"),
    "torch_nchw": ("tab:green", "^"),
    "torch_fp32": ("tab:orange", "s"),
    "torch_default": ("tab:green", "^"),
}


def plot_roofline(result: BenchResult, path: str | os.PathLike[str]) -> None:
    """A log-log roofline chart (x: FLOP/byte, y: GFLOP/s) with every measured layer on it.

    Needs matplotlib (``pip install 'numba-dsconv[bench]'``).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "the roofline plot needs matplotlib: pip install 'numba-dsconv[bench]'"
        ) from exc
    ceil, rows = result.ceilings, result.layers
    ai = [r.intensity for r in rows]
    ridge = ceil.ridge if math.isfinite(ceil.ridge) else max(ai, default=1.0)
    x_lo = min([*ai, ridge] or [1.0]) / 4
    x_hi = max([*ai, ridge] or [1.0]) * 4
    fig = Figure(figsize=(9, 6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    peak = _draw_roof(ax, ceil, x_lo, x_hi)
    _draw_points(ax, result)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(x_lo, x_hi)
    ys = [r.ours.gflops for r in rows] + [a.gflops for r in rows for a in r.anchors.values()]
    top = peak if math.isfinite(peak) else max(ys, default=1.0)
    ax.set_ylim(min([*ys, ceil.copy_gbs * x_lo]) / 2, max([*ys, top]) * 2)
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("GFLOP/s")
    s, m = result.settings, result.machine
    ax.set_title(
        f"{s['op']} N={s['batch']} on {s['device']}: {m['cpu']}, {s['threads']} threads"
        if s["device"] == "cpu"
        else f"{s['op']} N={s['batch']} on {', '.join(m.get('gpus') or ['cuda'])}",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.fspath(path))


def _draw_roof(ax: Any, ceil: Ceilings, x_lo: float, x_hi: float) -> float:
    """The roofline (its compute ceiling: the FMA peak where measured), its ceilings and the
    SGEMM rate below it, labelled; returns the compute peak (inf if unknown)."""
    xs = np.geomspace(x_lo, x_hi, 200)
    peak = ceil.compute_gflops if math.isfinite(ceil.compute_gflops) else np.inf
    ax.plot(xs, np.minimum(peak, ceil.copy_gbs * xs), color="black", lw=2, label="roofline")
    ax.plot(xs, ceil.copy_gbs * xs, color="gray", ls=":", lw=1)
    note = dict(textcoords="offset points", fontsize=8, color="dimgray", ha="right")
    ax.annotate(
        f"copy {ceil.copy_gbs:.1f} GB/s", (xs[20], ceil.copy_gbs * xs[20]), xytext=(-10, 10), **note
    )
    if math.isfinite(peak):
        ax.axhline(peak, color="gray", ls=":", lw=1)
        ax.annotate(f"{ceil.compute_name} {peak:.0f} GFLOP/s", (x_hi, peak), xytext=(-4, 4), **note)
    sgemm = ceil.sgemm_gflops
    if ceil.compute_name != "SGEMM" and math.isfinite(sgemm):
        ax.axhline(sgemm, color="gray", ls="--", lw=0.8)
        ax.annotate(f"SGEMM {sgemm:.0f} GFLOP/s", (x_hi, sgemm), xytext=(-4, -12), **note)
    return float(peak)


def _draw_points(ax: Any, result: BenchResult) -> None:
    """Every layer's numba_dsconv point (numbered) and its anchors' points."""
    rows = result.layers
    labels = dict(ANCHORS[rows[0].device]) if rows else {}
    for name in result.anchors:
        color, marker = _ANCHOR_STYLE.get(name, ("tab:red", "v"))
        pts = [(r.intensity, r.anchors[name].gflops) for r in rows if name in r.anchors]
        if pts:
            xs, ys = zip(*pts, strict=True)
            label = labels.get(name, name)
            ax.scatter(xs, ys, color=color, marker=marker, s=28, alpha=0.8, label=label, zorder=3)
    ai = [r.intensity for r in rows]
    ax.scatter(ai, [r.ours.gflops for r in rows], color="tab:blue", s=40, zorder=4, label=OURS)
    for i, r in enumerate(sorted(rows, key=lambda r: (r.intensity, r.ours.gflops))):
        ax.annotate(
            str(r.layer),
            (r.intensity, r.ours.gflops),
            textcoords="offset points",
            xytext=(5, -9 if i % 2 else 3),  # alternate, so neighbours' labels do not overlap
            fontsize=8,
            color="tab:blue",
        )
