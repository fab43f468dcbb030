"""Quantune search space, config keys and model descriptors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tvm_compress.errors import UserError
from tvm_compress.frontend.importers import from_torch
from tvm_compress.quant.config import QuantConfig
from tvm_compress.tuning.quantune.features import (
    DESCRIPTORS,
    feature_matrix,
    feature_names,
    model_descriptors,
)
from tvm_compress.tuning.quantune.space import (
    Knobs,
    SearchSpace,
    calib_sizes,
    config_key,
    make_space,
    mixed_precision_layers,
)


def test_paper_space_has_96_unique_configs_in_a_fixed_order() -> None:
    space = SearchSpace.paper(calib_available=1000)
    configs = [k.config(("first", "last")) for k in space]
    assert len(space) == 96
    assert len({k.key for k in space}) == 96
    assert len({config_key(c) for c in configs}) == 96
    assert len(set(configs)) == 96
    # enumeration is the product in declaration order, last knob fastest
    assert space[0] == Knobs(1, "asymmetric", "minmax", "per_tensor", "int8")
    assert space[1] == Knobs(1, "asymmetric", "minmax", "per_tensor", "mixed")
    assert space[-1] == Knobs(1000, "power_of_two", "kl", "per_channel", "mixed")
    assert [k.key for k in SearchSpace.paper()] == [k.key for k in space]
    assert {k.calib_samples for k in space} == {1, 100, 1000}


def test_config_key_is_stable_across_processes_and_json_round_trips() -> None:
    knobs = Knobs(100, "symmetric_uint8", "kl", "per_channel", "mixed")
    config = knobs.config(("stem.0", "head"))
    # a literal: the key must not change between runs, machines or Python versions
    assert config_key(config) == "0dbfba7ce1a0081e"
    assert config_key(QuantConfig.from_json(config.to_json())) == "0dbfba7ce1a0081e"
    assert config_key(knobs.config(["head", "stem.0"])) == "0dbfba7ce1a0081e"
    assert Knobs.from_dict(knobs.to_dict()) == knobs


def test_knobs_map_to_the_quant_config() -> None:
    c = Knobs(10, "power_of_two", "kl", "per_channel", "mixed", 6).config(("a", "b"))
    assert (c.weight.bits, c.weight.scheme, c.weight.granularity) == (6, "power_of_two",
                                                                      "per_channel")
    assert (c.activation.bits, c.activation.scheme, c.activation.granularity) == (
        8, "power_of_two", "per_tensor")
    assert c.calibration == "kl" and c.calib_samples == 10
    assert c.is_fp32("a") and c.is_fp32("b") and not c.is_fp32("c")
    assert not Knobs(10, "symmetric", "kl", "per_channel", "int8").config(("a",)).overrides


def test_extended_space_and_restrict() -> None:
    ext = SearchSpace.extended()
    assert len(ext) == 384
    assert {k.clipping for k in ext} == {"minmax", "kl", "percentile", "mse"}
    assert {k.weight_bits for k in ext} == {8, 6}
    sub = SearchSpace.paper().restrict(clipping=("minmax",), granularity=("per_tensor",),
                                       precision=("int8",))
    assert len(sub) == 12
    assert all(k in SearchSpace.paper() for k in sub)
    with pytest.raises(UserError, match="no values"):
        SearchSpace.paper().restrict(clipping=("mse",))
    with pytest.raises(UserError, match="unknown knob"):
        SearchSpace.paper().restrict(bits=(8,))
    assert len(make_space("extended", calib_available=1000)) == 384
    assert len(make_space("paper", calib_available=50)) == 96
    with pytest.raises(UserError, match="choose one of paper, extended"):
        make_space("huge", calib_available=10)


def test_calibration_sizes_scale_with_the_calibration_set() -> None:
    assert calib_sizes(1000) == (1, 100, 1000)
    assert calib_sizes(10_000) == (1, 1000, 10_000)
    assert calib_sizes(5) == (1, 5)
    with pytest.raises(UserError, match="empty"):
        calib_sizes(0)


def test_bad_knobs_and_dimensions_are_user_errors() -> None:
    with pytest.raises(UserError, match="unknown scheme"):
        Knobs(1, "sym", "kl", "per_tensor", "int8")
    with pytest.raises(UserError, match="precision"):
        Knobs(1, "symmetric", "kl", "per_tensor", "fp16")
    with pytest.raises(UserError, match="missing"):
        SearchSpace({"scheme": ("symmetric",)})
    with pytest.raises(UserError, match="distinct"):
        SearchSpace({**SearchSpace.paper().dims, "scheme": ("symmetric", "symmetric")})


def test_descriptors_of_tiny_cnn(tiny_cnn: torch.nn.Module) -> None:
    model = from_torch(tiny_cnn, torch.zeros(1, 3, 16, 16))
    d = model_descriptors(model.mod)
    assert set(d) == set(DESCRIPTORS)
    # stem conv, depthwise, pointwise; 3 BN; ReLU + ReLU6 (clip); one residual add
    assert (d["conv"], d["depthwise"], d["pointwise"], d["bn"]) == (3, 1, 1, 3)
    assert d["activation"] == 2
    assert d["skip"] == 1  # the linear's bias add is not a skip
    assert d["params"] == 3 * 16 * 9 + 16 * 9 + 16 * 16 + 16 * 10 + 10
    assert d["nodes"] >= 10
    assert mixed_precision_layers(model.layers) == ("stem.0", "head")


def test_feature_rows_one_hot_the_knobs() -> None:
    d = dict.fromkeys(DESCRIPTORS, 1.0)
    x = feature_matrix(list(SearchSpace.paper()), d)
    names = feature_names()
    assert x.shape == (96, len(names))
    assert len({row.tobytes() for row in x}) == 96
    scheme_cols = [i for i, n in enumerate(names) if n.startswith("scheme=")]
    assert np.all(x[:, scheme_cols].sum(axis=1) == 1)
    assert set(np.round(x[:, names.index("log10_calib_samples")], 6)) == {0.0, 2.0, 3.0}
