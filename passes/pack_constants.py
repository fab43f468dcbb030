"""PackConstants: store narrow integer constants bit-packed; unpack them inside the graph.

Sub-8-bit weights (2-6 bits by default) are computed by the 8-bit integer kernels, so after
lowering they are int8 (or, for kernels that compute in float, integer-valued float32) constants:
one byte or four per weight. This pass finds every large constant whose values are integers
spanning at most ``max_bits`` bits, stores ``value - lo`` as a little-endian bit stream of ``b``
bits per element in a uint8 constant (two 4-bit or four 2-bit values per byte; 3/5/6/7 bits cross
byte borders), and replaces the constant by a ``call_tir`` of a small unpack kernel (two byte
loads, shift, mask, add ``lo``, cast) that rebuilds the exact original tensor.

Requires: the module as it goes to ``tvm.compile`` - after every constant-folding pass (our
schedule pipeline folds constants; ``tvm.compile``'s CPU pipeline does not, so the unpack stays
in the artifact). The unpack runs on every call of ``main``, once per distinct constant per
dataflow block (an unrolled LSTM uses one weight at every step: ddddocr's 65 steps unpacked it
65 times, 114 ms per call); its cost is measured in benchmarks/bench_pack_weights.py. About
1 ns per weight per call is worth paying for a quarter or more of the bytes (6 bits and fewer,
the default), not for the eighth that 7-bit weights save (ResNet-50: 25 ms per call at 7 bits;
7-bit weights are the fast AVX2 int8 option, ``int8_intrin``).
Guarantees: bit-exact - the unpacked tensor equals the original constant (same dtype, shape and
values), so outputs equal the unpacked build exactly. Constants that are not integer-valued, are
smaller than ``min_elements`` or would need more than ``max_bits`` bits are left as they are.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

UNPACK_ATTR = "tvmc.unpack_bits"
# Weight storage dtypes of the lowered kernels (int32 per-channel constants are not weights).
PACKED_DTYPES = ("int8", "uint8", "int16", "float32")


@dataclass(frozen=True)
class PackedConstant:
    """A bit stream of ``bits``-bit codes ``value - lo`` (one spare byte at the end)."""

    data: np.ndarray  # uint8
    bits: int
    lo: int
    shape: tuple[int, ...]
    dtype: str


def needed_bits(values: np.ndarray) -> tuple[int, int] | None:
    """(bits, lo) of integer ``values`` as offsets from their minimum, or None if not integer."""
    if values.size == 0 or values.dtype.kind not in "iuf":
        return None
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)) or not np.array_equal(values, np.round(values)):
            return None
    lo, hi = int(values.min()), int(values.max())
    return max(1, int(hi - lo).bit_length()), lo


def pack_bits(values: np.ndarray, bits: int, lo: int) -> np.ndarray:
    """``values - lo`` as a little-endian stream of ``bits``-bit codes, plus one spare byte."""
    codes = (values.reshape(-1).astype(np.int64) - lo).astype(np.uint64)
    if codes.size and int(codes.max()) >= 1 << bits:
        raise ValueError(f"values do not fit in {bits} bits above {lo}")
    bit_planes = ((codes[:, None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8)
    stream = np.packbits(bit_planes.reshape(-1), bitorder="little")
    return np.concatenate([stream, np.zeros(1, np.uint8)])


def unpack_bits(packed: np.ndarray, bits: int, lo: int, shape: tuple[int, ...],
                dtype: str) -> np.ndarray:
    """NumPy reference of the unpack kernel."""
    n = int(np.prod(shape))
    stream = np.unpackbits(packed, bitorder="little")[: n * bits].reshape(n, bits)
    codes = (stream.astype(np.int64) << np.arange(bits)).sum(axis=1)
    return (codes + lo).astype(dtype).reshape(shape)


def pack_constant(values: np.ndarray, max_bits: int = 6) -> PackedConstant | None:
    found = needed_bits(values)
    if found is None or found[0] > max_bits or found[0] >= 8 * values.dtype.itemsize:
        return None
    bits, lo = found
    return PackedConstant(pack_bits(values, bits, lo), bits, lo, tuple(values.shape),
                          str(values.dtype))


def unpack_func(bits: int, lo: int, dtype: str, ndim: int) -> tirx.PrimFunc:
    """PrimFunc ``packed (uint8, m) -> tensor (d0, ..., d{ndim-1}; dtype)`` for any
    dims (symbolic): one function serves every constant with the same bits, offset and rank."""
    dims = [tirx.Var(f"d{k}", "int64") for k in range(ndim)]
    packed = te.placeholder((tirx.Var("m", "int64"),), "uint8", name="packed")

    def element(*idx: tirx.PrimExpr) -> tirx.PrimExpr:
        flat = idx[0]
        for i, d in zip(idx[1:], dims[1:], strict=True):
            flat = flat * d + i
        bit = flat * bits
        byte = bit >> 3
        word = packed[byte].astype("int32") | (packed[byte + 1].astype("int32") << 8)
        code = (word >> (bit & 7).astype("int32")) & ((1 << bits) - 1)
        return (code + lo).astype(dtype)

    out = te.compute(dims, element, name="unpacked")
    # Left unscheduled: about 1 ns per element on one core; fusing the loops costs integer
    # divisions (30x slower) and threads gain nothing at these sizes.
    func = te.create_prim_func([packed, out]).with_attr(UNPACK_ATTR, bits)
    return func.without_attr("global_symbol")


@mutator
class _Packer(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, min_elements: int, max_bits: int) -> None:
        super().__init__(mod)
        self.min_elements, self.max_bits = min_elements, max_bits
        self.funcs: dict[tuple, relax.GlobalVar] = {}
        self.unpacked: dict[tuple, relax.Var] = {}  # this block's unpacks, by constant
        self.packed = 0

    def visit_dataflow_block_(self, block: relax.DataflowBlock) -> relax.BindingBlock:  # noqa: D102
        self.unpacked = {}  # a block's vars are not visible in the next one
        return super().visit_dataflow_block_(block)

    def visit_binding_block_(self, block: relax.BindingBlock) -> relax.BindingBlock:  # noqa: D102
        self.unpacked = {}
        return super().visit_binding_block_(block)

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
        call = super().visit_call_(call)
        args = [self._arg(a) for a in call.args]
        if all(a.same_as(b) for a, b in zip(args, call.args, strict=True)):
            return call
        return relax.Call(call.op, args, call.attrs, call.ty_args)

    def _arg(self, arg: relax.Expr) -> relax.Expr:
        if isinstance(arg, relax.Tuple):
            fields = [self._arg(f) for f in arg.fields]
            if all(a.same_as(b) for a, b in zip(fields, arg.fields, strict=True)):
                return arg
            return relax.Tuple(fields)
        if not isinstance(arg, tvm.ir.expr.Constant) or \
                not isinstance(arg.value, tvm.runtime.Tensor):
            return arg
        value = arg.value
        if str(value.dtype) not in PACKED_DTYPES or int(np.prod(value.shape)) < self.min_elements:
            return arg
        array = value.numpy()
        same = (array.dtype.str, array.shape, hashlib.sha1(array.tobytes()).hexdigest())
        if same in self.unpacked:
            return self.unpacked[same]
        pc = pack_constant(array, self.max_bits)
        if pc is None:
            return arg
        key = (pc.bits, pc.lo, pc.dtype, len(pc.shape))
        if key not in self.funcs:
            self.funcs[key] = self.builder_.add_func(unpack_func(*key), f"unpack{pc.bits}")
        self.packed += 1
        self.unpacked[same] = self.builder_.emit(relax.call_tir(
            self.funcs[key], [relax.const(pc.data, "uint8")], relax.TensorType(pc.shape, pc.dtype)))
        return self.unpacked[same]


@tvm.ir.transform.module_pass(opt_level=0, name="tvmc.PackConstants")
class PackConstants:
    """Bit-pack large integer-valued constants of ``main`` (see the module docstring).

    Parameters
    ----------
    min_elements : int
        Smaller constants stay as they are (scalars, per-channel vectors).
    max_bits : int
        Pack only constants whose values span at most this many bits (6: not 7-bit weights,
        see the module docstring).
    """

    def __init__(self, min_elements: int = 256, max_bits: int = 6) -> None:
        self.min_elements, self.max_bits = min_elements, max_bits

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext
                         ) -> tvm.IRModule:
        packer = _Packer(mod, self.min_elements, self.max_bits)
        main = packer.visit_expr(mod["main"])
        if not packer.packed:
            return mod
        out = packer.builder_.get()
        out["main"] = main
        return out
