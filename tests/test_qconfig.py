"""QuantConfig / QParams: validation, JSON round-trip, and the arithmetic of each scheme."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tvm_compress.errors import UserError
from tvm_compress.quant.config import (
    CALIBRATIONS,
    GRANULARITIES,
    SCHEMES,
    LayerOverride,
    QuantConfig,
    QuantSpec,
)
from tvm_compress.quant.qparams import range_qparams, weight_qparams


@given(wbits=st.integers(2, 8), abits=st.integers(2, 8), scheme=st.sampled_from(SCHEMES),
       gran=st.sampled_from(GRANULARITIES), cal=st.sampled_from(CALIBRATIONS),
       n=st.integers(1, 5000), fp32=st.booleans())
def test_json_round_trip(wbits, abits, scheme, gran, cal, n, fp32):
    config = QuantConfig(weight=QuantSpec(wbits, scheme, gran), activation=QuantSpec(abits, scheme),
                         calibration=cal, calib_samples=n,
                         overrides={"b.conv": LayerOverride(fp32=True) if fp32 else
                                    LayerOverride(weight_bits=4), "a": LayerOverride(6, 8)})
    again = QuantConfig.from_json(config.to_json())
    assert again == config and hash(again) == hash(config)
    assert [k for k, _ in again.overrides] == ["a", "b.conv"]


def test_quantune_space_is_expressible():
    # 3 sample counts x 4 schemes x 2 clippings x 2 granularities x 2 precisions = 96 configs
    configs = {QuantConfig(weight=QuantSpec(8, s, g), activation=QuantSpec(8, s), calibration=c,
                           calib_samples=n,
                           overrides={"fc": LayerOverride(fp32=True)} if mixed else {})
               for n in (1, 100, 1000) for s in SCHEMES for c in ("minmax", "kl")
               for g in GRANULARITIES for mixed in (False, True)}
    assert len(configs) == 96


@pytest.mark.parametrize("kwargs, message", [
    ({"weight": {"bits": 9}}, "bits must be an integer from 2 to 8"),
    ({"weight": {"bits": 1}}, "bits must be an integer from 2 to 8"),
    ({"activation": {"scheme": "affine"}}, "unknown scheme 'affine'"),
    ({"calibration": "entropy2"}, "unknown calibration method"),
    ({"calib_samples": 0}, "calib_samples must be a positive integer"),
    ({"activation": {"granularity": "per_channel"}}, "activations are quantized per tensor"),
    ({"colour": "red"}, "unknown quantization config keys"),
    ({"version": 99}, "config version 99 is not supported"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(UserError, match=message):
        QuantConfig.from_dict(kwargs)


def test_unknown_override_layer_lists_close_matches():
    config = QuantConfig(overrides={"features.3.conv.1": LayerOverride(fp32=True)})
    with pytest.raises(UserError, match=r"unknown layer 'features.3.conv.1'; did you mean "
                                        r"features.3.conv.1.0"):
        config.check_layers(["features.3.conv.1.0", "features.3.conv.2", "classifier.1"])


def test_override_accessors():
    config = QuantConfig(overrides={"a": LayerOverride(weight_bits=4),
                                    "b": LayerOverride(fp32=True)})
    assert config.weight_spec("a").bits == 4 and config.weight_spec("c").bits == 8
    assert config.is_fp32("b") and not config.is_fp32("a")
    with pytest.raises(UserError, match="either fp32 or new bits"):
        LayerOverride(weight_bits=4, fp32=True)


# ----------------------------------------------------------------------------------- qparams


def test_symmetric_narrow_range():
    qp = range_qparams(-2.0, 1.0, QuantSpec(8, "symmetric"))
    assert (qp.qmin, qp.qmax, qp.dtype) == (-127, 127, "int8")
    assert float(qp.scale) == pytest.approx(2.0 / 127) and int(qp.zero_point) == 0


def test_asymmetric_includes_zero_and_is_exact_at_zero():
    qp = range_qparams(0.5, 3.0, QuantSpec(8, "asymmetric"))  # range widened to [0, 3]
    assert qp.dtype == "uint8" and int(qp.zero_point) == 0
    qp = range_qparams(-1.0, 3.0, QuantSpec(8, "asymmetric"))
    assert qp.dequantize(qp.quantize(np.zeros(1, np.float32)))[0] == 0.0


def test_symmetric_uint8_uses_unsigned_for_nonnegative_tensors():
    assert range_qparams(0.0, 6.0, QuantSpec(8, "symmetric_uint8")).dtype == "uint8"
    assert range_qparams(-1.0, 6.0, QuantSpec(8, "symmetric_uint8")).dtype == "int8"


def test_power_of_two_scale():
    qp = range_qparams(-3.0, 3.0, QuantSpec(8, "power_of_two"))
    assert np.log2(float(qp.scale)) == int(np.log2(float(qp.scale)))
    assert float(qp.scale) * 127 >= 3.0  # rounded up: the range is still covered


def test_zero_range_gets_a_sensible_scale():
    qp = range_qparams(0.0, 0.0, QuantSpec(8, "symmetric"))
    assert np.isfinite(float(qp.scale)) and float(qp.scale) > 0
    assert qp.quantize(np.zeros(4, np.float32)).tolist() == [0, 0, 0, 0]


@given(bits=st.integers(2, 8), scheme=st.sampled_from(SCHEMES))
def test_quantization_error_bounded_by_half_step(bits, scheme):
    x = np.linspace(-1.5, 2.5, 101, dtype=np.float32)
    qp = range_qparams(x.min(), x.max(), QuantSpec(bits, scheme))
    err = np.abs(qp.dequantize(qp.quantize(x)) - x)
    assert err.max() <= float(qp.scale) / 2 + 1e-6


def test_per_channel_weights_have_one_scale_per_output_channel():
    w = np.stack([np.full((3, 3, 3), 0.1), np.full((3, 3, 3), 10.0)]).astype(np.float32)
    w[:, 0, 0, 0] *= -1
    qp = weight_qparams(w, QuantSpec(8, "symmetric", "per_channel"), axis=0)
    assert qp.scale.shape == (2,) and qp.scale[1] / qp.scale[0] == pytest.approx(100.0)
    np.testing.assert_allclose(qp.dequantize(qp.quantize(w)), w, rtol=1e-2)
    per_tensor = weight_qparams(w, QuantSpec(8, "symmetric", "per_tensor"), axis=0)
    assert per_tensor.scale.ndim == 0
    assert np.abs(per_tensor.dequantize(per_tensor.quantize(w))[0] - w[0]).max() > 0.01
