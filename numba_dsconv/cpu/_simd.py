"""Explicit SIMD vectors for the CPU kernels (the GEMM register block, the depthwise sweep).

One ``Vec`` is VEC_BYTES of a float dtype held as an LLVM vector value: 64 bytes (16 float32 or
8 float64) in one zmm register on an AVX-512 CPU (explicit 512-bit vectors are legal even where
LLVM prefers 256-bit vectors for its own vectorisers), 32 bytes (one ymm register) elsewhere.
``vfma`` is ``llvm.fma``: one rounding, as a fused multiply-add instruction. With explicit
vector values the shape of the generated code is fixed by the source, not by how LLVM's loop and
SLP vectorisers happen to read a loop (BENCHMARKS.md, "Design measurements").

Vectors are typed from an array argument or a dtype, so float32 and float64 kernels share one
source. Nothing is bounds-checked: callers keep every access inside its array.
"""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic, models, register_model

from .._spec import Activation


def _vector_bytes() -> int:
    """64 where Numba compiles for AVX-512 (the features it targets: NUMBA_CPU_FEATURES, else
    the host's), else 32: AVX2's 16 ymm registers hold the GEMM block's 12 accumulators only
    at that width. Numba's cache keys compiled kernels by the same features, so a cached kernel
    never meets the other width."""
    feats = config.CPU_FEATURES
    if feats is None:
        try:
            feats = llvm.get_host_cpu_features().flatten()
        except Exception:  # pragma: no cover - host without feature detection
            return 32
    return 64 if "+avx512f" in feats.split(",") else 32


VEC_BYTES = _vector_bytes()


class Vec(types.Type):
    """A 64-byte vector of ``dtype`` lanes."""

    def __init__(self, dtype: types.Float) -> None:
        self.dtype = dtype
        self.lanes = VEC_BYTES * 8 // dtype.bitwidth
        super().__init__(name=f"Vec({dtype}x{self.lanes})")


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        elem = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(elem, fe_type.lanes))


def _element_pointer(context, builder, arrty, arr, idxtys, idxs):
    """Address of arr[idx...]: base + sum(idx_d * stride_d) (no bounds or negative-index
    handling)."""
    ary = context.make_array(arrty)(context, builder, arr)
    strides = cgutils.unpack_tuple(builder, ary.strides, arrty.ndim)
    intp = context.get_value_type(types.intp)
    offset = ir.Constant(intp, 0)
    for ty, idx, stride in zip(idxtys, idxs, strides, strict=True):
        i = context.cast(builder, idx, ty, types.intp)
        offset = builder.add(offset, builder.mul(i, stride))
    base = builder.ptrtoint(ary.data, intp)
    ptr = builder.inttoptr(builder.add(base, offset), ary.data.type)
    return ptr


def _splat(builder, vty, value):
    lanes = vty.count
    zero = ir.Constant(ir.IntType(32), 0)
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, zero)
    mask = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), mask)


def _is_rows(arr, idx) -> bool:
    """A C-contiguous float array indexed by one integer per dimension (1-D or 2-D)."""
    return (
        isinstance(arr, types.Array)
        and arr.layout == "C"
        and isinstance(arr.dtype, types.Float)
        and arr.ndim == len(idx)
        and all(isinstance(i, types.Integer) for i in idx)
    )


@intrinsic
def vload2(typingctx, arr, i, j):
    """``arr[i, j : j + lanes]`` of a C-contiguous 2-D float array, as a vector."""
    return _vload(arr, (i, j))


def _vload(arr, idx):
    if not _is_rows(arr, idx):
        return None
    vt = Vec(arr.dtype)

    def codegen(context, builder, sig, args):
        p = _element_pointer(context, builder, sig.args[0], args[0], sig.args[1:], args[1:])
        vp = builder.bitcast(p, context.get_value_type(vt).as_pointer())
        return builder.load(vp, align=arr.dtype.bitwidth // 8)

    return vt(arr, *idx), codegen


@intrinsic
def vstore2(typingctx, arr, i, j, v):
    """``arr[i, j : j + lanes] = v``."""
    return _vstore(arr, (i, j), v)


def _vstore(arr, idx, v):
    if not (_is_rows(arr, idx) and isinstance(v, Vec) and v.dtype == arr.dtype):
        return None
    n = len(idx)

    def codegen(context, builder, sig, args):
        p = _element_pointer(
            context, builder, sig.args[0], args[0], sig.args[1 : n + 1], args[1 : n + 1]
        )
        vp = builder.bitcast(p, args[n + 1].type.as_pointer())
        builder.store(args[n + 1], vp, align=arr.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(arr, *idx, v), codegen


@intrinsic
def vfma(typingctx, a, x, acc):
    """``acc + a * x`` lane by lane with one rounding (llvm.fma); ``a`` a vector or a scalar
    broadcast to every lane."""
    if not (isinstance(x, Vec) and acc == x):
        return None
    if not (a == x or isinstance(a, (types.Float, types.Integer))):
        return None

    def codegen(context, builder, sig, args):
        vty = args[1].type
        if isinstance(sig.args[0], Vec):
            s = args[0]
        else:
            s = _splat(builder, vty, context.cast(builder, args[0], sig.args[0], x.dtype))
        name = f"llvm.fma.v{x.lanes}f{x.dtype.bitwidth}"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3), name)
        return builder.call(fn, [s, args[1], args[2]])

    return x(a, x, acc), codegen


@intrinsic
def vadd(typingctx, a, b):
    """``a + b`` lane by lane."""
    if not (isinstance(a, Vec) and a == b):
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])

    return a(a, b), codegen


@intrinsic
def vzero(typingctx, dt):
    """A vector of zeros of dtype ``dt``."""
    if not isinstance(dt, types.DType):
        return None
    vt = Vec(dt.dtype)

    def codegen(context, builder, sig, args):
        return ir.Constant(context.get_value_type(vt), [0.0] * vt.lanes)

    return vt(dt), codegen


@intrinsic
def vact(typingctx, v, code):
    """The Activation ``code`` lane by lane: NONE, RELU (v < 0 -> 0), RELU6 (also v > 6 -> 6).
    Ordered compares: a NaN lane stays NaN, -0.0 stays -0.0."""
    if not (isinstance(v, Vec) and isinstance(code, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        vty = args[0].type
        c = context.cast(builder, args[1], sig.args[1], types.int64)
        zero = ir.Constant(vty, [0.0] * v.lanes)
        six = ir.Constant(vty, [6.0] * v.lanes)
        none = ir.Constant(ir.IntType(64), int(Activation.NONE))
        on = builder.icmp_signed("!=", c, none)
        six_on = builder.icmp_signed("==", c, ir.Constant(ir.IntType(64), int(Activation.RELU6)))
        low = builder.and_(
            builder.fcmp_ordered("<", args[0], zero),
            _splat(builder, ir.VectorType(ir.IntType(1), v.lanes), on),
        )
        r = builder.select(low, zero, args[0])
        high = builder.and_(
            builder.fcmp_ordered(">", r, six),
            _splat(builder, ir.VectorType(ir.IntType(1), v.lanes), six_on),
        )
        return builder.select(high, six, r)

    return v(v, code), codegen


@intrinsic
def vpassed(typingctx, v, maddr, mdt, code):
    """``v`` lane by lane where the activation ``code``'s derivative passes, else 0, read from
    the mask's lanes (as many as v has, of dtype ``mdt`` at byte address ``maddr``: an
    activation's output or input, or a bool mask as uint8): RELU where m > 0, RELU6 where
    0 < m < 6 (torch's convention at the kinks: 0; a NaN m: 0), NONE everywhere."""
    if not (
        isinstance(v, Vec)
        and isinstance(maddr, types.Integer)
        and isinstance(mdt, types.DType)
        and isinstance(code, types.Integer)
    ):
        return None
    mty = mdt.dtype
    if not isinstance(mty, (types.Float, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        vty = args[0].type
        lanes = v.lanes
        mvty = ir.VectorType(context.get_value_type(mty), lanes)
        m = builder.load(_typed_pointer(context, builder, args[1], sig.args[1], mvty), align=1)
        c = context.cast(builder, args[3], sig.args[3], types.int64)
        if isinstance(mty, types.Float):
            zero, six = ir.Constant(mvty, [0.0] * lanes), ir.Constant(mvty, [6.0] * lanes)
            above = builder.fcmp_ordered(">", m, zero)
            below = builder.fcmp_ordered("<", m, six)
        else:
            zero, six = ir.Constant(mvty, [0] * lanes), ir.Constant(mvty, [6] * lanes)
            cmp = builder.icmp_signed if mty.signed else builder.icmp_unsigned
            above, below = cmp(">", m, zero), cmp("<", m, six)
        bits = ir.VectorType(ir.IntType(1), lanes)
        six_on = builder.icmp_signed("==", c, ir.Constant(ir.IntType(64), int(Activation.RELU6)))
        none = builder.icmp_signed("==", c, ir.Constant(ir.IntType(64), int(Activation.NONE)))
        keep = builder.and_(above, builder.or_(below, _splat(builder, bits, builder.not_(six_on))))
        keep = builder.or_(keep, _splat(builder, bits, none))
        return builder.select(keep, args[0], ir.Constant(vty, [0.0] * lanes))

    return v(v, maddr, mdt, code), codegen


@intrinsic
def vtranspose(typingctx, src, src_stride, dst, dst_stride, dt):
    """dst row k, lane i = src row i, lane k for a square block of L x L ``dt`` values (L the
    lanes of a vector): L vectors loaded from byte address ``src`` (rows ``src_stride`` bytes
    apart), transposed in registers (log2 L rounds of two-source shuffles, each swapping one
    bit of the row index with the same bit of the lane index), stored as L vectors at ``dst``
    (rows ``dst_stride`` bytes apart). Unaligned loads and stores."""
    if not (
        isinstance(src, types.Integer)
        and isinstance(src_stride, types.Integer)
        and isinstance(dst, types.Integer)
        and isinstance(dst_stride, types.Integer)
        and isinstance(dt, types.DType)
    ):
        return None
    vt = Vec(dt.dtype)

    def codegen(context, builder, sig, args):
        vty = context.get_value_type(vt)
        n = vt.lanes
        align = dt.dtype.bitwidth // 8
        intp = context.get_value_type(types.intp)
        base_s = context.cast(builder, args[0], sig.args[0], types.intp)
        step_s = context.cast(builder, args[1], sig.args[1], types.intp)
        base_d = context.cast(builder, args[2], sig.args[2], types.intp)
        step_d = context.cast(builder, args[3], sig.args[3], types.intp)

        def row(base, step, i):
            a = builder.add(base, builder.mul(step, ir.Constant(intp, i)))
            return builder.inttoptr(a, vty.as_pointer())

        rows = [builder.load(row(base_s, step_s, i), align=align) for i in range(n)]
        b = n // 2
        while b >= 1:
            ity = ir.VectorType(ir.IntType(32), n)
            lo = ir.Constant(ity, [j if j & b == 0 else n + j - b for j in range(n)])
            hi = ir.Constant(ity, [j + b if j & b == 0 else n + j for j in range(n)])
            for i in range(n):
                if i & b == 0:
                    a, c = rows[i], rows[i + b]
                    rows[i] = builder.shuffle_vector(a, c, lo)
                    rows[i + b] = builder.shuffle_vector(a, c, hi)
            b //= 2
        for k in range(n):
            builder.store(rows[k], row(base_d, step_d, k), align=align)
        return context.get_dummy_value()

    return types.none(src, src_stride, dst, dst_stride, dt), codegen


# Raw-address access, for the GEMM register block: a helper that takes arrays pays a
# reference-count update per array per call (an atomic on memory every thread shares);
# addresses are plain integers. The caller keeps the arrays alive and the offsets in bounds.


@intrinsic
def address(typingctx, arr):
    """The address of ``arr``'s first element, as an integer (no reference is taken)."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.ptrtoint(ary.data, context.get_value_type(types.intp))

    return types.intp(arr), codegen


def _typed_pointer(context, builder, addr, addr_ty, elem_ty):
    a = context.cast(builder, addr, addr_ty, types.intp)
    return builder.inttoptr(a, elem_ty.as_pointer())


@intrinsic
def vloadp(typingctx, addr, dt):
    """The vector of ``dt`` at byte address ``addr``."""
    if not (isinstance(addr, types.Integer) and isinstance(dt, types.DType)):
        return None
    vt = Vec(dt.dtype)

    def codegen(context, builder, sig, args):
        vty = context.get_value_type(vt)
        return builder.load(
            _typed_pointer(context, builder, args[0], sig.args[0], vty),
            align=dt.dtype.bitwidth // 8,
        )

    return vt(addr, dt), codegen


@intrinsic
def vloadp_part(typingctx, addr, n, dt):
    """The vector of ``dt`` at byte address ``addr`` with only its first ``n`` lanes read (none
    where n <= 0), the others zero (llvm.masked.load: the lanes past n touch no memory, so
    they may lie past the end of an array)."""
    if not (
        isinstance(addr, types.Integer)
        and isinstance(n, types.Integer)
        and isinstance(dt, types.DType)
    ):
        return None
    vt = Vec(dt.dtype)

    def codegen(context, builder, sig, args):
        vty = context.get_value_type(vt)
        lanes = vt.lanes
        i32 = ir.IntType(32)
        count = context.cast(builder, args[1], sig.args[1], types.int32)
        index = ir.Constant(ir.VectorType(i32, lanes), list(range(lanes)))
        mask = builder.icmp_signed("<", index, _splat(builder, index.type, count))
        zero = ir.Constant(vty, [0.0] * lanes)
        ptr = _typed_pointer(context, builder, args[0], sig.args[0], vty)
        name = f"llvm.masked.load.v{lanes}f{dt.dtype.bitwidth}.p0"
        fnty = ir.FunctionType(vty, [ptr.type, i32, mask.type, vty])
        fn = cgutils.get_or_insert_function(builder.module, fnty, name)
        align = ir.Constant(i32, dt.dtype.bitwidth // 8)
        return builder.call(fn, [ptr, align, mask, zero])

    return vt(addr, n, dt), codegen


@intrinsic
def vstorep(typingctx, addr, v):
    """Store vector ``v`` at byte address ``addr``."""
    if not (isinstance(addr, types.Integer) and isinstance(v, Vec)):
        return None

    def codegen(context, builder, sig, args):
        p = _typed_pointer(context, builder, args[0], sig.args[0], args[1].type)
        builder.store(args[1], p, align=v.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(addr, v), codegen


@intrinsic
def vstorep_part(typingctx, addr, v, n):
    """Store only the first ``n`` lanes of vector ``v`` at byte address ``addr`` (none where
    n <= 0, all where n >= its lanes; llvm.masked.store: the lanes past n touch no memory)."""
    if not (isinstance(addr, types.Integer) and isinstance(v, Vec)):
        return None
    if not isinstance(n, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        vty = args[1].type
        lanes = v.lanes
        i32 = ir.IntType(32)
        count = context.cast(builder, args[2], sig.args[2], types.int32)
        index = ir.Constant(ir.VectorType(i32, lanes), list(range(lanes)))
        mask = builder.icmp_signed("<", index, _splat(builder, index.type, count))
        ptr = _typed_pointer(context, builder, args[0], sig.args[0], vty)
        name = f"llvm.masked.store.v{lanes}f{v.dtype.bitwidth}.p0"
        fnty = ir.FunctionType(ir.VoidType(), [vty, ptr.type, i32, mask.type])
        fn = cgutils.get_or_insert_function(builder.module, fnty, name)
        align = ir.Constant(i32, v.dtype.bitwidth // 8)
        builder.call(fn, [args[1], ptr, align, mask])
        return context.get_dummy_value()

    return types.none(addr, v, n), codegen


@intrinsic
def loadp(typingctx, addr, dt):
    """The scalar ``dt`` at byte address ``addr``."""
    if not (isinstance(addr, types.Integer) and isinstance(dt, types.DType)):
        return None

    def codegen(context, builder, sig, args):
        ety = context.get_value_type(dt.dtype)
        return builder.load(_typed_pointer(context, builder, args[0], sig.args[0], ety))

    return dt.dtype(addr, dt), codegen


@intrinsic
def storep(typingctx, addr, value, dt):
    """Store ``value`` (cast to ``dt``) at byte address ``addr``."""
    if not (isinstance(addr, types.Integer) and isinstance(dt, types.DType)):
        return None

    def codegen(context, builder, sig, args):
        ety = context.get_value_type(dt.dtype)
        v = context.cast(builder, args[1], sig.args[1], dt.dtype)
        builder.store(v, _typed_pointer(context, builder, args[0], sig.args[0], ety))
        return context.get_dummy_value()

    return types.none(addr, value, dt), codegen


def _prefetch_codegen(locality: int):
    """The body of a read prefetch into the data cache (llvm.prefetch) at ``locality``: 2 asks
    for L2 (prefetcht1), 3 for L1 (prefetcht0)."""

    def codegen(context, builder, sig, args):
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        p = _typed_pointer(context, builder, args[0], sig.args[0], ir.IntType(8))
        args = [p, ir.Constant(i32, 0), ir.Constant(i32, locality), ir.Constant(i32, 1)]
        builder.call(fn, args)
        return context.get_dummy_value()

    return codegen


@intrinsic
def prefetch(typingctx, addr):
    """Ask for the cache line at byte address ``addr`` to be brought into L2 (a hint: it never
    faults and changes no result)."""
    if not isinstance(addr, types.Integer):
        return None
    return types.none(addr), _prefetch_codegen(2)


@intrinsic
def prefetch_l1(typingctx, addr):
    """Ask for the cache line at byte address ``addr`` to be brought into L1 (prefetcht0; a
    hint: it never faults and changes no result)."""
    if not isinstance(addr, types.Integer):
        return None
    return types.none(addr), _prefetch_codegen(3)


@intrinsic
def opaque(typingctx, value):
    """``value`` unchanged, through an empty inline assembly statement that LLVM cannot see
    into. A loop that advances its pointers as ``p = opaque(p + step)`` keeps one register per
    pointer and addresses its loads as p plus loop-invariant offsets: where LLVM sees every
    address as a recurrence of its own it gives each one a register (loop strength reduction),
    and the 3x3 depthwise loop's 9-18 addresses ran out of registers: inlined into the kernels,
    its loop had ~25 stack loads and stores beside its 18 FMAs; the one-vector loop on rows in
    L1, one thread, took 10.3 cycles per output vector, 4.8 with ``opaque``. LLVM treats the
    statement as one that may read or write memory: loads are neither merged nor moved across
    it (values already in registers stay there), so it belongs only where that costs nothing,
    at the end of a loop body."""
    if not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        ty = args[0].type
        fnty = ir.FunctionType(ty, [ty])
        return builder.asm(fnty, "", "=r,0", [args[0]], side_effect=False, name="opaque")

    return value(value), codegen
