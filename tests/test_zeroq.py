"""ZeroQ: distillation, the Pareto DP, data-free calibration and mixed precision on real models."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tvm_compress.errors import UserError
from tvm_compress.quant.config import QuantConfig
from tvm_compress.tuning.zeroq.distill import distill, gaussian_images, torch_module_of
from tvm_compress.tuning.zeroq.mixed import (
    ParetoPoint,
    choose,
    fake_quant,
    pareto_frontier,
    parse_size,
)


def test_distillation_reduces_bn_loss_and_is_seeded(tiny_cnn: nn.Module) -> None:
    a = distill(tiny_cnn, sample_shape=(3, 16, 16), batch=8, iterations=40, progress=False)
    assert a.images.shape == (8, 3, 16, 16) and a.images.dtype == np.float32
    assert a.final_loss < 0.75 * a.initial_loss  # the BN targets here are random: a floor
    b = distill(tiny_cnn, sample_shape=(3, 16, 16), batch=8, iterations=40, progress=False)
    np.testing.assert_array_equal(a.images, b.images)
    c = distill(tiny_cnn, sample_shape=(3, 16, 16), batch=8, iterations=40, seed=1,
                progress=False)
    assert not np.array_equal(a.images, c.images)
    # the optimized parameters of the model are untouched and trainable again
    assert all(p.requires_grad for p in tiny_cnn.parameters())


def test_input_range_keeps_distilled_inputs_in_the_box(tiny_cnn: nn.Module) -> None:
    free = distill(tiny_cnn, sample_shape=(3, 16, 16), batch=8, iterations=40, lr=1.0,
                   progress=False)
    low, high = np.array([-1.0, -0.5, 0.0]), np.array([1.0, 0.5, 2.0])
    assert (free.images.min(axis=(0, 2, 3)) < low).all()  # the box below is binding
    boxed = distill(tiny_cnn, sample_shape=(3, 16, 16), batch=8, iterations=40, lr=1.0,
                    input_range=(low, high), progress=False)
    per_channel = boxed.images.transpose(1, 0, 2, 3).reshape(3, -1)
    assert (per_channel.min(axis=1) >= low.astype(np.float32)).all()
    assert (per_channel.max(axis=1) <= high.astype(np.float32)).all()
    assert (per_channel.min(axis=1) == low.astype(np.float32)).all()  # it reaches the bound
    assert boxed.final_loss < 0.9 * boxed.initial_loss  # a tight box: less room than free
    assert boxed.settings["input_range"] == [low.tolist(), high.tolist()]
    with pytest.raises(UserError, match="1 or 3"):
        distill(tiny_cnn, sample_shape=(3, 16, 16), iterations=1, input_range=([0, 0], [1, 1]),
                progress=False)
    with pytest.raises(UserError, match="below high"):
        distill(tiny_cnn, sample_shape=(3, 16, 16), iterations=1, input_range=(1, 0),
                progress=False)


def test_auto_input_range_is_the_zoo_pixel_range() -> None:
    import tvm_compress as tc
    from tvm_compress.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist

    model = tc.load("zoo:fmnist_vgg")
    d = distill(model, batch=2, iterations=3, progress=False)
    low = -FASHION_MNIST_MEAN / FASHION_MNIST_STD
    high = (1 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    np.testing.assert_allclose(d.settings["input_range"], [[low], [high]], rtol=1e-6)
    real, _ = fashion_mnist("calib")  # real images span exactly that range
    np.testing.assert_allclose([real.min(), real.max()], [low, high], rtol=1e-5)
    assert low - 1e-6 <= d.images.min() and d.images.max() <= high + 1e-6
    free = distill(model, batch=2, iterations=3, input_range=None, progress=False)
    assert free.settings["input_range"] is None and free.images.max() > high


def test_distill_rejects_model_without_batchnorm() -> None:
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(UserError, match="no BatchNorm"):
        distill(plain, sample_shape=(3, 8, 8), iterations=1, progress=False)
    with pytest.raises(UserError, match="batch >= 1"):
        distill(plain, sample_shape=(3, 8, 8), batch=0, progress=False)


def test_onnx_model_converts_to_torch_for_distillation(tiny_cnn: nn.Module, tmp_path) -> None:
    from tvm_compress.frontend.importers import export_onnx, from_onnx

    x = torch.randn(2, 3, 16, 16)
    path = export_onnx(tiny_cnn, x[:1], tmp_path / "tiny.onnx", keep_batchnorm=True)
    model = from_onnx(path)
    module = torch_module_of(model)
    with torch.no_grad():
        np.testing.assert_allclose(module(x).numpy(), tiny_cnn(x).numpy(), rtol=1e-4, atol=1e-5)
    d = distill(model, batch=8, iterations=40, progress=False)
    assert d.final_loss < 0.8 * d.initial_loss


def test_onnx_to_torch_reads_parameters_shared_through_identity(tmp_path) -> None:
    """Two fresh BatchNorms have equal parameters; the exporter shares them via Identity nodes."""
    import onnx

    from tvm_compress.frontend.importers import export_onnx, from_onnx

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)).eval()
    x = torch.randn(2, 3, 8, 8)
    path = export_onnx(net, x[:1], tmp_path / "shared.onnx", keep_batchnorm=True)
    assert any(n.op_type == "Identity" for n in onnx.load(str(path)).graph.node)
    module = torch_module_of(from_onnx(path))
    with torch.no_grad():
        np.testing.assert_allclose(module(x).numpy(), net(x).numpy(), rtol=1e-4, atol=1e-5)


def _brute_force(costs, sizes):  # noqa: ANN001, ANN202
    best: dict[int, float] = {}
    for choice in itertools.product(*[sorted(c) for c in costs]):
        s = sum(sz[b] for sz, b in zip(sizes, choice, strict=True))
        c = sum(co[b] for co, b in zip(costs, choice, strict=True))
        best[s] = min(best.get(s, np.inf), c)
    frontier = []
    for s in sorted(best):
        if not frontier or best[s] < frontier[-1][1]:
            frontier.append((s, best[s]))
    return frontier


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 12), st.floats(0, 5)), min_size=1,
                         max_size=4), min_size=1, max_size=5))
def test_pareto_dp_equals_brute_force(layers: list[list[tuple[int, float]]]) -> None:
    sizes = [{b: s for b, (s, _) in enumerate(layer)} for layer in layers]
    costs = [{b: c for b, (_, c) in enumerate(layer)} for layer in layers]
    frontier = pareto_frontier(costs, sizes)
    expected = _brute_force(costs, sizes)
    assert [p.size for p in frontier] == [s for s, _ in expected]
    np.testing.assert_allclose([p.sensitivity for p in frontier], [c for _, c in expected])
    for p in frontier:  # each point's bits really have its size and cost
        assert p.size == sum(sz[b] for sz, b in zip(sizes, p.bits, strict=True))
        assert p.sensitivity == pytest.approx(sum(co[b] for co, b in zip(costs, p.bits,
                                                                          strict=True)))


def test_choose_and_budgets() -> None:
    frontier = [ParetoPoint(4, 3.0, (2, 2)), ParetoPoint(8, 1.0, (4, 4)),
                ParetoPoint(16, 0.1, (8, 8))]
    assert choose(frontier, 9).bits == (4, 4)
    with pytest.raises(UserError, match="raise the budget"):
        choose(frontier, 3)
    assert parse_size("2.5MB") == 2_500_000 and parse_size("1KiB") == 1024
    with pytest.raises(UserError, match="not a size"):
        parse_size("big")


def test_fake_quant_matches_int_grid() -> None:
    from tvm_compress.quant.config import QuantSpec

    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    q = fake_quant(w, QuantSpec(4, "symmetric", "per_channel"))
    for channel in range(4):
        levels = np.unique(q[channel] / (np.abs(w[channel]).max() / 7))
        assert np.allclose(levels, np.round(levels), atol=1e-4) and len(levels) <= 15


@pytest.fixture(scope="module")
def fmnist_case():  # noqa: ANN201
    import tvm_compress as tc
    from tvm_compress.data import fashion_mnist

    model = tc.load("zoo:fmnist_resnet", batch=50)
    images, _ = fashion_mnist("test")
    images = images[:300]
    with torch.no_grad():
        ref = model.torch_module(torch.from_numpy(images)).numpy()
    distilled = distill(model, batch=32, iterations=40, label_weight=1.0, progress=False)
    return model, images, ref, distilled


def test_zeroq_calibration_beats_gaussian_noise(fmnist_case) -> None:  # noqa: ANN001
    from tvm_compress.backend.build import build
    from tvm_compress.quant.quantize import quantize
    from tvm_compress.runtime.metrics import sqnr_db, top1_agreement

    model, images, ref, distilled = fmnist_case
    assert distilled.final_loss < 0.3 * distilled.initial_loss
    config = QuantConfig(calib_samples=32)
    results = {}
    for name, calib in (("distilled", distilled.images),
                        ("gaussian", gaussian_images((1, 28, 28), 32))):
        logits = build(quantize(model, config, calib, progress=False).model).predict(images)
        results[name] = (sqnr_db(logits, ref), top1_agreement(logits, ref))
    assert results["distilled"][0] > results["gaussian"][0] + 1.0, results
    assert results["distilled"][1] >= results["gaussian"][1], results


def _fake_quant_logits(model, bits: dict[str, int], images: np.ndarray) -> np.ndarray:  # noqa: ANN001
    from tvm_compress.quant.config import QuantSpec
    from tvm_compress.tuning.zeroq.mixed import layer_modules

    modules = layer_modules(model, model.torch_module)
    saved = {n: m.weight.data.clone() for n, m in modules.items()}
    try:
        for n, m in modules.items():
            m.weight.data.copy_(torch.from_numpy(fake_quant(
                saved[n].numpy(), QuantSpec(bits[n], "symmetric", "per_channel"))))
        with torch.no_grad():
            return model.torch_module(torch.from_numpy(images)).numpy()
    finally:
        for n, m in modules.items():
            m.weight.data.copy_(saved[n])


def test_mixed_precision_beats_uniform_at_equal_size(fmnist_case) -> None:  # noqa: ANN001
    """Weight-only (the part mixed precision changes), on real test images; the TVM integer build
    of the chosen configuration is measured in benchmarks/bench_zeroq.py."""
    from tvm_compress.runtime.metrics import sqnr_db
    from tvm_compress.tuning.zeroq.mixed import plan_mixed, sensitivity

    model, images, ref, distilled = fmnist_case
    sens = sensitivity(model, model.torch_module, distilled.images[:8], progress=False)
    assert all(sens[n][2] > sens[n][8] for n in sens)
    plan = plan_mixed(model, model.torch_module, sens, avg_bits=4)
    assert plan.average_bits() <= 4.0 and len(set(plan.chosen.bits)) > 1
    assert plan.chosen.sensitivity < plan.uniform(4)[1]
    mixed = sqnr_db(_fake_quant_logits(model, plan.bits, images), ref)
    uniform = sqnr_db(_fake_quant_logits(model, dict.fromkeys(plan.bits, 4), images), ref)
    assert mixed > uniform + 0.5, (mixed, uniform)
    config = plan.config(QuantConfig())
    assert {n: config.weight_spec(n).bits for n in plan.bits} == plan.bits


def test_cli_zeroq_bad_inputs(tmp_path, capsys) -> None:  # noqa: ANN001
    from tvm_compress.cli.main import main
    from tvm_compress.frontend.importers import export_onnx

    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 2))
    path = export_onnx(plain, torch.zeros(1, 1, 28, 28), tmp_path / "plain.onnx")
    assert main(["zeroq", str(path), "--iterations", "1", "--json"]) == 2
    assert "no BatchNorm" in capsys.readouterr().err
    assert main(["zeroq", "zoo:fmnist_resnet", "--size-budget", "lots", "--json"]) == 2
    assert main(["zeroq", "zoo:fmnist_resnet", "--avg-bits", "1", "--json"]) == 2
    assert main(["zeroq", "zoo:fmnist_resnet", "--input-range", "1", "--json"]) == 2
    assert "LOW,HIGH" in capsys.readouterr().err
    assert main(["zeroq", "zoo:fmnist_resnet", "--input-range", "2,1", "--json"]) == 2
    assert main(["zeroq", "zoo:fmnist_resnet", "--threads", "0", "--json"]) == 2


def test_cli_quantize_with_distilled_calibration(capsys) -> None:  # noqa: ANN001
    """`quantize --calib distilled`: data-free W8A8 of a zoo model stays close to fp32."""
    import json

    from tvm_compress.cli.main import main

    code = main(["quantize", "zoo:fmnist_vgg", "--calib", "distilled", "--calib-samples", "8",
                 "--limit", "300", "--repeat", "0", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["quantized"]["accuracy"] >= result["fp32"]["accuracy"] - 0.03, result
    assert result["weight_bytes"]["quantized"] < 0.3 * result["weight_bytes"]["fp32"]
