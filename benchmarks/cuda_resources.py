"""Resource report of the shipped CUDA kernels, without a GPU: registers, shared memory, spills.

    python benchmarks/cuda_resources.py [--all] [--ptxas PATH]

Each kernel specialisation is compiled to PTX for compute capability 9.0 (numba-cuda, as the
PTX tests do, with the launch bounds the backend uses) and assembled with ``ptxas -v`` (from
the ``nvidia-cuda-nvcc`` wheel that the ``cuda12`` extra brings, or a CUDA toolkit). The last
column is the resident blocks per multiprocessor that the registers and shared memory allow on
sm_90, by the occupancy rules. Without ``--all`` only the float32 3x3 builds and the generic
ones are reported.
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="every specialisation and dtype")
    ap.add_argument("--ptxas", default=None, help="path to ptxas")
    args = ap.parse_args()
    from numba_dsconv.cuda._resources import assemble, blocks_per_sm, find_ptxas

    ptxas = args.ptxas or find_ptxas()
    if ptxas is None:
        print("ptxas not found: pip install 'numba-dsconv[cuda12]' or pass --ptxas")
        return 2
    from numba import cuda

    from numba_dsconv import _config
    from numba_dsconv.cuda._jit import launch_bounds
    from numba_dsconv.cuda._ptx import ptx_cases

    tile = tuple(_config.CUDA_GEMM_TILE)
    threads = (tile[0] // tile[3]) * (tile[1] // tile[4])
    print(
        f"GEMM tile (TP, TN, TK, RP, RN) = {tile}: {threads} threads per block, launch bounds "
        f"{launch_bounds(threads, _config.CUDA_GEMM_REGISTERS)}; 1-D kernels: "
        f"{_config.CUDA_THREADS} threads per block; ptxas {ptxas}"
    )
    print(f"{'kernel':40} {'regs':>5} {'smem B':>7} {'stack':>6} {'spill st/ld':>12} {'blk/SM':>6}")
    for name, fn, sig, opts in ptx_cases(tile, _config.CUDA_GEMM_REGISTERS):
        if not args.all and not (
            "float32" in name and ("(3, 3" in name or "(0, 0" in name or name.startswith("pointw"))
        ):
            continue
        ptx, _ = cuda.compile_ptx(fn, sig, cc=(9, 0), **opts)
        r = assemble(ptx, ptxas)
        nthreads = threads if opts else _config.CUDA_THREADS
        occ = blocks_per_sm(r["registers"], r["shared"], nthreads)
        print(
            f"{name:40} {r['registers']:>5} {r['shared']:>7} {r['stack']:>6} "
            f"{str(r['spill_stores']) + '/' + str(r['spill_loads']):>12} {occ:>6}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
