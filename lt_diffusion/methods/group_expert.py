"""Group-Expert LoRA: the MoE-style baseline of the CM paper (Sec. E.4, Table E.2).

One low-rank adapter per Many / Medium / Few class group on the same layers as CM, routed by
the group of the sample's label (a deterministic mixture of experts), trained with a plain base
objective (DDPM by default) and no capacity-manipulation loss. For a selected weight ``W``
(``d x k``) and a sample of group ``g``::

    W(y) = W_g + B_g A_g,      sum over the three experts of rank(B_g A_g) = r

with ``r = max(1, round(rank_ratio * min(d, k)))`` as in CM: the *same total rank budget*
(and the same parameter count) as CM's ``B A``, split as evenly as possible (remainder to Many,
then Medium); a layer with ``r < 3`` gives every expert rank 1.

Routing. The labels must reach the layers, which only see features. :func:`group_expert_lora`
registers a forward pre-hook on the model that maps ``y`` (the third positional argument or
``y=``) to a group index through a label -> group table (a persistent buffer, so checkpoints
carry the routing they were trained with) and stores it on a small state object that every
adapted layer shares. Each layer masks its stacked ``A x`` per sample by the rank channels of
the sample's expert. No host synchronisation; under ``torch.compile`` the hook is traced with
the model (one graph).

The null label (classifier-free guidance's unconditional model) is routed by ``null_route``:
``"none"`` (default: no expert, the shared weights ``W_g`` only, so the experts only ever learn
from their own group), one of the groups, or ``"all"`` (every expert on).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lt_diffusion.data import SPLITS, split_map
from lt_diffusion.diffusion import NoiseSchedule
from lt_diffusion.methods.base import Aug, Model, Objective, Result, check_choice
from lt_diffusion.methods.common import WrappingObjective
from lt_diffusion.models.lowrank import (
    INITS,
    LowRankConv2d,
    LowRankLinear,
    freeze_all_but_lowrank,
    lowrank_rank,
    replace_module,
    select_layers,
    weight_shape,
)

NULL_ROUTES = ("none", *SPLITS, "all")
# Route codes: 0..2 = one expert (SPLITS order), NONE = no expert, ALL = every expert.
ROUTE_NONE = -1
ROUTE_ALL = len(SPLITS)


def expert_ranks(rank: int, num_experts: int = len(SPLITS)) -> list[int]:
    """Split a rank budget as evenly as possible, the remainder to the first experts; every
    expert gets at least rank 1 (so the total exceeds ``rank`` only when ``rank < num_experts``)."""
    base, extra = divmod(rank, num_experts)
    return [max(1, base + (1 if i < extra else 0)) for i in range(num_experts)]


class RouteState:
    """The current batch's route codes ``(B,)``, shared by the model's expert layers."""

    def __init__(self) -> None:
        self.route: Tensor | None = None


def _route_mask(layer: GroupExpertMixin, batch: int, dtype: torch.dtype) -> Tensor:
    """``(B, r_total)``: 1 on the rank channels of each sample's expert(s)."""
    route = layer.route_state.route
    if route is None or route.shape[0] != batch:
        raise RuntimeError(
            "group-expert layer called without routing for this batch: call the model itself "
            "(its forward pre-hook sets the route from y), not a layer on its own"
        )
    r = route[:, None]
    return ((r == layer.rank_group[None, :]) | (r == ROUTE_ALL)).to(dtype)


class GroupExpertMixin:
    """Expert layers: ``A`` / ``B`` hold the experts stacked along the rank (``rank_group``
    names each rank channel's expert). Routed per sample, so never merged."""

    mergeable = False
    route_state: RouteState
    rank_group: Tensor

    def _add_routing(self, ranks: Sequence[int], state: RouteState) -> None:
        groups = [g for g, r in enumerate(ranks) for _ in range(r)]
        device = self.lowrank_A.device  # type: ignore[attr-defined]
        self.register_buffer(  # type: ignore[attr-defined]
            "rank_group", torch.tensor(groups, dtype=torch.long, device=device), persistent=False
        )
        self.route_state = state
        self.expert_ranks = list(ranks)


class GroupExpertConv2d(GroupExpertMixin, LowRankConv2d):
    """``conv(x, W_g) + B (mask * conv(x, A))``: each sample gets its own expert's ``B_g A_g``."""

    def forward(self, x: Tensor) -> Tensor:
        out = self._conv_forward(x, self.weight, self.bias)
        if not self.expert_enabled:
            return out
        a = self._conv_forward(x, self.lowrank_A.view(self.rank, *self.weight.shape[1:]), None)
        mask = _route_mask(self, x.shape[0], a.dtype)
        return out + F.conv2d(a * mask[:, :, None, None], self.lowrank_B[:, :, None, None])


class GroupExpertLinear(GroupExpertMixin, LowRankLinear):
    """``x W_g^T + (mask * x A^T) B^T``: each sample gets its own expert's ``B_g A_g``."""

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        if not self.expert_enabled:
            return out
        a = F.linear(x, self.lowrank_A)
        mask = _route_mask(self, x.shape[0], a.dtype)
        mask = mask.view(mask.shape[0], *([1] * (a.ndim - 2)), mask.shape[1])
        return out + F.linear(a * mask, self.lowrank_B)


EXPERT_TYPES: dict[type[nn.Module], type[LowRankConv2d | LowRankLinear]] = {
    nn.Conv2d: GroupExpertConv2d,
    nn.Linear: GroupExpertLinear,
}


class ExpertRouter(nn.Module):
    """Label -> route-code table (persistent buffer of length ``C + 1``, the null label last).

    Attributes:
        splits: the group name of every class (host-side copy, for checks without a sync).
        null_route: where the null label goes.
        state: the :class:`RouteState` the adapted layers read.
    """

    def __init__(self, splits: Sequence[str], null_route: str) -> None:
        super().__init__()
        check_choice("null_route", null_route, NULL_ROUTES, "method.model_transform")
        null_code = {"none": ROUTE_NONE, "all": ROUTE_ALL}.get(null_route)
        if null_code is None:
            null_code = SPLITS.index(null_route)
        table = [SPLITS.index(s) for s in splits] + [null_code]
        self.register_buffer("group_of_label", torch.tensor(table, dtype=torch.long))
        self.splits = list(splits)
        self.null_route = null_route
        self.state = RouteState()

    def set_route(self, y: Tensor | None, batch: int, device: torch.device) -> None:
        """Route codes of labels ``y`` (``None``: every sample null) for the next forward."""
        if y is None:
            null = self.group_of_label[-1]
            self.state.route = null.to(device).expand(batch)
        else:
            self.state.route = self.group_of_label[y]

    def extra_repr(self) -> str:
        counts = {s: self.splits.count(s) for s in SPLITS}
        return f"classes per group={counts}, null_route={self.null_route!r}"


def _route_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Forward pre-hook: route the batch by its labels (``forward(x, t, y, ...)``)."""
    x = args[0] if args else kwargs["x"]
    y = args[2] if len(args) > 2 else kwargs.get("y")
    module.expert_router.set_route(y, x.shape[0], x.device)


def default_splits(num_classes: int) -> list[str]:
    """Many / Medium / Few by the thirds rule under the project convention that class 0 is the
    most frequent and counts do not increase with the index (the exponential and step
    profiles): the split of any such counts, e.g. ``C, C-1, ..., 1``."""
    return split_map(list(range(num_classes, 0, -1)), rule="thirds")


def group_expert_lora(
    model: nn.Module,
    rank_ratio: float = 0.1,
    layers: str | Sequence[str] = "up",
    class_counts: Sequence[int] | None = None,
    null_route: str = "none",
    init: str = "lora",
    freeze_base: bool = False,
) -> nn.Module:
    """Give the selected layers one low-rank expert per class group (in place; returns ``model``).

    Args:
        model: the backbone; needs ``num_classes`` and a ``forward(x, t, y, ...)``.
        rank_ratio: total rank of the three experts over ``min(d, k)``, as CM's ``rank_ratio``.
        layers: ``"up"``, ``"all"`` or module-name prefixes (see :func:`select_layers`).
        class_counts: training images per class, for the thirds split; ``None`` assumes the
            project's convention (class 0 the head, counts non-increasing with the index).
        null_route: ``"none"`` | ``"many"`` | ``"medium"`` | ``"few"`` | ``"all"``.
        init: A's initialisation (``B = 0``, so the model starts as the plain backbone).
        freeze_base: leave only the experts trainable.
    """
    if not 0.0 < float(rank_ratio) <= 1.0:
        raise ValueError(f"rank_ratio must be in (0, 1], got {rank_ratio}")
    check_choice("init", init, INITS, "method.model_transform")
    if hasattr(model, "expert_router"):
        raise ValueError("the model already has group experts: apply the transform once")
    num_classes = getattr(model, "num_classes", None)
    if class_counts is not None:
        counts = [int(c) for c in class_counts]
        if num_classes is not None and len(counts) != num_classes:
            raise ValueError(
                f"class_counts has {len(counts)} entries but the model has {num_classes} classes"
            )
        splits = split_map(counts, rule="thirds")
    elif num_classes is not None:
        splits = default_splits(int(num_classes))
    else:
        raise ValueError("the model has no num_classes: pass class_counts to group_expert_lora")

    router = ExpertRouter(splits, null_route)
    for name, layer in select_layers(model, layers):
        d, k = weight_shape(layer)
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            raise ValueError(f"group experts need ungrouped convolutions; {name} has groups>1")
        ranks = expert_ranks(lowrank_rank(d, k, float(rank_ratio)))
        new = EXPERT_TYPES[type(layer)].from_module(layer, sum(ranks), init)
        new._add_routing(ranks, router.state)
        replace_module(model, name, new)
    router.to(next(model.parameters()).device)
    model.expert_router = router
    model.register_forward_pre_hook(_route_hook, with_kwargs=True)
    if freeze_base:
        freeze_all_but_lowrank(model)
    return model


def _unwrap(model: Any) -> Any:
    """The module behind a ``torch.compile`` wrapper."""
    return getattr(model, "_orig_mod", model)


class GroupExpertObjective(WrappingObjective):
    """The base objective, after checking once that the model's routing matches the data.

    The transform is built from the config before the data is read, so it assumes the
    project's class ordering; this wrapper compares (on the host, once) the model's split with
    the thirds split of the actual training counts given to :meth:`setup`, and stops with a
    clear message if they differ or if the model has no experts.
    """

    name = "group_expert_lora"
    passes = 0  # the base's prediction through the routed experts

    def __init__(self, base: Objective) -> None:
        super().__init__(base)
        self._splits: list[str] | None = None
        self._checked = False

    def setup(self, class_counts: Sequence[int], seed: int = 0) -> None:
        super().setup(class_counts, seed)
        self._splits = split_map([int(c) for c in class_counts], rule="thirds")
        self._checked = False

    def check_routing(self, model: Any) -> None:
        """Raise if ``model`` has no group experts or routes by another split."""
        router = getattr(_unwrap(model), "expert_router", None)
        if router is None:
            raise ValueError(
                "method group_expert_lora needs the model transform "
                "lt_diffusion.methods.group_expert.group_expert_lora (method.model_transform)"
            )
        if self._splits is None:
            raise RuntimeError("objective.setup(class_counts) must be called before training")
        if router.splits != self._splits:
            raise ValueError(
                "the model's Many/Medium/Few routing does not match the training class counts "
                f"(model: {router.splits}, data: {self._splits}); pass the counts to the "
                "transform as method.model_transform.class_counts"
            )

    def compute(
        self, model: Model, x0: Tensor, y: Tensor, schedule: NoiseSchedule, aug_labels: Aug = None
    ) -> Result:
        if not self._checked:  # host-side, first step only
            self.check_routing(model)
            self._checked = True
        return self.base.compute(model, x0, y, schedule, aug_labels)
