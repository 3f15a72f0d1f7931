"""Resource report of the shipped CUDA kernels, without a GPU: registers, shared memory, spills.

    python benchmarks/cuda_resources.py [--all] [--ptxas PATH]

Each kernel specialisation is compiled to PTX for compute capability 9.0 (numba-cuda, as the
PTX tests do) and assembled with ``ptxas -v`` (from the ``nvidia-cuda-nvcc`` wheel that the
``cuda12`` extra brings, or a CUDA toolkit). Without ``--all`` only the float32 3x3 builds and
the generic ones are reported.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile


def find_ptxas() -> str | None:
    found = shutil.which("ptxas")
    if found:
        return found
    for pattern in (
        os.path.join(sys.prefix, "lib", "python*", "site-packages", "nvidia", "*", "bin", "ptxas"),
        "/usr/local/cuda*/bin/ptxas",
    ):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1]
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="every specialisation and dtype")
    ap.add_argument("--ptxas", default=None, help="path to ptxas")
    args = ap.parse_args()
    ptxas = args.ptxas or find_ptxas()
    if ptxas is None:
        print("ptxas not found: pip install 'numba-dsconv[cuda12]' or pass --ptxas")
        return 2
    from numba import cuda

    from numba_dsconv import _config
    from numba_dsconv.cuda import kernels

    tile = tuple(_config.CUDA_GEMM_TILE)
    threads = (tile[0] // tile[3]) * (tile[1] // tile[4])
    print(
        f"GEMM tile (TP, TN, TK, RP, RN) = {tile}: {threads} threads per block; "
        f"1-D kernels: {_config.CUDA_THREADS} threads per block"
    )
    print(f"{'kernel':45} {'regs':>5} {'smem B':>7} {'stack':>6} {'spill st/ld':>12}")
    for name, fn, sig in kernels.ptx_cases(tile):
        if not args.all and not (
            "float32" in name
            and ("(3, 3" in name or "(0, 0" in name or name.startswith(("pointwise", "copy4d")))
        ):
            continue
        ptx, _ = cuda.compile_ptx(fn, sig, cc=(9, 0))
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "k.ptx")
            with open(src, "w") as fh:
                fh.write(ptx)
            proc = subprocess.run(
                [ptxas, "-arch=sm_90", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                capture_output=True,
                text=True,
            )
        text = proc.stderr
        regs = re.search(r"Used (\d+) registers", text)
        smem = re.search(r"(\d+) bytes smem", text)
        stack = re.search(r"(\d+) bytes stack frame", text)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
        print(
            f"{name:45} {regs.group(1) if regs else '?':>5} {smem.group(1) if smem else '0':>7} "
            f"{stack.group(1) if stack else '?':>6} "
            f"{(spills.group(1) + '/' + spills.group(2)) if spills else '?':>12}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
