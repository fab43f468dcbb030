"""Hierarchical DDPG agent of AJPQ (AMC / HAQ style), written with torch.

Two actor-critic pairs walk the layers in graph order: the **layer controller** sees the layer
embedding and outputs the sparsity action of the channel group the layer decides; the **channel
controller** sees the same embedding plus the sparsity just taken and outputs the mean bit-width
of the layer's kept channels (spread over channels by importance, see
:mod:`tvm_compress.tuning.ajpq.joint`).

As in AMC and HAQ the episode's reward (proxy accuracy of the constrained plan) is given to every
step of the episode, minus a moving-average baseline; with discount 1 the critic therefore regresses
the episode reward from (state, action), and the actor follows the critic's gradient. Exploration:
uniform random actions for ``warmup`` episodes, then the actor's action plus truncated normal noise
whose sigma decays per episode. Everything random is drawn from generators seeded by ``seed``
(same seed, same thread count -> same plan).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tvm_compress.tuning.ajpq.joint import Budget, Episode, JointPlan, JointSpace, run_policy


def _mlp(inp: int, out: int, hidden: int, sigmoid: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                               nn.ReLU(), nn.Linear(hidden, out)]
    if sigmoid:
        layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


class DDPG:
    """One actor-critic pair with a replay buffer (1-d action in [0, 1])."""

    def __init__(self, state_dim: int, *, seed: int, hidden: int = 64, lr_actor: float = 5e-4,
                 lr_critic: float = 2e-3, buffer: int = 4000, batch: int = 64) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.actor = _mlp(state_dim, 1, hidden, True)
        self.critic = _mlp(state_dim + 1, 1, hidden, False)
        with torch.no_grad():
            for p in list(self.actor.parameters()) + list(self.critic.parameters()):
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / max(p.shape[-1], 1)) ** 0.5
                        if p.ndim > 1 else torch.zeros(p.shape))
        self.opt_a = torch.optim.Adam(self.actor.parameters(), lr=lr_actor)
        self.opt_c = torch.optim.Adam(self.critic.parameters(), lr=lr_critic)
        self.capacity, self.batch = buffer, batch
        self.states: list[np.ndarray] = []
        self.actions: list[float] = []
        self.rewards: list[float] = []
        self.rng = np.random.default_rng(seed + 1)

    def act(self, state: np.ndarray) -> float:
        with torch.no_grad():
            return float(self.actor(torch.from_numpy(state)[None])[0, 0])

    def remember(self, state: np.ndarray, action: float, reward: float) -> None:
        self.states.append(state)
        self.actions.append(action)
        self.rewards.append(reward)
        if len(self.states) > self.capacity:
            del self.states[0], self.actions[0], self.rewards[0]

    def update(self, steps: int) -> None:
        if len(self.states) < self.batch:
            return
        s_all = torch.from_numpy(np.stack(self.states))
        a_all = torch.tensor(self.actions, dtype=torch.float32)[:, None]
        r_all = torch.tensor(self.rewards, dtype=torch.float32)[:, None]
        for _ in range(steps):
            idx = torch.from_numpy(self.rng.integers(0, len(s_all), self.batch))
            s, a, r = s_all[idx], a_all[idx], r_all[idx]
            q = self.critic(torch.cat([s, a], 1))
            loss_c = nn.functional.mse_loss(q, r)
            self.opt_c.zero_grad()
            loss_c.backward()
            self.opt_c.step()
            loss_a = -self.critic(torch.cat([s, self.actor(s)], 1)).mean()
            self.opt_a.zero_grad()
            loss_a.backward()
            self.opt_a.step()


@dataclass
class SearchResult:
    """Episodes of a search: per episode the plan's reward, size and actions; the best plan."""

    method: str
    best: JointPlan
    best_reward: float
    records: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _truncated_normal(rng: np.random.Generator, mean: float, sigma: float) -> float:
    for _ in range(100):
        x = rng.normal(mean, sigma)
        if 0.0 <= x <= 1.0:
            return float(x)
    return float(np.clip(mean, 0.0, 1.0))


def _record(path: Path | None, rec: dict[str, Any]) -> None:
    if path is not None:
        with path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()


def _load_records(path: Path | None, method: str) -> list[dict[str, Any]]:
    if path is None or not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break  # a torn last line from an interrupted run
        if rec.get("method") == method:
            out.append(rec)
    return out


def ajpq_search(space: JointSpace, budget: Budget, reward: Callable[[JointPlan], float], *,
                episodes: int, seed: int = 0, warmup: int | None = None, sigma: float = 0.5,
                sigma_decay: float = 0.95, updates_per_episode: int | None = None,
                records: Path | None = None, progress: bool = True,
                fill: bool = True) -> SearchResult:
    """Hierarchical DDPG search of the joint space.

    ``reward(plan)`` is the proxy accuracy of a plan (higher is better). With ``records`` every
    episode is appended as a JSON line as it finishes; rerunning with the same file and seed
    replays the recorded rewards (no re-evaluation) and continues, so an interrupted search
    resumes where it stopped and ends with the same plan.
    """
    from rich import progress as rp

    torch.manual_seed(seed)
    warmup = max(1, episodes // 4) if warmup is None else warmup
    features = space.layer_features()
    state_dim = features.shape[1] + 4
    layer_ctl = DDPG(state_dim, seed=seed * 7 + 1)
    chan_ctl = DDPG(state_dim + 1, seed=seed * 7 + 2)
    rng = np.random.default_rng(seed)
    done = _load_records(records, "ajpq")
    updates = updates_per_episode or 2 * len(space.layers)
    baseline, best, best_r = None, None, -np.inf
    rewards_seen: list[float] = []
    out: list[dict[str, Any]] = []
    start = time.perf_counter()
    with rp.Progress(rp.TextColumn("AJPQ episodes"), rp.BarColumn(), rp.MofNCompleteColumn(),
                     rp.TextColumn("best {task.fields[best]:.4f}"), rp.TimeElapsedColumn(),
                     disable=not progress) as bar:
        task = bar.add_task("ajpq", total=episodes, best=0.0)
        for ep_i in range(episodes):
            explore = ep_i < warmup
            noise = sigma * sigma_decay ** max(0, ep_i - warmup)
            states: list[tuple[np.ndarray, float, np.ndarray, float]] = []

            def policy(ep: Episode, state: np.ndarray) -> tuple[float, float]:
                if explore:  # noqa: B023 (read in this iteration)
                    a_s = float(rng.uniform())
                else:
                    a_s = _truncated_normal(rng, layer_ctl.act(state), noise)  # noqa: B023
                s_taken = a_s if ep.layer.decides is not None else 0.0
                c_state = np.concatenate([state, [s_taken]]).astype(np.float32)
                if explore:  # noqa: B023
                    a_b = float(rng.uniform())
                else:
                    a_b = _truncated_normal(rng, chan_ctl.act(c_state), noise)  # noqa: B023
                states.append((state, a_s, c_state, a_b))  # noqa: B023
                return a_s, a_b

            plan = run_policy(space, budget, policy, fill=fill)
            if ep_i < len(done):
                r = float(done[ep_i]["reward"])
            else:
                r = float(reward(plan))
            baseline = r if baseline is None else 0.9 * baseline + 0.1 * r
            rewards_seen.append(r)
            scale = max(float(np.std(rewards_seen)), 1e-3)
            adv = (r - baseline) / scale
            # store the constrained actions the episode really took (AMC)
            for (state, _, c_state, _), (s_taken, b_taken), layer in zip(
                    states, plan.actions, space.layers, strict=True):
                c_state = c_state.copy()
                c_state[-1] = s_taken
                if layer.decides is not None:
                    layer_ctl.remember(state, s_taken, adv)
                chan_ctl.remember(c_state, b_taken, adv)
            if ep_i >= warmup - 1:
                layer_ctl.update(updates)
                chan_ctl.update(updates)
            if r > best_r:
                best, best_r = plan, r
            rec = {"method": "ajpq", "episode": ep_i, "reward": r,
                   "size": space.plan_bytes(plan) / space.fp32_bytes,
                   "macs": space.plan_macs(plan) / space.fp32_macs,
                   "explore": explore, "sigma": 1.0 if explore else noise}
            out.append(rec)
            if ep_i >= len(done):
                _record(records, rec)
            bar.update(task, advance=1, best=best_r)
    assert best is not None
    return SearchResult("ajpq", best, best_r, out, time.perf_counter() - start)


def random_search(space: JointSpace, budget: Budget, reward: Callable[[JointPlan], float], *,
                  episodes: int, seed: int = 0, records: Path | None = None,
                  progress: bool = True, fill: bool = True) -> SearchResult:
    """Baseline: uniform random actions in the same constrained joint space."""
    from rich import progress as rp

    rng = np.random.default_rng(seed + 1000)
    done = _load_records(records, "random")
    best, best_r, out = None, -np.inf, []
    start = time.perf_counter()
    with rp.Progress(rp.TextColumn("random search"), rp.BarColumn(), rp.MofNCompleteColumn(),
                     rp.TimeElapsedColumn(), disable=not progress) as bar:
        task = bar.add_task("random", total=episodes)
        for ep_i in range(episodes):
            plan = run_policy(space, budget,
                              lambda _ep, _s: (float(rng.uniform()), float(rng.uniform())),
                              fill=fill)
            r = float(done[ep_i]["reward"]) if ep_i < len(done) else float(reward(plan))
            if r > best_r:
                best, best_r = plan, r
            rec = {"method": "random", "episode": ep_i, "reward": r,
                   "size": space.plan_bytes(plan) / space.fp32_bytes}
            out.append(rec)
            if ep_i >= len(done):
                _record(records, rec)
            bar.update(task, advance=1)
    assert best is not None
    return SearchResult("random", best, best_r, out, time.perf_counter() - start)


def sequential_search(space: JointSpace, budget: Budget,
                      reward: Callable[[JointPlan], float],
                      bit_choices: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)) -> SearchResult:
    """Baseline: L1 pruning (one sparsity for every group, least-L1 channels first) to the
    budget, then the best uniform bit-width; one evaluation per bit-width that fits."""
    from tvm_compress.tuning.ajpq.joint import uniform_plan

    best, best_r, out = None, -np.inf, []
    start = time.perf_counter()
    for bits in bit_choices:
        plan = uniform_plan(space, budget, bits)
        if plan is None:
            continue
        r = float(reward(plan))
        kept = sum(plan.keep.values()) / max(1, sum(int(space.sizes[g]) for g in plan.keep))
        out.append({"method": "sequential", "bits": bits, "kept_fraction": kept, "reward": r,
                    "size": space.plan_bytes(plan) / space.fp32_bytes})
        if r > best_r:
            best, best_r = plan, r
    if best is None:
        from tvm_compress.errors import UserError

        raise UserError(f"budget {budget.describe()}: no uniform bit-width with L1 pruning up to "
                        f"sparsity {space.max_sparsity:g} fits; raise the budget")
    return SearchResult("sequential", best, best_r, out, time.perf_counter() - start)
