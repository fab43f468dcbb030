"""Channel groups: the channel axes of a Relax module that must be cropped together.

A :class:`ChannelGroup` is Torch-Pruning's *group* on our IR: the output channels of a conv, its
BatchNorm / bias / activation, the depthwise conv that follows (its weights and ``groups``), the
input channels of every consumer (conv, or linear after global pooling / flatten, where each
channel is ``H*W`` features), and every tensor joined to it by a residual add. A concat places each
input's channels at an offset of its output, a channel split / slice cuts a range, a channel
shuffle (reshape-transpose-reshape) permutes them; members carry the index map.

A crop plan maps a group id to the indices of the channels to keep. Group ids and channel indices
are in graph order, so the same module always gives the same ids.

Unprunable (``prunable=False`` with a ``reason``): the model input and output channels, grouped
convs (not depthwise) on both sides, and anything next to an op the analysis cannot follow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import tvm

from tvm_compress.errors import UserError
from tvm_compress.graph.channel_flow import ChannelFlow

PRODUCER_KINDS = ("conv_out", "depthwise", "linear_out")
CONSUMER_KINDS = ("conv_in", "linear_in")
CropPlan = Mapping[int, Sequence[int]]


@dataclass(frozen=True)
class ChannelMember:
    """One tensor axis (or part of it) in a group.

    ``kind``: ``conv_out`` / ``conv_in`` (axis 0 / 1 of an OIHW weight), ``depthwise`` (axis 0 of a
    depthwise weight; its ``groups`` follows), ``linear_out`` / ``linear_in`` (axis 1 / 0 of a
    (K, M) weight), ``bias`` / ``scale`` (a constant added / multiplied along the channels),
    ``batch_norm`` (gamma, beta, mean and var), ``tensor`` (an activation's channel axis).
    ``channels[p]`` is the group channel at position ``p`` of the axis, -1 where position ``p``
    belongs to another group (concat / split partners).
    """

    kind: str
    name: str  # layer name for weights, else the name of the bound variable
    axis: int
    channels: tuple[int, ...]
    layer: str | None = None  # the layer the weight belongs to or the bias / BN follows

    @property
    def positions(self) -> tuple[int, ...]:
        return tuple(p for p, c in enumerate(self.channels) if c >= 0)

    @property
    def is_identity(self) -> bool:
        return self.channels == tuple(range(len(self.channels)))


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that are kept or removed together, ``size`` of them."""

    id: int
    size: int
    members: tuple[ChannelMember, ...]
    prunable: bool
    reason: str | None = None
    # Zeroing the group's producers (weights, bias, BN gamma/beta) zeroes every member tensor:
    # no op with f(0) != 0 (sigmoid, scalar add, ...) in between.
    zero_preserving: bool = True

    def layers(self, kinds: Sequence[str] = PRODUCER_KINDS + CONSUMER_KINDS) -> list[str]:
        """Names of the layers with a weight axis of one of ``kinds`` in this group."""
        names = [m.name for m in self.members if m.kind in kinds]
        return list(dict.fromkeys(names))

    @property
    def producers(self) -> list[str]:
        return self.layers(PRODUCER_KINDS)

    def describe(self) -> str:
        status = "prunable" if self.prunable else f"unprunable ({self.reason})"
        return f"group {self.id}: {self.size} channels, producers {self.producers}, {status}"


class ChannelAnalysis:
    """The groups of ``mod["main"]`` with the element maps the croppers read.

    ``mod`` is the module the maps refer to (the input, with point-wise ``call_tir`` raised to
    Relax ops). Every channel of every tracked tensor is an element; ``elem_group[e]`` /
    ``elem_channel[e]`` say which group channel it is (-1: a group without weights, never cropped).
    """

    def __init__(self, mod: tvm.IRModule) -> None:
        self.mod = _raise_call_tir(mod)
        self.flow = ChannelFlow(self.mod["main"])
        self.elem_group, self.elem_channel, self.groups = _form_groups(self.flow)

    def kept_mask(self, plan: CropPlan) -> np.ndarray:
        """Boolean per element: kept under ``plan`` (validated; UserError if invalid)."""
        kept = check_plan(self.groups, plan)
        mask = np.ones(len(self.elem_group), dtype=bool)
        for gid, keep in kept.items():
            drop = (self.elem_group == gid) & ~np.isin(self.elem_channel, keep)
            mask[drop] = False
        for var, elems in self.flow.maps.items():
            if len(elems) and not mask[elems].any():
                groups = sorted({int(g) for g in self.elem_group[elems]})
                raise UserError(f"crop plan empties tensor '{var.name}' (a slice of groups "
                                f"{groups} whose kept channels all lie elsewhere); keep at least "
                                "one of its channels")
        return mask

    @staticmethod
    def kept(elems: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
        """Kept positions of an axis with elements ``elems``; None when all are kept."""
        keep = mask[elems]
        return None if keep.all() else np.nonzero(keep)[0]


def _raise_call_tir(mod: tvm.IRModule) -> tvm.IRModule:
    """The ONNX importer emits Clip (ReLU6) as point-wise ``call_tir``; as Relax max / min ops the
    analysis can follow them (the croppers then rewrite this raised module)."""
    from tvm_compress.backend.schedules.elementwise import raise_elementwise
    from tvm_compress.graph.dataflow import bindings, op_name

    if any(op_name(b.value) == "relax.call_tir" for b in bindings(mod["main"])):
        return raise_elementwise(mod)
    return mod


def analyze(mod: tvm.IRModule) -> ChannelAnalysis:
    """Channel analysis of ``mod["main"]`` (groups plus maps)."""
    if "main" not in mod:
        raise UserError("channel analysis needs a module with a 'main' function")
    return ChannelAnalysis(mod)


def analyze_channel_groups(mod: tvm.IRModule) -> list[ChannelGroup]:
    """The channel groups of ``mod["main"]``, in graph order.

    Parameters
    ----------
    mod : IRModule
        A Relax module as the frontends produce it (NCHW convs, constant weights, optionally
        still with ``batch_norm``); BN-folded modules work too.

    Returns
    -------
    list of ChannelGroup
        Groups that hold at least one weight, bias or BN axis; ``groups[i].id == i``.
    """
    return analyze(mod).groups


def check_plan(groups: Sequence[ChannelGroup], plan: CropPlan) -> dict[int, np.ndarray]:
    """Validate a crop plan; returns group id -> sorted kept indices (UserError if invalid)."""
    if not isinstance(plan, Mapping):
        raise UserError(f"crop plan must map group ids to kept channel indices, "
                        f"got {type(plan).__name__}")
    out: dict[int, np.ndarray] = {}
    for gid, keep in plan.items():
        if not _is_int(gid) or not 0 <= int(gid) < len(groups):
            raise UserError(f"crop plan: no channel group {gid!r} (this module has groups "
                            f"0..{len(groups) - 1}); take ids from analyze_channel_groups(mod)")
        group = groups[int(gid)]
        if not group.prunable:
            raise UserError(f"crop plan: channel group {gid} cannot be cropped ({group.reason}); "
                            "leave it out of the plan")
        out[int(gid)] = _check_keep(group, keep)
    return out


def out_channels_after(groups: Sequence[ChannelGroup], plan: CropPlan) -> dict[str, int]:
    """Output channels of every conv / linear layer once ``plan`` is applied, from the groups.

    Counted from the group members alone (not by cropping), so it predicts - and tests can check
    - what CropChannels produces. Groups missing from ``plan`` keep all their channels.
    """
    out: dict[str, int] = {}
    for group in groups:
        keep = set(plan.get(group.id, range(group.size)))
        for member in group.members:
            if member.kind in ("conv_out", "depthwise", "linear_out"):
                out[member.name] = out.get(member.name, 0) + sum(
                    c in keep for c in member.channels if c >= 0)
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_keep(group: ChannelGroup, keep: Sequence[int]) -> np.ndarray:
    gid, size = group.id, group.size
    if isinstance(keep, (str, bytes)) or not isinstance(keep, (Sequence, np.ndarray)):
        raise UserError(f"crop plan: group {gid} needs a list of kept channel indices, "
                        f"got {type(keep).__name__}")
    if len(keep) == 0:
        raise UserError(f"crop plan: group {gid} keeps no channels; keep at least one")
    seen: set[int] = set()
    for k in keep:
        if not _is_int(k):
            raise UserError(f"crop plan: group {gid} has a non-integer channel index {k!r}")
        if not 0 <= int(k) < size:
            raise UserError(f"crop plan: group {gid} index {int(k)} is out of range (the group "
                            f"has {size} channels: 0..{size - 1})")
        if int(k) in seen:
            raise UserError(f"crop plan: group {gid} lists channel {int(k)} more than once; "
                            "list each kept channel once")
        seen.add(int(k))
    return np.array(sorted(seen), dtype=np.int64)


# --------------------------------------------------------------------------- group formation

def _group_keys(flow: ChannelFlow) -> tuple[np.ndarray, np.ndarray]:
    """Per element: its class (elements cropped as one channel) and its group key (classes
    joined because one layer produced them)."""
    n = len(flow.parent)
    cls = np.array([flow.find(e) for e in range(n)], dtype=np.int64)
    parent = list(range(n))

    def find(e: int) -> int:
        while parent[e] != e:
            parent[e] = parent[parent[e]]
            e = parent[e]
        return e

    for root in flow.roots:
        first = find(int(cls[root[0]])) if len(root) else 0
        for c in cls[root].tolist():
            rc = find(c)
            if rc != first:
                lo, hi = min(rc, first), max(rc, first)
                parent[hi] = lo
                first = lo
    return cls, np.array([find(int(c)) for c in cls], dtype=np.int64)


def _form_groups(flow: ChannelFlow) -> tuple[np.ndarray, np.ndarray, list[ChannelGroup]]:
    cls, key = _group_keys(flow)
    with_params = {int(k) for m in flow.members if m.kind != "tensor" for k in key[m.elems]}
    n = len(cls)
    elem_group = np.full(n, -1, dtype=np.int64)
    elem_channel = np.full(n, -1, dtype=np.int64)
    gid_of_key: dict[int, int] = {}
    class_channel: dict[int, int] = {}
    sizes: list[int] = []
    for e in range(n):
        k = int(key[e])
        if k not in with_params:
            continue
        if k not in gid_of_key:
            gid_of_key[k] = len(sizes)
            sizes.append(0)
        g, c = gid_of_key[k], int(cls[e])
        if c not in class_channel:
            class_channel[c] = sizes[g]
            sizes[g] += 1
        elem_group[e], elem_channel[e] = g, class_channel[c]
    reasons: list[list[str]] = [[] for _ in sizes]
    for e in sorted(flow.blocked):
        g = int(elem_group[e])
        if g >= 0 and flow.blocked[e] not in reasons[g]:
            reasons[g].append(flow.blocked[e])
    nonzero = {int(elem_group[e]) for e in flow.nonzero}
    members: list[list[ChannelMember]] = [[] for _ in sizes]
    for m in flow.members:
        groups = elem_group[m.elems]
        for g in dict.fromkeys(groups.tolist()):
            if g >= 0:
                channels = np.where(groups == g, elem_channel[m.elems], -1)
                members[g].append(ChannelMember(m.kind, m.name, m.axis,
                                                tuple(channels.tolist()), m.layer))
    groups = [ChannelGroup(g, sizes[g], tuple(members[g]), not reasons[g],
                           _reason(reasons[g]), g not in nonzero) for g in range(len(sizes))]
    return elem_group, elem_channel, groups


def _reason(reasons: list[str]) -> str | None:
    if not reasons:
        return None
    more = f" (+{len(reasons) - 2} more)" if len(reasons) > 2 else ""
    return "; ".join(reasons[:2]) + more
