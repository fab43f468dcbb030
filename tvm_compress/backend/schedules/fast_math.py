"""exp, sigmoid, tanh, erf as plain float32 arithmetic, so CPU kernels vectorize them.

TVM lowers ``tirx.exp`` (and ``sigmoid``, ``tanh``, ``erf``, which expand to it) to LLVM's
``llvm.exp.f32``; without a vector math library LLVM scalarizes that into one ``expf`` call per
lane. A conv whose epilogue is SiLU (``x * sigmoid(x)``: EfficientNet, YOLO) then ran at 5% of
peak, a 16-lane vector epilogue costing 16 libm calls. Here every such op is legalized into
arithmetic LLVM vectorizes: exp by range reduction (``x = n ln2 + r``, ``|r| <= ln2 / 2``), a
degree-6 polynomial for ``e^r`` and ``2^n`` built from the exponent bits; the others from exp.
Accuracy (float32, tests): exp relative error below 3e-7 over [-87, 88] (inputs outside
saturate at ``e^-87`` / ``e^88``); sigmoid and tanh absolute error below 1e-7; erf and GELU
below 5e-7 (erf relative 1e-6 near 0). Other dtypes keep TVM's own legalization.

Each formula binds its input once (``Let``), so a fused chain stays linear in size; TVM's LLVM
codegen still re-simplifies bound values, and a kernel nesting these ops four deep (rare: an
LSTM cell nests two) takes tens of seconds to compile.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from tvm import relax, te, tirx, topi

from tvm_compress.backend.schedules.compute import tvm_legalization

_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 = hi + lo, hi exact in 9 bits
_LOG2E = 1.44269504088896341
# e^r - 1 - r = r^2 (c0 + c1 r + ... + c5 r^5) on |r| <= ln2/2: least-squares fit of the series.
_EXP_POLY = (5.0000001201e-1, 1.6666665459e-1, 4.1665795894e-2, 8.3334519073e-3,
             1.3981999507e-3, 1.9875691500e-4)
# erf(x) = 1 - t (a1 + a2 t + ... + a5 t^4) e^(-x^2), t = 1 / (1 + p x), x >= 0
# (Abramowitz & Stegun 7.1.26, absolute error 1.5e-7).
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
# Near 0 that form cancels (1 - ~1 in float32); there the Maclaurin series, to x^11:
# erf(x) = 2/sqrt(pi) sum (-1)^n x^(2n+1) / (n! (2n + 1)).
_ERF_SERIES = tuple(2 / math.sqrt(math.pi) * (-1) ** n / (math.factorial(n) * (2 * n + 1))
                    for n in range(6))


def _f(value: float) -> tirx.PrimExpr:
    return tirx.const(value, "float32")


def _let(value: tirx.PrimExpr, body: Callable[[tirx.PrimExpr], tirx.PrimExpr],
         name: str = "v") -> tirx.PrimExpr:
    """``body(v)`` with ``v`` bound once to ``value``: the formulas use their input several
    times, and without the binding a chain of them (inlined into one kernel) grows
    exponentially."""
    if hasattr(value, "asobject"):  # a te TensorSlice (``x[i]``)
        value = value.asobject()
    if isinstance(value, (tirx.Var, tirx.FloatImm)):
        return body(value)
    var = tirx.Var(name, value.ty)
    return tirx.Let(var, value, body(var))


def exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """e^x for a float32 expression, as vectorizable arithmetic."""
    def reduced(x: tirx.PrimExpr) -> tirx.PrimExpr:
        n = tirx.floor(x * _f(_LOG2E) + _f(0.5))
        return _let(n, lambda n: _let(x - n * _f(_LN2_HI) - n * _f(_LN2_LO),
                                      lambda r: _exp_reduced(n, r), "r"), "n")

    return _let(tirx.max(tirx.min(x, _f(88.0)), _f(-87.0)), reduced, "x")  # 2^n stays normal


def _exp_reduced(n: tirx.PrimExpr, r: tirx.PrimExpr) -> tirx.PrimExpr:
    poly = _f(_EXP_POLY[-1])
    for c in reversed(_EXP_POLY[:-1]):
        poly = poly * r + _f(c)
    e_r = poly * r * r + r + _f(1.0)
    return e_r * tirx.reinterpret("float32", (n.astype("int32") + 127) << 23)


def sigmoid(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """1 / (1 + e^-x)."""
    return _f(1.0) / (_f(1.0) + exp(-x))


def tanh(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """tanh(x) = sign(x) (1 - t) / (1 + t), t = e^(-2|x|): no overflow, no cancellation in t."""
    def body(x: tirx.PrimExpr) -> tirx.PrimExpr:
        magnitude = _let(exp(_f(-2.0) * tirx.abs(x)),
                         lambda t: (_f(1.0) - t) / (_f(1.0) + t), "t")
        return _let(magnitude, lambda m: tirx.Select(x < _f(0.0), -m, m), "m")

    return _let(x, body)


def _erf_parts(x: tirx.PrimExpr, combine: Callable[..., tirx.PrimExpr]) -> tirx.PrimExpr:
    """``combine(x, small, series, erfc)``: ``|x| < 0.5``, erf(x) by the series, and
    erfc(|x|) by the rational-times-Gaussian form."""
    def body(x: tirx.PrimExpr) -> tirx.PrimExpr:
        def with_t(t: tirx.PrimExpr) -> tirx.PrimExpr:
            poly = _f(_ERF_A[-1])
            for a in reversed(_ERF_A[:-1]):
                poly = poly * t + _f(a)
            return poly * t

        def with_x2(x2: tirx.PrimExpr) -> tirx.PrimExpr:
            series = _f(_ERF_SERIES[-1])
            for c in reversed(_ERF_SERIES[:-1]):
                series = series * x2 + _f(c)
            erfc = _let(_f(1.0) / (_f(1.0) + _f(_ERF_P) * tirx.abs(x)), with_t, "t") * exp(-x2)
            return _let(series * x, lambda s: _let(
                erfc, lambda e: combine(x, tirx.abs(x) < _f(0.5), s, e), "erfc"), "series")

        return _let(x * x, with_x2, "x2")

    return _let(x, body)


def erf(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """erf(x), odd: the series below |x| = 0.5, 1 - erfc(|x|) above."""
    def combine(x, small, series, erfc):  # noqa: ANN001, ANN202
        tail = _f(1.0) - erfc
        return tirx.Select(small, series, tirx.Select(x < _f(0.0), -tail, tail))

    return _erf_parts(x, combine)


def gelu(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """x Phi(x) = x (1 + erf(z)) / 2, z = x / sqrt 2; for z < 0, 1 + erf(z) = erfc(|z|)
    directly (no cancellation where GELU's negative tail is small)."""
    def combine(z, small, series, erfc):  # noqa: ANN001, ANN202
        one_plus_erf = tirx.Select(small, _f(1.0) + series,
                                   tirx.Select(z < _f(0.0), erfc, _f(2.0) - erfc))
        return _f(0.7071067811865476 ** -1 * 0.5) * z * one_plus_erf  # x / 2 = z / sqrt 2

    return _erf_parts(x * _f(0.7071067811865476), combine)


def gelu_tanh(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """The tanh approximation of GELU."""
    return _let(x, lambda x: _f(0.5) * x * (_f(1.0) + tanh(
        _f(0.7978845608028654) * (x + _f(0.044715) * x * x * x))))


def silu(x: tirx.PrimExpr) -> tirx.PrimExpr:
    return _let(x, lambda x: x * sigmoid(x))


_ELEMENTWISE: dict[str, Callable[[tirx.PrimExpr], tirx.PrimExpr]] = {
    "relax.exp": exp, "relax.sigmoid": sigmoid, "relax.tanh": tanh, "relax.erf": erf,
    "relax.nn.gelu": gelu, "relax.nn.gelu_tanh": gelu_tanh, "relax.nn.silu": silu,
}


def _is_f32(call: relax.Call) -> bool:
    return str(getattr(call.args[0].ty, "dtype", "")) == "float32"


def _elementwise(name: str, fn: Callable[[tirx.PrimExpr], tirx.PrimExpr]) -> Callable:
    short = name.rsplit(".", 1)[-1]

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        if not _is_f32(call):
            return tvm_legalization(bb, call)
        return bb.call_te(lambda x: te.compute(x.shape, lambda *i: fn(x(*i)), name=short),
                          call.args[0], primfunc_name_hint=short)

    return legalize


def _softmax(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """max, exp(x - max), sum, divide: TVM's four stages with the vectorizable exp."""
    if not _is_f32(call):
        return tvm_legalization(bb, call)

    def compute(x: te.Tensor, axis: int) -> te.Tensor:
        axis = axis % len(x.shape)
        peak = topi.max(x, axis=axis, keepdims=True)

        def at_reduced(index: tuple) -> tuple:
            return tuple(0 if d == axis else v for d, v in enumerate(index))

        shifted = te.compute(x.shape, lambda *i: exp(x(*i) - peak(*at_reduced(i))),
                             name="softmax_exp")
        total = topi.sum(shifted, axis=axis, keepdims=True)
        return te.compute(x.shape, lambda *i: shifted(*i) / total(*at_reduced(i)),
                          name="softmax_norm")

    return bb.call_te(compute, call.args[0], int(call.attrs.axis), primfunc_name_hint="softmax")


def legalizers() -> dict[str, Any]:
    """``LegalizeOps`` overrides: float32 transcendental ops as vectorizable arithmetic."""
    table: dict[str, Any] = {name: _elementwise(name, fn) for name, fn in _ELEMENTWISE.items()}
    table["relax.nn.softmax"] = _softmax
    return table
