"""Channel-group analysis: which channel axes shrink together, per group kind and on real models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import relax_main
from tvm import relax

from tvm_compress.errors import UserError
from tvm_compress.frontend.importers import export_onnx, from_onnx, from_torch
from tvm_compress.graph.channel_groups import ChannelGroup, analyze_channel_groups, check_plan
from tvm_compress.zoo import fmnist

RNG = np.random.default_rng(0)


_module = relax_main


def _conv(bb: relax.BlockBuilder, x: relax.Expr, cin: int, cout: int, groups: int = 1
          ) -> relax.Var:
    w = RNG.standard_normal((cout, cin // groups, 1, 1)).astype("float32")
    return bb.emit(relax.op.nn.conv2d(x, relax.const(w), groups=groups))


def _member(group: ChannelGroup, kind: str, name: str):  # noqa: ANN202
    found = [m for m in group.members if m.kind == kind and m.name == name]
    assert len(found) == 1, (kind, name, [(m.kind, m.name) for m in group.members])
    return found[0]


def _owner(groups: list[ChannelGroup], layer: str) -> ChannelGroup:
    return next(g for g in groups if layer in g.producers)


def test_tiny_cnn_groups(tiny_cnn, tiny_input):
    groups = analyze_channel_groups(from_torch(tiny_cnn, tiny_input).mod)
    assert [g.id for g in groups] == [0, 1, 2]
    inp, body, out = groups
    assert (inp.size, inp.prunable, inp.reason) == (3, False, "model input")
    assert (out.size, out.prunable, out.reason) == (10, False, "model output")
    assert body.prunable and body.size == 16 and body.zero_preserving
    # stem, the depthwise conv on it and the residual partner pw: one group, with their BNs.
    assert body.producers == ["stem.0", "dw.0", "pw.0"]
    assert body.layers(("conv_in", "linear_in")) == ["pw.0", "head"]
    assert sorted(m.layer for m in body.members if m.kind == "batch_norm") == \
        ["dw.0", "pw.0", "stem.0"]
    assert _member(body, "depthwise", "dw.0").axis == 0
    assert _member(body, "linear_in", "head").axis == 0
    assert all(m.is_identity for m in body.members)
    assert _member(out, "bias", _member(out, "bias", "lv15").name).layer == "head"


def test_concat_offsets():
    def body(bb, x):  # noqa: ANN001, ANN202
        a, b = _conv(bb, x, 4, 3), _conv(bb, x, 4, 2)
        return _conv(bb, bb.emit(relax.op.concat([a, b], axis=1)), 5, 6)

    groups = analyze_channel_groups(_module((1, 4, 2, 2), body))
    a, b = _owner(groups, "conv_0"), _owner(groups, "conv_1")
    assert (a.size, b.size, a.prunable, b.prunable) == (3, 2, True, True)
    assert _member(a, "conv_in", "conv_2").channels == (0, 1, 2, -1, -1)
    assert _member(b, "conv_in", "conv_2").channels == (-1, -1, -1, 0, 1)
    assert _member(b, "conv_in", "conv_2").positions == (3, 4)


def test_split_and_slice_offsets():
    def body(bb, x):  # noqa: ANN001, ANN202
        a = _conv(bb, x, 4, 6)
        parts = bb.emit(relax.op.split(a, [2], axis=1))
        left = _conv(bb, bb.emit(relax.TupleGetItem(parts, 0)), 2, 3)
        right = bb.emit(relax.op.strided_slice(bb.emit(relax.TupleGetItem(parts, 1)),
                                               axes=[1], begin=[1], end=[4]))
        return relax.op.concat([left, _conv(bb, right, 3, 2)], axis=1)

    groups = analyze_channel_groups(_module((1, 4, 2, 2), body))
    a = _owner(groups, "conv_0")
    assert a.size == 6 and a.prunable
    assert _member(a, "conv_in", "conv_1").channels == (0, 1)
    assert _member(a, "conv_in", "conv_2").channels == (3, 4, 5)


def test_channel_shuffle_ties_blocks_and_permutes():
    def body(bb, x):  # noqa: ANN001, ANN202
        a = _conv(bb, x, 4, 4)
        s = bb.emit(relax.op.reshape(a, (1, 2, 2, 2, 2)))
        s = bb.emit(relax.op.permute_dims(s, [0, 2, 1, 3, 4]))
        return _conv(bb, bb.emit(relax.op.reshape(s, (1, 4, 2, 2))), 4, 3)

    groups = analyze_channel_groups(_module((1, 4, 2, 2), body))
    a = _owner(groups, "conv_0")
    # Channel b of block 0 and channel b of block 1 stay or go together: 2 group channels.
    assert a.size == 2 and a.prunable
    assert _member(a, "conv_out", "conv_0").channels == (0, 1, 0, 1)
    assert _member(a, "conv_in", "conv_1").channels == (0, 0, 1, 1)


def test_flatten_linear_repeats_each_channel():
    def body(bb, x):  # noqa: ANN001, ANN202
        a = _conv(bb, x, 2, 4)
        flat = bb.emit(relax.op.reshape(a, (1, 36)))
        return relax.op.matmul(flat, relax.const(np.ones((36, 5), "float32")))

    mod = _module((1, 2, 3, 3), body)
    a = _owner(analyze_channel_groups(mod), "conv_0")
    assert _member(a, "linear_in", "linear_0").channels == tuple(np.repeat(np.arange(4), 9))


def test_depthwise_multiplier_follows_its_input():
    def body(bb, x):  # noqa: ANN001, ANN202
        a = _conv(bb, x, 4, 3)
        dw = _conv(bb, a, 3, 6, groups=3)
        return _conv(bb, dw, 6, 2)

    groups = analyze_channel_groups(_module((1, 4, 2, 2), body))
    a = _owner(groups, "conv_0")
    assert a.producers == ["conv_0", "conv_1"] and a.prunable
    assert _member(a, "depthwise", "conv_1").channels == (0, 0, 1, 1, 2, 2)
    assert _member(a, "conv_in", "conv_2").channels == (0, 0, 1, 1, 2, 2)


def test_grouped_conv_and_unknown_ops_are_unprunable():
    def body(bb, x):  # noqa: ANN001, ANN202
        a = _conv(bb, x, 4, 4)
        g = _conv(bb, a, 4, 4, groups=2)
        s = bb.emit(relax.op.nn.softmax(_conv(bb, g, 4, 4), axis=1))
        return _conv(bb, s, 4, 2)

    groups = analyze_channel_groups(_module((1, 4, 2, 2), body))
    for layer in ("conv_0", "conv_1"):
        group = _owner(groups, layer)
        assert not group.prunable and "grouped conv 'conv_1' (groups=2)" in group.reason
    softmax = _owner(groups, "conv_2")
    assert not softmax.prunable and "relax.nn.softmax" in softmax.reason
    with pytest.raises(UserError, match="cannot be cropped"):
        check_plan(groups, {softmax.id: [0]})


def test_residual_add_unites_producers_and_sigmoid_is_not_zero_preserving():
    def body(bb, x):  # noqa: ANN001, ANN202
        a = _conv(bb, x, 4, 3)
        b = _conv(bb, bb.emit(relax.op.sigmoid(a)), 3, 3)
        return _conv(bb, bb.emit(relax.op.add(a, b)), 3, 2)

    groups = analyze_channel_groups(_module((1, 4, 2, 2), body))
    a = _owner(groups, "conv_0")
    assert a.producers == ["conv_0", "conv_1"] and a.size == 3
    assert a.prunable and not a.zero_preserving


def test_onnx_import_gives_the_same_groups(tmp_path):
    torch.manual_seed(0)
    module = fmnist.shufflenet_v2().eval()
    x = torch.zeros(1, 1, 28, 28)
    from_t = analyze_channel_groups(from_torch(module, x).mod)
    from_o = analyze_channel_groups(from_onnx(export_onnx(module, x, tmp_path / "s.onnx")).mod)
    assert [(g.size, g.prunable, g.producers) for g in from_t] == \
        [(g.size, g.prunable, g.producers) for g in from_o]
    # ShuffleNet: the shuffle ties each unit's passthrough half to the branch output.
    assert len(_owner(from_t, "features.1.branch2.2.0").producers) >= 3
