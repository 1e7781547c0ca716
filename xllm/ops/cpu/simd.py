"""SIMD operations numba cannot be talked into, on 16-lane accumulators.

The integer kernels (intmatmul.py) need one operation LLVM's auto-vectoriser
never produced from plain numba loops, however they were written:

    acc += float(pairwise products of 32 activations x 32 int8 weights) * scale

that is, for lanes l = 0..15,

    acc[l] += (x[2l] * w[2l] + x[2l + 1] * w[2l + 1]) * scale

(numba does integer arithmetic in 64-bit lanes, and the vectoriser then
reduced every block to one number, so the kernel spent its time on the
horizontal sums rather than on the products). Written directly in LLVM IR,
the operation is a `vpmovsxbw` (int8 -> int16) of the weights, one
`vpmaddwd` (16 products and 16 additions into int32 lanes), one `vcvtdq2ps`
and one fused multiply-add, and the accumulator stays in registers across
the whole row: the one horizontal sum is done at the end (`hsum`). This is
the inner step of llama.cpp's q8_0 dot product, without the intrinsics
header. The activations may be int8 or int16 (`vpmaddwd` multiplies 16-bit
lanes either way).

The float weights need the same kind of help: `load` reads 16 float32 or
float16 numbers into the lanes (for float16 one `vcvtph2ps`, which numba
has no way to ask for), and `fma` multiplies and adds them lane by lane,
so that a GEMV keeps four rows' accumulators in registers (cpu/matmul.py).

`F32x16` is that accumulator: a numba type whose LLVM representation is
<16 x float> (two ymm registers on AVX2, one zmm on AVX-512). Inside a
numba function it is an ordinary value:

    acc = simd.zeros()
    for c in range(0, K, 32):
        acc = simd.dot32_i8(acc, xq, c, w, c, scale)
    total = simd.hsum(acc)

Arrays are passed with a flat element offset (arrays must be C-contiguous;
the caller computes offset = row * row_length + column, which keeps the
addressing visible in the kernel). Nothing is bounds-checked: the callers'
loops are.

The lanes are summed in the fixed order of `hsum`, so a result never
depends on anything but its inputs. With NUMBA_DISABLE_JIT=1 these
operations cannot run (they exist only as LLVM IR); intmatmul.py then uses
the plain-Python bodies of kernels/qdot.py instead.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, models, register_model

LANES = 16
_F32 = ir.FloatType()
_VF = ir.VectorType(_F32, LANES)


class F32x16(types.Type):
    """16 float32 lanes held in SIMD registers (see the module docstring)."""

    def __init__(self):
        super().__init__(name="F32x16")


f32x16 = F32x16()


@register_model(F32x16)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VF)


def _mask(indices) -> ir.Constant:
    """A shufflevector mask: the lanes to take, in order."""
    indices = list(indices)
    return ir.Constant(ir.VectorType(ir.IntType(32), len(indices)), indices)


def _element_pointer(context, builder, array_type, array, offset, element: ir.Type):
    """A pointer to element `offset` (flat, in elements) of a C-contiguous array, as `element`*."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [offset]), element.as_pointer())


def _load_ints(context, builder, array_type, array, offset, n: int):
    """n consecutive integers of an int8 or int16 array from element `offset`, as <n x i8/i16>."""
    element = ir.IntType(array_type.dtype.bitwidth)
    pointer = _element_pointer(context, builder, array_type, array, offset, element)
    return builder.load(builder.bitcast(pointer, ir.VectorType(element, n).as_pointer()), align=1)


def _madd(builder, xv, wv):
    """The products of the <32 x int> xv and wv (8- or 16-bit lanes), summed in pairs: <16 x i32>.

    Written as sign extension to 32 bits, multiplication and the sum of even
    and odd lanes, which LLVM recognises as `vpmaddwd` (operands that fit
    16 bits). The weights' integers are never more than 8 bits.
    """
    i32x32 = ir.VectorType(ir.IntType(32), 2 * LANES)
    products = builder.mul(builder.sext(xv, i32x32), builder.sext(wv, i32x32), flags=["nsw"])
    even = builder.shuffle_vector(products, products, _mask(range(0, 2 * LANES, 2)))
    odd = builder.shuffle_vector(products, products, _mask(range(1, 2 * LANES, 2)))
    return builder.add(even, odd, flags=["nsw"])


def _splat(builder, scale):
    """<16 x float> with every lane `scale`."""
    one = builder.insert_element(ir.Constant(_VF, None), scale, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, one, _mask([0] * LANES))


def _madd_fma(builder, acc, xv, wv, scale):
    """acc + float(`_madd`(xv, wv)) * scale: vpmaddwd, vcvtdq2ps, vfmadd."""
    as_float = builder.sitofp(_madd(builder, xv, wv), _VF)
    return builder.fadd(acc, builder.fmul(as_float, _splat(builder, scale), flags=["contract"]), flags=["contract"])


class I32x16(types.Type):
    """16 int32 lanes held in SIMD registers: an integer accumulator, for a
    block longer than 32 values (w8a8's block is the whole row), whose chunks
    can be added as integers before the one conversion to float."""

    def __init__(self):
        super().__init__(name="I32x16")


i32x16 = I32x16()
_VI = ir.VectorType(ir.IntType(32), LANES)


@register_model(I32x16)
class _I32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VI)


@intrinsic
def zeros_i32(typingctx):
    """A new integer accumulator, every lane 0."""
    def codegen(context, builder, signature, args):
        return ir.Constant(_VI, [0] * LANES)
    return i32x16(), codegen


@intrinsic
def idot32_i8(typingctx, acc, x, x_off, w, w_off):
    """acc + (pairwise products of x[x_off : x_off + 32] and w[w_off : w_off + 32]), in int32 lanes.

    The integer part of `dot32_i8`: vpmaddwd and vpaddd (one vpdpwssd where
    LLVM finds AVX-512 VNNI). Lane l gains x[2l] w[2l] + x[2l + 1] w[2l + 1].
    """
    if not (isinstance(acc, I32x16) and _check_ints(x, w)):
        return None

    def codegen(context, builder, signature, args):
        acc_v, x_a, x_o, w_a, w_o = args
        _, x_t, _, w_t, _ = signature.args
        xv = _load_ints(context, builder, x_t, x_a, x_o, 2 * LANES)
        wv = _load_ints(context, builder, w_t, w_a, w_o, 2 * LANES)
        return builder.add(acc_v, _madd(builder, xv, wv))
    return i32x16(acc, x, types.intp, w, types.intp), codegen


@intrinsic
def add_scaled(typingctx, acc, ints, scale):
    """acc + float(ints) * scale, lane by lane: an integer accumulator into a float one."""
    if not (isinstance(acc, F32x16) and isinstance(ints, I32x16)):
        return None

    def codegen(context, builder, signature, args):
        acc_v, ints_v, s = args
        scaled = builder.fmul(builder.sitofp(ints_v, _VF), _splat(builder, s), flags=["contract"])
        return builder.fadd(acc_v, scaled, flags=["contract"])
    return f32x16(acc, ints, types.float32), codegen


@intrinsic
def zeros(typingctx):
    """A new accumulator, every lane 0."""
    def codegen(context, builder, signature, args):
        return ir.Constant(_VF, [0.0] * LANES)
    return f32x16(), codegen


@intrinsic
def hsum(typingctx, acc):
    """The sum of the 16 lanes (pairwise: lanes l and l + 8, then l + 4, ...), as float32."""
    if not isinstance(acc, F32x16):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        width = LANES
        while width > 1:
            width //= 2
            low = builder.shuffle_vector(v, v, _mask(range(width)))
            high = builder.shuffle_vector(v, v, _mask(range(width, 2 * width)))
            v = builder.fadd(low, high)
        return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))
    return types.float32(acc), codegen


@intrinsic
def hsum4(typingctx, a0, a1, a2, a3):
    """(hsum(a0), hsum(a1), hsum(a2), hsum(a3)), the same four numbers bit for bit, in
    about a third of the instructions: the four vectors share each shuffle and addition
    of the halving steps (two 8-lane halves side by side, then four 4-lane quarters, ...)."""
    if not all(isinstance(v, F32x16) for v in (a0, a1, a2, a3)):
        return None

    def codegen(context, builder, signature, args):
        def halve(u, v, width):
            # Lanes [u's lanes l and l + width/2 added, for each of its groups of `width`;
            # then the same for v]: each group of `width` lanes becomes one of width/2.
            n = u.type.count
            low = [g + l for g in range(0, n, width) for l in range(width // 2)]
            both_low = low + [n + i for i in low]
            both_high = [i + width // 2 for i in both_low]
            return builder.fadd(builder.shuffle_vector(u, v, _mask(both_low)),
                                builder.shuffle_vector(u, v, _mask(both_high)))
        v0, v1, v2, v3 = args
        w01 = halve(v0, v1, LANES)          # 8 lanes of v0's partial sums, then 8 of v1's
        w23 = halve(v2, v3, LANES)
        x = halve(w01, w23, 8)              # 4 lanes each of v0, v1, v2, v3
        y = halve(x, x, 4)                  # 2 lanes each (twice over)
        z = halve(y, y, 2)                  # 1 lane each (four times over)
        sums = [builder.extract_element(z, ir.Constant(ir.IntType(32), i)) for i in range(4)]
        return context.make_tuple(builder, signature.return_type, sums)
    return types.UniTuple(types.float32, 4)(a0, a1, a2, a3), codegen


def _check_ints(x, w) -> bool:
    """x int8 or int16 (activations), w int8 or uint8 (weights)."""
    return (isinstance(x, types.Array) and x.dtype in (types.int8, types.int16)
            and isinstance(w, types.Array) and w.dtype in (types.int8, types.uint8))


@intrinsic
def dot32_i8(typingctx, acc, x, x_off, w, w_off, scale):
    """acc + float(pairwise products of x[x_off : x_off + 32] and w[w_off : w_off + 32]) * scale.

    x int8 or int16, w int8 arrays (any number of dimensions, C-contiguous, offsets flat).
    Lane l gets x[2l] w[2l] + x[2l + 1] w[2l + 1] of the 32 values.
    """
    if not (isinstance(acc, F32x16) and _check_ints(x, w)):
        return None

    def codegen(context, builder, signature, args):
        acc_v, x_a, x_o, w_a, w_o, s = args
        _, x_t, _, w_t, _, _ = signature.args
        xv = _load_ints(context, builder, x_t, x_a, x_o, 2 * LANES)
        wv = _load_ints(context, builder, w_t, w_a, w_o, 2 * LANES)
        return _madd_fma(builder, acc_v, xv, wv, s)
    return f32x16(acc, x, types.intp, w, types.intp, types.float32), codegen


@intrinsic
def dot32_i4(typingctx, acc, x, x_off, w, w_off, scale):
    """`dot32_i8` for a 4-bit weight block: w[w_off : w_off + 16] holds 32 values as nibbles.

    Byte j holds value j in its low 4 bits and value j + 16 in its high 4
    bits (GGUF's q4_0/q4_1 packing), so the unpacked block is the low
    nibbles followed by the high nibbles: values 0..15, each as it is stored
    (the caller accounts for q4_0's "- 8" and q4_1's offset).
    """
    if not (isinstance(acc, F32x16) and _check_ints(x, w)):
        return None

    def codegen(context, builder, signature, args):
        acc_v, x_a, x_o, w_a, w_o, s = args
        _, x_t, _, w_t, _, _ = signature.args
        xv = _load_ints(context, builder, x_t, x_a, x_o, 2 * LANES)
        packed = _load_ints(context, builder, w_t, w_a, w_o, LANES)
        i8x16 = ir.VectorType(ir.IntType(8), LANES)
        low = builder.and_(packed, ir.Constant(i8x16, [15] * LANES))
        high = builder.lshr(packed, ir.Constant(i8x16, [4] * LANES))
        wv = builder.shuffle_vector(low, high, _mask(range(2 * LANES)))
        return _madd_fma(builder, acc_v, xv, wv, s)
    return f32x16(acc, x, types.intp, w, types.intp, types.float32), codegen


# ---------------------------------------------------------------- float lanes: float32 and float16 rows

def _check_float(array, dtype=None) -> bool:
    """A float32 array (dtype float32), or float32 or float16 bits (dtype None)."""
    return isinstance(array, types.Array) and array.dtype in ((dtype,) if dtype else (types.float32, types.uint16))


@intrinsic
def load(typingctx, a, offset):
    """a[offset : offset + 16] as float32 lanes: a float32 array, the uint16 bits of float16 numbers,
    or int8 numbers (an int8 KV cache, before its scale).

    float16 is widened by one `vcvtph2ps` on a CPU with F16C (every AVX2 CPU
    has it): exact, as every float16 is a float32, and equal to
    `f16.f16_bits_to_f32` of each element. int8 becomes `vpmovsxbd` and `vcvtdq2ps`, exact too.
    """
    if not (_check_float(a) or (isinstance(a, types.Array) and a.dtype == types.int8)):
        return None

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        if array_type.dtype == types.float32:
            pointer = _element_pointer(context, builder, array_type, args[0], args[1], _F32)
            return builder.load(builder.bitcast(pointer, _VF.as_pointer()), align=4)
        if array_type.dtype == types.int8:
            return builder.sitofp(_load_ints(context, builder, array_type, args[0], args[1], LANES), _VF)
        pointer = _element_pointer(context, builder, array_type, args[0], args[1], ir.HalfType())
        halves = builder.load(builder.bitcast(pointer, ir.VectorType(ir.HalfType(), LANES).as_pointer()), align=2)
        return builder.fpext(halves, _VF)
    return f32x16(a, types.intp), codegen


@intrinsic
def store(typingctx, v, dst, dst_off):
    """dst[dst_off : dst_off + 16] = the lanes of v (dst a float32 array)."""
    if not (isinstance(v, F32x16) and _check_float(dst, types.float32)):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[1], args[1], args[2], _F32)
        builder.store(args[0], builder.bitcast(pointer, _VF.as_pointer()), align=4)
        return context.get_dummy_value()
    return types.none(v, dst, types.intp), codegen


@intrinsic
def fma(typingctx, acc, a, b):
    """acc + a * b, lane by lane (one fused multiply-add)."""
    if not all(isinstance(v, F32x16) for v in (acc, a, b)):
        return None

    def codegen(context, builder, signature, args):
        acc_v, a_v, b_v = args
        return builder.fadd(acc_v, builder.fmul(a_v, b_v, flags=["contract"]), flags=["contract"])
    return f32x16(acc, a, b), codegen


@intrinsic
def splat(typingctx, x):
    """16 lanes, each the float32 x."""
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, signature, args):
        return _splat(builder, context.cast(builder, args[0], signature.args[0], types.float32))
    return f32x16(x), codegen
