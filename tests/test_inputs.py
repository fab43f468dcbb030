"""Sample sets for models with several inputs (frontend.inputs) and --input-shape parsing."""

from __future__ import annotations

import numpy as np
import pytest

from tvm_compress.errors import UserError
from tvm_compress.frontend.inputs import (
    InputSpec,
    as_feed,
    batches,
    check_samples,
    gather_outputs,
    num_samples,
    take,
)
from tvm_compress.frontend.loader import parse_input_shapes

SPECS = (InputSpec("img", (2, 3, 4, 4), "float32"), InputSpec("mask", (2, 1, 4, 4), "float32"))


def _data(n: int) -> dict[str, np.ndarray]:
    return {"img": np.arange(n * 48, dtype="float32").reshape(n, 3, 4, 4),
            "mask": np.arange(n * 16, dtype="float32").reshape(n, 1, 4, 4)}


def test_batches_pad_the_last_chunk_and_gather_drops_the_padding():
    feed = _data(5)
    chunks = list(batches(feed, 2))
    assert [n for _, n in chunks] == [2, 2, 1]
    last, _ = chunks[-1]
    assert last["img"].shape == (2, 3, 4, 4) and not last["img"][1].any()
    repeated, _ = list(batches(feed, 2, pad="repeat"))[-1]
    np.testing.assert_array_equal(repeated["mask"][1], feed["mask"][4])
    # A batch-first output is cut back to 5 samples; a sequence-first one (T, batch, C) cannot
    # be cut and is stacked per run.
    outs = [([c["img"].sum(axis=(2, 3)), np.ones((7, 2, 3))], n) for c, n in chunks]
    per_sample, seq_first = gather_outputs(outs, 2)
    np.testing.assert_array_equal(per_sample, feed["img"].sum(axis=(2, 3)))
    assert seq_first.shape == (3, 7, 2, 3)


def test_feeds_are_checked_against_the_specs():
    assert num_samples(take(_data(5), 1, 3)) == 2
    with pytest.raises(UserError, match=r"lacks input\(s\) mask; the model's inputs are img "
                                        r"2x3x4x4, mask 2x1x4x4"):
        as_feed({"img": _data(2)["img"]}, SPECS)
    with pytest.raises(UserError, match="different sample counts"):
        as_feed({"img": _data(2)["img"], "mask": _data(3)["mask"]}, SPECS)
    with pytest.raises(UserError, match="has 2 inputs"):
        as_feed(_data(2)["img"], SPECS)
    with pytest.raises(UserError, match=r"model input 'mask' expects \(1, 4, 4\) per sample"):
        check_samples({"img": _data(2)["img"], "mask": np.zeros((2, 2, 4, 4), "float32")},
                      SPECS, "data")
    with pytest.raises(UserError, match="dtype float64"):
        check_samples({"img": _data(2)["img"].astype("float64"), "mask": _data(2)["mask"]},
                      SPECS, "data")


def test_parse_input_shapes():
    assert parse_input_shapes(["1x3x48x192"]) == {None: (1, 3, 48, 192)}
    assert parse_input_shapes(["img:1x3x640x640", "mask:1X1X640X640"]) == {
        "img": (1, 3, 640, 640), "mask": (1, 1, 640, 640)}
    assert parse_input_shapes(["scope:x:1x2"]) == {"scope:x": (1, 2)}  # names may hold ':'
    with pytest.raises(UserError, match="expected dimensions like 1x3x224x224"):
        parse_input_shapes(["img:1x3xHx640"])
    with pytest.raises(UserError, match="given twice"):
        parse_input_shapes(["img:1x3", "img:1x3"])
    with pytest.raises(UserError, match="without a name is for single-input models"):
        parse_input_shapes(["1x3", "img:1x3"])
