"""PreCrop: scorers, budgeted allocation, channel counts, cropped torch == Relax, CLI errors."""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from tvm_compress.cli.main import main
from tvm_compress.errors import UserError
from tvm_compress.frontend.importers import from_torch
from tvm_compress.frontend.layers import LayerTable
from tvm_compress.graph.channel_groups import out_channels_after
from tvm_compress.tuning.precrop.crop import (
    Budget,
    ChannelBudget,
    PreCropPlan,
    achieved_layer_densities,
    convex_densities,
    fresh_model,
    parse_budget,
    precrop,
)
from tvm_compress.tuning.precrop.scores import (
    SCORERS,
    apply_masks,
    layer_densities,
    layer_masks,
    remove_masks,
    score_weights,
    weight_layers,
)

TINY_LAYERS = ["stem.0", "dw.0", "pw.0", "head"]


def _data(n: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 3, 16, 16)).astype("float32"),
            rng.integers(0, 10, n).astype("int64"))


@pytest.fixture(scope="module")
def fmnist_fresh() -> dict:
    """Fresh MobileNetV2 (residuals, depthwise) and ShuffleNetV2 (split, concat, shuffle) zoo
    architectures and their Relax imports (imports are the slow part; ResNet and the rest are
    cropped in test_crop_channels.py)."""
    out = {}
    for arch in ("mobilenet_v2", "shufflenet_v2"):
        module, example, _ = fresh_model(f"zoo:fmnist_{arch}", seed=0)
        out[arch] = (module, example, from_torch(module, example))
    return out


# ------------------------------------------------------------------------------------ scorers

@pytest.mark.parametrize("scorer", SCORERS)
def test_scorers_give_finite_scores_per_weight(tiny_cnn, scorer):
    before = copy.deepcopy(tiny_cnn.state_dict())
    example = torch.from_numpy(_data(1)[0])
    scores = score_weights(tiny_cnn, scorer, example=example, data=_data(), sparsity=0.5,
                           iterations=3)
    weights = {n: m.weight for n, m in weight_layers(tiny_cnn).items()}
    assert list(scores) == TINY_LAYERS
    for name, s in scores.items():
        assert s.shape == tuple(weights[name].shape) and np.all(np.isfinite(s))
    assert any(np.ptp(s) > 0 for s in scores.values())  # not constant
    if scorer in ("snip", "magnitude", "synflow", "random"):
        assert all(np.all(s >= 0) for s in scores.values())
    for key, value in tiny_cnn.state_dict().items():  # the model is left as it was
        assert torch.equal(value, before[key]), key


def test_synflow_is_data_independent_and_iterative(tiny_cnn):
    zeros, noise = torch.zeros(1, 3, 16, 16), torch.randn(1, 3, 16, 16)
    a = score_weights(tiny_cnn, "synflow", example=zeros, sparsity=0.0)
    b = score_weights(tiny_cnn, "synflow", example=noise, data=_data(), sparsity=0.0)
    assert all(np.array_equal(a[n], b[n]) for n in a)
    # Iterative SynFlow: the weights pruned along the way score 0, the rest keep the target.
    pruned = score_weights(tiny_cnn, "synflow", example=zeros, sparsity=0.9, iterations=10)
    kept = sum(int((s > 0).sum()) for s in pruned.values())
    total = sum(s.size for s in pruned.values())
    assert abs(kept / total - 0.1) < 0.01
    # SNIP depends on the data.
    s1 = score_weights(tiny_cnn, "snip", example=zeros, data=_data(seed=1))
    s2 = score_weights(tiny_cnn, "snip", example=zeros, data=_data(seed=2))
    assert not np.allclose(s1["stem.0"], s2["stem.0"])


def test_data_scorers_need_data_and_unknown_scorer(tiny_cnn):
    with pytest.raises(UserError, match="needs labelled data"):
        score_weights(tiny_cnn, "grasp", example=torch.zeros(1, 3, 16, 16))
    with pytest.raises(UserError, match="unknown scorer 'obd'"):
        score_weights(tiny_cnn, "obd", example=torch.zeros(1, 3, 16, 16))


def test_layer_densities_use_one_global_threshold():
    scores = {"a": np.array([1.0, 2.0, 3.0, 4.0]), "b": np.array([10.0, 0.5])}
    assert layer_densities(scores, 0.5) == {"a": 0.5, "b": 0.5}
    assert layer_densities(scores, 0.0) == {"a": 1.0, "b": 1.0}
    assert layer_densities(scores, 0.5, ["a"]) == {"a": 0.5}
    with pytest.raises(UserError, match="sparsity"):
        layer_densities(scores, 1.0)


def test_pai_masks_keep_the_layer_densities_fixed_through_training(tiny_cnn):
    scores = score_weights(tiny_cnn, "magnitude", example=torch.zeros(1, 3, 16, 16))
    densities = {"stem.0": 0.5, "pw.0": 0.25}
    masked = apply_masks(copy.deepcopy(tiny_cnn).train(), layer_masks(scores, densities))
    optimizer = torch.optim.SGD(masked.parameters(), lr=0.1)
    x, y = (torch.from_numpy(a) for a in _data(8))
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(masked(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    remove_masks(masked)
    for name, density in densities.items():
        w = masked.get_submodule(name).weight
        assert float((w != 0).float().mean()) == pytest.approx(density)
        kept = np.abs(tiny_cnn.get_submodule(name).weight.detach().numpy()) >= np.quantile(
            scores[name], 1 - density)
        assert np.array_equal((w != 0).numpy(), kept)  # the largest magnitudes stay


# --------------------------------------------------------------------------- budget allocation

def test_convex_densities_meet_budget_and_match_brute_force():
    costs = np.array([1.0, 3.0, 6.0])
    p = convex_densities(costs, 4.0)
    assert float(p @ costs) == pytest.approx(4.0, rel=1e-6) and float(p @ costs) <= 4.0 + 1e-9
    np.testing.assert_allclose(p, [1.0, 0.5, 0.25], rtol=1e-6)  # equal spend where unclipped
    best, arg = -np.inf, None
    grid = np.linspace(0.01, 1.0, 100)
    for p1, p2 in itertools.product(grid, grid):
        p3 = (4.0 - p1 - 3 * p2) / 6
        if 0 < p3 <= 1:
            value = np.log(p1) + np.log(p2) + np.log(p3)
            if value > best:
                best, arg = value, (p1, p2, p3)
    assert np.sum(np.log(p)) >= best - 1e-9
    np.testing.assert_allclose(p, arg, atol=0.02)
    # It beats the trivial allocation (the same density everywhere) on the objective.
    assert np.sum(np.log(p)) > 3 * np.log(0.4)
    # Bounds: minimum density, fixed costs, unreachable budgets.
    assert convex_densities(costs, 20.0).tolist() == [1.0, 1.0, 1.0]
    assert np.all(convex_densities(costs, 2.0, minimum=0.15) >= 0.15)
    assert float(convex_densities(costs, 5.0, fixed_cost=2.0) @ costs) == pytest.approx(3.0)
    with pytest.raises(UserError, match="smallest reachable"):
        convex_densities(costs, 1.0, minimum=0.2)


@pytest.mark.parametrize("text", ["params", "params=0", "params=1.5", "flops=0.3",
                                  "params=abc", "macs=-1", "params=nan"])
def test_bad_budgets_raise_user_error(text):
    with pytest.raises(UserError, match="budget"):
        parse_budget(text)


def test_budget_parsing():
    assert parse_budget("params=0.3") == Budget("params", 0.3)
    assert parse_budget(" macs = 1 ") == Budget("macs", 1.0)


# -------------------------------------------------------------------------------- channel plans

@pytest.mark.parametrize("arch", ["mobilenet_v2", "shufflenet_v2"])
def test_precrop_on_fmnist_zoo_meets_budget_with_coupled_rounded_widths(fmnist_fresh, arch):
    module, example, dense = fmnist_fresh[arch]
    result = precrop(module, example, "params=0.3", scorer="synflow", iterations=5,
                     dense=dense)
    plan, cb = result.plan, ChannelBudget(dense.mod)
    frac = plan.achieved_fraction["params"]
    assert 0.8 * 0.3 <= frac <= 0.3, frac
    after = LayerTable.from_module(result.mod)
    # Exact bookkeeping: the analytic counts are what the cropped Relax module has.
    assert (after.total_params, after.total_macs) == (plan.achieved["params"],
                                                       plan.achieved["macs"])
    # Coupled groups: every member layer has the group's kept channels.
    assert {x.name: x.out_channels for x in after} == \
        out_channels_after(cb.groups, plan.crop)
    for gid, keep in plan.crop.items():
        size = cb.groups[gid].size
        assert len(keep) % 8 == 0 and 8 <= len(keep) < size, (gid, len(keep), size)
    # The torch module is cropped the same way.
    torch_layers = weight_layers(result.module)
    for x in after:
        w = torch_layers[x.name].weight
        assert w.shape[0] == (x.out_channels), x.name
    # Other budgets, MAC budgets and allocations, on the same analysis (no re-import).
    for kind, fraction in (("params", 0.5), ("macs", 0.5), ("macs", 0.3)):
        target = fraction * cb.dense[kind]
        for factors in ({g: 1.0 for g in cb.prunable},
                        cb.group_factors(achieved_layer_densities(plan))):
            crop, _ = cb.fit(factors, kind, target)
            assert 0.8 * target <= cb.totals(crop)[kind] <= target, (kind, fraction)


def test_multiples_minimum_widths_and_unreachable_budgets(fmnist_fresh):
    dense = fmnist_fresh["mobilenet_v2"][2]
    factors = {g: 0.3 for g in ChannelBudget(dense.mod).prunable}
    for multiple, minimum in ((4, 4), (8, 16), (1, 1)):
        cb = ChannelBudget(dense.mod, multiple=multiple, min_channels=minimum)
        crop = cb.plan_for(factors)
        assert crop
        for gid, keep in crop.items():
            size = cb.groups[gid].size
            assert len(keep) == min(size, max(minimum, -(-int(np.ceil(0.3 * size - 1e-9)) //
                                                         multiple) * multiple))
            assert len(set(keep)) == len(keep) and max(keep) < size
    cb = ChannelBudget(dense.mod)
    with pytest.raises(UserError, match="cannot be met.*smallest plan"):
        cb.fit(factors, "params", 0.01 * cb.dense["params"])
    with pytest.raises(UserError, match="multiple and min_channels"):
        ChannelBudget(dense.mod, multiple=0)


def test_convex_allocation_beats_uniform_on_its_objective(fmnist_fresh):
    module, example, dense = fmnist_fresh["mobilenet_v2"]
    convex = precrop(module, example, "params=0.3", allocation="convex", dense=dense)
    uniform = precrop(module, example, "params=0.3", allocation="uniform", dense=dense)

    def objective(plan: PreCropPlan) -> float:
        return float(sum(np.log(d) for d in achieved_layer_densities(plan).values()))

    assert convex.plan.achieved["params"] <= 0.3 * convex.plan.dense["params"]
    assert objective(convex.plan) > objective(uniform.plan)


def test_cropped_torch_module_equals_its_relax_module(tiny_cnn, tiny_input):
    result = precrop(tiny_cnn, tiny_input, "params=0.5", scorer="snip", data=_data(),
                     multiple=4, min_channels=4)
    assert result.plan.crop and all(len(k) % 4 == 0 for k in result.plan.crop.values())
    assert relax.analysis.check_well_formed(result.mod)
    vm = relax.VirtualMachine(tvm.compile(result.mod, target="llvm"), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(tiny_input)).numpy()
    with torch.no_grad():
        want = result.module.eval()(torch.from_numpy(tiny_input)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Plan JSON round trip, and its pass reproduces the cropped module.
    plan = PreCropPlan.from_json(result.plan.to_json())
    assert plan == result.plan
    tvm.ir.assert_structural_equal(plan.to_pass()(result.dense.mod), result.mod)


# ------------------------------------------------------------------------------------------ CLI

@pytest.mark.parametrize("argv", [
    ["--budget", "params=1.5"], ["--budget", "flops=0.3"], ["--budget", "0.3"],
    ["--budget", "params=0.3", "--score", "obd"],
    ["--budget", "params=0.3", "--allocation", "greedy"],
    ["--budget", "params=0.3", "--multiple", "0"]])
def test_cli_bad_input_exits_2(argv, capsys):
    assert main(["precrop", "zoo:fmnist_vgg", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_cli_needs_a_zoo_architecture(tmp_path, capsys):
    assert main(["precrop", str(tmp_path / "m.onnx"), "--budget", "params=0.5"]) == 2
    assert "zoo architecture" in capsys.readouterr().err


def test_cli_writes_plan_state_and_onnx(tmp_path, capsys):
    assert main(["precrop", "zoo:fmnist_vgg", "--budget", "params=0.4", "--score", "magnitude",
                 "-o", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["achieved"]["params"] <= 0.4 * out["dense"]["params"]
    plan = PreCropPlan.from_json((tmp_path / "precrop.json").read_text())
    assert plan.scorer == "magnitude" and plan.budget == "params=0.4"
    from tvm_compress.plan import CompressionPlan

    unified = CompressionPlan.load(tmp_path / "plan.json")  # the same crop, groups by name
    assert unified.method == "precrop" and len(unified.crop) == len(plan.crop)
    assert sorted(map(len, unified.crop.values())) == sorted(map(len, plan.crop.values()))
    state = torch.load(tmp_path / "cropped.pt", weights_only=True)
    first = state["classifier.0.weight"].shape
    assert first[0] < 128 and (tmp_path / "cropped.onnx").stat().st_size > 0
