"""Relax pass: exact, cheaper arithmetic for the int64 fixed-point requantization.

``RealizeInteger`` requantizes in int64: ``clip(((sum_i (x_i - z_i) * m_i) + r) >> s + zp)``
cast to 8 bits. As Relax ops each step is a separate int64 element-wise op whose multiplier is
an int64 constant; AVX2 has no 64-bit multiply or arithmetic shift, so LLVM emulates both (about
40 instructions per 8 outputs, more than the convolution itself for 1x1 layers). The chain is
recognised here and replaced by one ``call_te`` with the same result and 32-bit operands:

* one int32 accumulator (convolutions), plus constant int32 biases ``b``: with ``m < 2**31`` and
  ``s >= 32``, ``((acc + b)*m + r) >> s == ((acc*m + (b*m + r)) >> 32) >> (s - 32)``: a
  32 x 32 -> 64 multiply (``vpmuldq``) plus a per-channel 64-bit constant, of which only the
  high half is kept, then an int32 shift;
* the same with ``|acc| * m + |b*m + r| < 2**31`` (the short mantissas ``RealizeInteger``
  gives layers with small accumulators, e.g. depthwise convs): ``(acc*m + (b*m + r)) >> s``
  entirely in int32 (``_low_form``), one 32-bit multiply per output;
* several 8/16-bit inputs (integer add, concat): the multipliers are split in 16-bit halves
  so that both partial sums stay within int32 (``_narrow_sum_fits``), no 64-bit lane at all.

Exact for every input: the rewritten function returns the same integers as the chain. A chain
whose constants do not meet these bounds is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.backend.schedules.blocks import STAGE_ATTR
from tvm_compress.backend.schedules.requantize_intrin import HIGH_MUL, LANES, PRE_SHIFT_ATTR
from tvm_compress.backend.schedules.rewrite import rewrite_functions

_INT32 = 2**31


@dataclass
class _Term:
    """``(source - zero) * multiplier`` of the int64 sum."""

    source: relax.Expr
    zero: np.ndarray
    multiplier: np.ndarray
    bias: np.ndarray  # int32 constants added to an int32 source before the widening cast


@dataclass
class _Chain:
    terms: list[_Term]
    round_add: np.ndarray
    shift: np.ndarray
    zero_point: np.ndarray
    lo: int
    hi: int
    out_dtype: str
    # largest |accumulator| of a single int32 term per output channel (broadcasting with it),
    # when known
    acc_bound: np.ndarray | None = None


def _name(expr: relax.Expr) -> str | None:
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return str(expr.op.name)
    return None


def _dtype(expr: relax.Expr) -> str:
    return str(expr.ty.dtype)


def _range(dtype: str) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


@mutator
class _Lowerer(PyExprMutator):
    def _value(self, expr: relax.Expr) -> relax.Expr:
        if isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            return expr if bound is None else bound
        return expr

    def _const(self, expr: relax.Expr) -> np.ndarray | None:
        value = self._value(expr)
        if isinstance(value, tvm.ir.expr.Constant):
            return value.value.numpy().astype(np.int64)
        return None

    def _call(self, expr: relax.Expr, name: str) -> relax.Call | None:
        value = self._value(expr)
        return value if _name(value) == name else None

    def _with_const(self, expr: relax.Expr, name: str) -> tuple[relax.Expr, np.ndarray] | None:
        """``(x, c)`` for ``expr = name(x, constant c)``."""
        call = self._call(expr, name)
        if call is None:
            return None
        const = self._const(call.args[1])
        return None if const is None else (call.args[0], const)

    def _terms(self, expr: relax.Expr) -> list[_Term] | None:
        product = self._with_const(expr, "relax.multiply")
        if product is None:
            add = self._call(expr, "relax.add")
            if add is None:
                return None
            left, right = self._terms(add.args[0]), self._terms(add.args[1])
            return None if left is None or right is None else left + right
        widened, multiplier = product
        zero = np.zeros((), np.int64)
        centered = self._with_const(widened, "relax.subtract")
        if centered is not None:
            widened, zero = centered
        cast = self._call(widened, "relax.astype")
        if cast is None or _dtype(cast) != "int64" or \
                _dtype(cast.args[0]) not in ("int32", "int16", "int8", "uint8"):
            return None
        source, bias = cast.args[0], np.zeros((), np.int64)
        while _dtype(source) == "int32" and (biased := self._with_const(source, "relax.add")):
            source, const = biased
            bias = bias + const
        return [_Term(source, zero, multiplier, bias)]

    def match(self, call: relax.Call) -> _Chain | None:
        """The requantization chain ending in ``call`` (an ``astype`` to 8 or 16 bits)."""
        if _name(call) != "relax.astype" or _dtype(call) not in ("int8", "uint8", "int16"):
            return None
        clip = self._call(call.args[0], "relax.clip")
        if clip is None or _dtype(clip) != "int64":
            return None
        expr, consts = clip.args[0], []
        for name in ("relax.add", "relax.right_shift", "relax.add"):
            found = self._with_const(expr, name)
            if found is None:
                return None
            expr, const = found
            consts.append(const)
        terms = self._terms(expr)
        shape = [int(d) for d in call.ty.shape]
        if not terms or any([int(d) for d in t.source.ty.shape] != shape for t in terms):
            return None
        zero_point, shift, round_add = consts
        bound = self._conv_bound(terms[0].source) if len(terms) == 1 else None
        return _Chain(terms, round_add, shift, zero_point, int(clip.args[1].value),
                      int(clip.args[2].value), _dtype(call), bound)

    def _conv_bound(self, source: relax.Expr) -> np.ndarray | None:
        """Largest |output| per channel of an 8-bit conv2d with constant weights (NCHW or
        NCHW[b]c, shaped to broadcast with it): the sum of |weights| of the output channel
        times the largest |activation|."""
        conv = self._call(source, "relax.nn.conv2d")
        if conv is None or _dtype(conv.args[0]) not in ("uint8", "int8"):
            return None
        weight = self._const(conv.args[1])
        # OIHW, or the packed OIHW[ib]i[ob]o: the output channel is axis 0 (and 5)
        if weight is None or weight.ndim not in (4, 6) or \
                len(conv.ty.shape) != (4 if weight.ndim == 4 else 5):
            return None
        sums = np.abs(weight).sum(axis=(1, 2, 3) if weight.ndim == 4 else (1, 2, 3, 4))
        lo, hi = _range(_dtype(conv.args[0]))
        shape = (1, -1, 1, 1) if weight.ndim == 4 else (1, sums.shape[0], 1, 1, -1)
        return sums.reshape(shape) * max(abs(lo), abs(hi))

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
        call = super().visit_call_(call)
        chain = self.match(call)
        if chain is None:
            return call
        lowered = lower_chain(self.builder_, chain)
        return call if lowered is None else lowered


def _multipliers_fit(chain: _Chain) -> bool:
    return all(t.multiplier.min() >= 0 and t.multiplier.max() < _INT32 for t in chain.terms)


def _high_offset(chain: _Chain, pre_shift: int = 0) -> np.ndarray:
    """What the high-multiply form adds to ``(acc << pre_shift) * m``: the bias times m, and
    the rounding, shifted alike."""
    term = chain.terms[0]
    return (term.bias * term.multiplier + chain.round_add) << pre_shift


def _normalized(chain: _Chain) -> _Chain:
    """``chain`` with the channels whose multiplier is 0 (all-zero weights) at shift 32: their
    output is the constant ``round >> shift``, which any shift can carry."""
    term = chain.terms[0]
    zero = term.multiplier == 0
    if len(chain.terms) != 1 or not zero.any():
        return chain
    shape = np.broadcast_shapes(term.multiplier.shape, chain.shift.shape,
                                chain.round_add.shape)
    zero = np.broadcast_to(zero, shape)
    shift = np.broadcast_to(chain.shift, shape)
    round_add = np.broadcast_to(chain.round_add, shape)
    new_round = np.where(zero, (round_add >> shift) << 32, round_add)
    return _Chain(chain.terms, new_round, np.where(zero, 32, shift), chain.zero_point,
                  chain.lo, chain.hi, chain.out_dtype, chain.acc_bound)


def _pre_shift(chain: _Chain) -> int | None:
    """Left shift of the accumulator that brings every shift to 32 or more, or None.

    ``((acc + b) * m + r) >> s == (((acc << k) * m + ((b * m + r) << k)) >> 32) >> (s + k - 32)``
    for any ``k >= 0``; ``acc << k`` stays exact in int32 when the accumulator's bound (an 8-bit
    conv's, from its weights) allows. Layers whose real multiplier is 1/2 or more (``s < 32``)
    take the high-multiply form this way instead of int64 arithmetic.
    """
    k = max(0, 32 - int(chain.shift.min()))
    if k == 0:
        return 0
    if chain.acc_bound is None or k > 16 or (int(chain.acc_bound.max()) << k) >= _INT32:
        return None
    return k


def _high_mul_form(chain: _Chain, pre_shift: int = 0) -> bool:
    """One int32 accumulator, shift (after ``pre_shift``) >= 32, and every intermediate within
    int64 / int32."""
    if len(chain.terms) != 1 or _dtype(chain.terms[0].source) != "int32":
        return False
    term = chain.terms[0]
    if np.any(term.zero != 0) or chain.shift.min() + pre_shift < 32 \
            or chain.shift.max() + pre_shift > 62:
        return False
    unshifted = _high_offset(chain)
    if np.abs(term.bias).max() >= _INT32 or np.abs(unshifted).max() >= 2**63 >> pre_shift:
        return False
    offset, m_max = unshifted << pre_shift, int(term.multiplier.max())
    wide = (-_INT32 * m_max + int(offset.min()), (_INT32 - 1) * m_max + int(offset.max()))
    zp = int(np.abs(chain.zero_point).max())
    shift = int(chain.shift.min()) + pre_shift
    return -(2**63) <= wide[0] and wide[1] < 2**63 and \
        max(abs(wide[0] >> shift), abs(wide[1] >> shift)) + zp < _INT32


def _low_form(chain: _Chain) -> bool:
    """One int32 accumulator whose products with the multipliers stay within int32: with
    ``o = b*m + r``, ``((acc + b) * m + r) >> s == (acc * m + o) >> s`` in int32 arithmetic
    when ``|acc| * m + |o| < 2**31`` and ``s <= 31``. ``RealizeInteger`` gives the layers whose
    accumulators allow it mantissas of fewer bits (``mantissa_bits``) for this form: one
    ``vpmulld`` per 16 outputs instead of two ``vpmuldq`` and the shuffles around them."""
    if len(chain.terms) != 1 or _dtype(chain.terms[0].source) != "int32" \
            or chain.acc_bound is None:
        return False
    term = chain.terms[0]
    if np.any(term.zero != 0) or chain.shift.min() < 0 or chain.shift.max() > 31:
        return False
    offset = np.abs(_high_offset(chain))
    return int((chain.acc_bound * term.multiplier + offset).max()) < _INT32


def _term_span(term: _Term) -> int:
    """Largest ``|source - zero|`` over the source dtype's range."""
    lo, hi = _range(_dtype(term.source))
    return max(abs(lo - int(term.zero.min())), abs(hi - int(term.zero.max())),
               abs(lo - int(term.zero.max())), abs(hi - int(term.zero.min())))


def _narrow_sum_fits(chain: _Chain) -> bool:
    """8/16-bit terms whose shifted sum fits int32, summed in two 32-bit halves.

    With ``m = h * 2**16 + l`` and ``r = rh * 2**16 + rl`` (``0 <= l, rl < 2**16``),
    ``(sum(d * m) + r) >> s == (sum(d * h) + rh + ((sum(d * l) + rl) >> 16)) >> (s - 16)`` for
    ``s >= 16``: every product and partial sum stays within int32 when the bounds below hold.
    """
    if any(_dtype(t.source) == "int32" for t in chain.terms) or chain.shift.min() < 16 \
            or chain.shift.max() > 47:  # an int32 shift by 32 or more is undefined
        return False
    high = sum(_term_span(t) * (int(t.multiplier.max()) >> 16) for t in chain.terms)
    low = sum(_term_span(t) * 0xFFFF for t in chain.terms) + 0xFFFF
    high += int(np.abs(chain.round_add >> 16).max()) + (low >> 16)
    return low < _INT32 and high + int(np.abs(chain.zero_point).max()) < _INT32


def _lanes_shape(chain: _Chain) -> tuple[int, ...] | None:
    """Per-channel constant shape of a chain on NCHW8c / NCHW16c data (the intrinsic's case)."""
    shape = [int(d) for d in chain.terms[0].source.ty.shape]
    if len(shape) != 5 or shape[-1] not in LANES:
        return None
    return np.broadcast_shapes(chain.terms[0].multiplier.shape, chain.round_add.shape,
                               (1,) * 4 + (shape[-1],))


def _forms(chain: _Chain) -> tuple[str, dict[str, np.ndarray]] | None:
    """The form of ``chain``'s 32-bit lowering and its constants, or None."""
    if not _multipliers_fit(chain):
        return None
    if _low_form(chain):
        term = chain.terms[0]
        return "low", {"multiplier": term.multiplier, "offset": _high_offset(chain),
                       "shift": chain.shift, "zero_point": chain.zero_point}
    normalized = _normalized(chain)
    pre_shift = _pre_shift(normalized)
    if pre_shift is not None and _high_mul_form(normalized, pre_shift):
        chain = normalized
        term = chain.terms[0]
        consts = {"multiplier": term.multiplier, "offset": _high_offset(chain, pre_shift),
                  "shift": chain.shift + pre_shift - 32, "zero_point": chain.zero_point,
                  "pre_shift": np.array(pre_shift)}
        lanes = _lanes_shape(chain)
        if lanes is None:
            return "high", consts
        # the offset carries the per-channel bias even when the multiplier is per tensor
        lanes = np.broadcast_shapes(lanes, *(np.shape(consts[k])
                                             for k in ("multiplier", "offset", "shift")))
        for key in ("multiplier", "offset", "shift"):
            consts[key] = np.broadcast_to(consts[key], lanes)
        return "high_lanes", consts
    if not _narrow_sum_fits(chain):
        return None
    consts = {"round_high": chain.round_add >> 16, "round_low": chain.round_add & 0xFFFF,
              "shift": chain.shift - 16, "zero_point": chain.zero_point}
    for i, t in enumerate(chain.terms):
        consts[f"high{i}"], consts[f"low{i}"] = t.multiplier >> 16, t.multiplier & 0xFFFF
        consts[f"zero{i}"] = t.zero
    return "narrow", consts


def lower_chain(bb: relax.BlockBuilder, chain: _Chain) -> relax.Expr | None:
    """``call_te`` of the exact 32-bit form of ``chain``, or None when no form applies."""
    found = _forms(chain)
    if found is None:
        return None
    form, consts = found
    tensors = {k: v for k, v in consts.items() if v.ndim}
    scalars = {k: int(v) for k, v in consts.items() if not v.ndim}
    wide = {"offset"} if form.startswith("high") else set()
    dtypes = {k: "int64" if k in wide else "int32" for k in tensors}
    # relax.const narrows int64 arrays to int32 unless the dtype is given
    args = [*(t.source for t in chain.terms),
            *(relax.const(np.ascontiguousarray(v, dtypes[k]), dtypes[k])
              for k, v in tensors.items())]
    return bb.call_te(_requantize_te, *args, names=list(tensors), scalars=scalars,
                      sources=len(chain.terms), form=form, lo=chain.lo, hi=chain.hi,
                      out_dtype=chain.out_dtype, primfunc_name_hint="requantize")


def _requantize_te(*inputs: te.Tensor, names: list[str], scalars: dict[str, int], sources: int,
                   form: str, lo: int, hi: int, out_dtype: str) -> te.Tensor:
    shape = [int(d) for d in inputs[0].shape]
    tensors = dict(zip(names, inputs[sources:], strict=True))

    def at(key: str, index: tuple, dtype: str) -> tirx.PrimExpr:
        if key in scalars:
            return tirx.const(scalars[key], dtype)
        tensor = tensors[key]
        offset = len(index) - len(tensor.shape)
        return tensor[tuple(0 if int(d) == 1 else index[offset + i]
                            for i, d in enumerate(tensor.shape))].astype(dtype)

    pre_shift = scalars.get("pre_shift", 0)

    def high(*index):
        acc = inputs[0][index]
        if pre_shift:
            acc = acc << tirx.const(pre_shift, "int32")
        wide = acc.astype("int64") * at("multiplier", index, "int64") \
            + at("offset", index, "int64")
        return (wide >> tirx.const(32, "int64")).astype("int32") >> at("shift", index, "int32")

    def narrow(*index):
        high, low = at("round_high", index, "int32"), at("round_low", index, "int32")
        for i in range(sources):
            centered = inputs[i][index].astype("int32") - at(f"zero{i}", index, "int32")
            high = high + centered * at(f"high{i}", index, "int32")
            low = low + centered * at(f"low{i}", index, "int32")
        return (high + (low >> tirx.const(16, "int32"))) >> at("shift", index, "int32")

    def low(*index):
        return (inputs[0][index] * at("multiplier", index, "int32")
                + at("offset", index, "int32")) >> at("shift", index, "int32")

    if form == "narrow":
        shifted = narrow
    elif form == "low":
        shifted = low
    else:
        stage = te.compute(shape, high, name="requantize_high",
                           attrs={STAGE_ATTR: HIGH_MUL, PRE_SHIFT_ATTR: pre_shift}
                           if form == "high_lanes" else None)
        shifted = lambda *i: stage[i]  # noqa: E731

    def body(*index):
        y = shifted(*index) + at("zero_point", index, "int32")
        return tirx.max(tirx.min(y, tirx.const(hi, "int32")), tirx.const(lo, "int32")) \
            .astype(out_dtype)

    return te.compute(shape, body, name="requantize")


@tvm.ir.transform.module_pass(opt_level=0, name="LowerRequantize")
def lower_requantize(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Replace int64 requantization chains by their exact 32-bit form (see module docstring)."""
    return rewrite_functions(mod, _Lowerer(mod))
