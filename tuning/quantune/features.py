"""Features for Quantune's cost model: one-hot knobs + model descriptors.

Model descriptors follow the paper: node, conv, BatchNorm, activation, skip (residual add),
depthwise and pointwise counts, and size in parameters. They are read from the *unfolded* Relax
module (BatchNorms still present) and its LayerTable, so the same model gives the same numbers
from either frontend.

Categorical knobs are one-hot over every value the quantization core knows (not only the values
of one space), so records of the paper space and the extended space share one feature layout.
The calibration size is encoded as log10(samples): the three sizes differ between datasets
(1/100/1000 here, 1/1000/10000 on ImageNet), and a tree model splits a number as easily as a
one-hot column.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import tvm
from tvm import relax

from tvm_compress.frontend.layers import LayerTable
from tvm_compress.graph.dataflow import bindings, is_const, op_name, shape_of
from tvm_compress.quant.config import CALIBRATIONS, GRANULARITIES, SCHEMES
from tvm_compress.tuning.quantune.space import PRECISIONS, Knobs

DESCRIPTORS = ("nodes", "conv", "bn", "activation", "skip", "depthwise", "pointwise", "params")
FEATURES_VERSION = 1

_ACTIVATIONS = frozenset({
    "relax.nn.relu", "relax.nn.relu6", "relax.clip", "relax.nn.gelu", "relax.nn.gelu_tanh",
    "relax.nn.silu", "relax.sigmoid", "relax.tanh", "relax.nn.leakyrelu", "relax.nn.prelu",
    "relax.nn.selu", "relax.nn.softplus", "relax.nn.hardswish", "relax.nn.hardsigmoid"})


def _is_skip_add(call: relax.Call) -> bool:
    """A residual add: two computed tensors of one shape (a bias add has a constant operand)."""
    a, b = call.args[0], call.args[1]
    if is_const(a) or is_const(b):
        return False
    try:
        return shape_of(a) == shape_of(b)
    except (TypeError, ValueError, AttributeError):
        return False


def model_descriptors(mod: tvm.IRModule) -> dict[str, float]:
    """The paper's model descriptors of an fp32 module (BatchNorms not yet folded).

    ``nodes`` counts operator calls in ``main``; ``conv`` every conv (depthwise and grouped
    included); ``pointwise`` 1x1 convs that are not depthwise; ``params`` conv/linear parameters.
    """
    func = mod["main"]
    layers = LayerTable.from_module(mod)
    ops = [op_name(b.value) for b in bindings(func)]
    calls = [b.value for b in bindings(func) if op_name(b.value)]
    convs = [x for x in layers if x.kind != "linear"]
    return {
        "nodes": float(len(calls)),
        "conv": float(len(convs)),
        "bn": float(ops.count("relax.nn.batch_norm")),
        "activation": float(sum(op in _ACTIVATIONS for op in ops)),
        "skip": float(sum(_is_skip_add(c) for c in calls if op_name(c) == "relax.add")),
        "depthwise": float(layers.count("depthwise")),
        "pointwise": float(sum(x.kernel == (1, 1) and x.kind != "depthwise" for x in convs)),
        "params": float(layers.total_params),
    }


def feature_names() -> list[str]:
    """Column names of :func:`feature_vector`, in order."""
    return (["log10_calib_samples"] + [f"scheme={s}" for s in SCHEMES]
            + [f"clipping={c}" for c in CALIBRATIONS]
            + [f"granularity={g}" for g in GRANULARITIES]
            + [f"precision={p}" for p in PRECISIONS] + ["weight_bits"]
            + [f"model.{d}" for d in DESCRIPTORS])


def feature_vector(knobs: Knobs, descriptors: Mapping[str, float]) -> np.ndarray:
    """One row: knobs (one-hot, log calibration size, weight bits) then model descriptors."""
    row = [math.log10(knobs.calib_samples)]
    for value, choices in ((knobs.scheme, SCHEMES), (knobs.clipping, CALIBRATIONS),
                           (knobs.granularity, GRANULARITIES), (knobs.precision, PRECISIONS)):
        row.extend(float(value == c) for c in choices)
    row.append(float(knobs.weight_bits))
    row.extend(float(descriptors[d]) for d in DESCRIPTORS)
    return np.asarray(row, dtype=np.float32)


def feature_matrix(points: Sequence[Knobs], descriptors: Mapping[str, float]) -> np.ndarray:
    if not points:
        return np.zeros((0, len(feature_names())), dtype=np.float32)
    return np.stack([feature_vector(k, descriptors) for k in points])


def descriptors_match(descriptors: Mapping[str, object]) -> bool:
    """True when a stored descriptor dict has exactly this version's descriptors, as numbers."""
    return set(descriptors) == set(DESCRIPTORS) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        for v in descriptors.values())
