"""The measuring engine behind ``numba-dsconv bench``, the asv suites, BENCHMARKS.md and the GPU
script (benchmarks/): one set of ceilings, one roofline, one timing method, one report.

- ``suite``: the MobileNet layer suite
- ``work``: FLOPs, compulsory bytes and the roofline floor of one call
- ``machine``: the measured ceilings (CPU and GPU), machine info, thread and TF32 settings
- ``cases``: one layer x op x batch x device: arrays, our call, the PyTorch anchors, the check
- ``reference``: the float64 NumPy formulation every timed result is checked against
- ``timing``: interleaved samples after warm-up, medians, per-call latency
- ``report``: result records, JSON, tables (rich and markdown), the roofline chart
- ``run``: ``run_bench`` and the GPU script's variant and call-breakdown measurements

Nothing here prints: progress goes through a callback, results come back as dataclasses.

Method: the machine's ceilings are measured in the same run; each layer is compiled and
warmed up outside every timed region, checked against float64, then timed interleaved with
its anchors (A B C A B C ...); the median of several samples is reported. The benchmarked
calls carry no bias and no activation.
"""

from .cases import ANCHORS, DEVICES, OURS, RTOL_FLOAT32, Case
from .machine import Ceilings, gpu_available, machine_info, measure_ceilings, thread_limits
from .report import BenchResult, LayerResult, SideResult, plot_roofline, write_json
from .run import PythonShare, call_breakdown, parse_layers, python_share, run_bench, time_variants
from .timing import time_interleaved
from .work import OPS, Work, roofline_floor, work

__all__ = [
    "ANCHORS",
    "DEVICES",
    "OPS",
    "OURS",
    "RTOL_FLOAT32",
    "BenchResult",
    "Case",
    "Ceilings",
    "LayerResult",
    "PythonShare",
    "SideResult",
    "Work",
    "call_breakdown",
    "gpu_available",
    "machine_info",
    "measure_ceilings",
    "parse_layers",
    "plot_roofline",
    "python_share",
    "roofline_floor",
    "run_bench",
    "thread_limits",
    "time_interleaved",
    "time_variants",
    "work",
    "write_json",
]
