"""Low-rank capacity reservation (CM paper, Sec. 3.1, eq. 1) and the switch that removes it.

Every selected ``Conv2d`` / ``Linear`` weight ``W`` (``d x k``; for a conv ``d = out_channels``,
``k = in_channels / groups * kh * kw``) becomes ``W = W_g + B A`` with ``B`` (``d x r``),
``A`` (``r x k``) and ``r = max(1, round(rank_ratio * min(d, k)))`` (round half up, at most
``min(d, k)``). ``theta_g`` is the set of ``W_g`` parts (and every parameter that is not
decomposed); ``theta = theta_g + theta_e`` adds the ``B A`` parts.

* :func:`reserve_capacity` is the method config's ``model_transform``: it swaps the selected
  layers for :class:`LowRankConv2d` / :class:`LowRankLinear` in place. ``W_g`` keeps the
  layer's own (initial or loaded) weight and bias, ``B = 0`` and ``A`` is random, so the
  transformed model computes exactly what the plain one did (LoRA's initialisation; the CM
  paper does not state one). ``freeze_base=True`` leaves only ``A`` and ``B`` trainable
  (LoRA fine-tuning, the paper's Table 1 "CBDM (LoRA)").
* :func:`set_expert_enabled` / :func:`expert_switch` run the model with ``theta_g`` only (the
  ``B A`` parts removed): the second forward of the CM loss and the paper's Table 7
  "CM (theta_g)" evaluation. The switch is a plain Python attribute per layer: under
  ``torch.compile`` each state is one graph (Dynamo guards on it), and nothing synchronises.
* :func:`merge_lowrank` folds ``B A`` into plain ``Conv2d`` / ``Linear`` layers for inference,
  so a CM model samples at exactly the cost of the plain backbone.

The training forward materialises ``W_g + B A`` (a ``d x r x k`` matmul per layer) and runs one
convolution, rather than LoRA's extra activation path: at ``r = min(d, k) / 10`` on 32 px
feature maps this is the cheaper of the two, and it is exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Parameter names of the low-rank factors; freeze_base and the counts below find them by name.
LOWRANK_PARAMS = ("lowrank_A", "lowrank_B")
# A's initialisation; B always starts at zero so that W = W_g at the start.
INITS = ("lora", "gaussian")
# Layer types that are decomposed (exact types: e.g. MultiheadAttention's Linear subclass,
# whose weight is used functionally, is left alone).
DECOMPOSABLE = (nn.Conv2d, nn.Linear)


def lowrank_rank(d: int, k: int, rank_ratio: float) -> int:
    """``r = max(1, round(rank_ratio * min(d, k)))``, rounding half up, capped at ``min(d, k)``."""
    full = min(d, k)
    return min(full, max(1, math.floor(rank_ratio * full + 0.5)))


def weight_shape(layer: nn.Conv2d | nn.Linear) -> tuple[int, int]:
    """``(d, k)`` of a layer's weight seen as a matrix (conv: out x in/groups*kh*kw)."""
    w = layer.weight
    return w.shape[0], w[0].numel()


class LowRankMixin:
    """The low-rank part shared by the decomposed layer types.

    Attributes:
        lowrank_A: ``A``, shape ``(r, k)``.
        lowrank_B: ``B``, shape ``(d, r)``.
        expert_enabled: ``False`` runs the layer with ``W_g`` only.
        mergeable: whether :func:`merge_lowrank` may fold ``B A`` into the weight (not for
            label-routed experts, whose ``B A`` depends on the sample).
    """

    mergeable: ClassVar[bool] = True
    weight: nn.Parameter
    lowrank_A: nn.Parameter
    lowrank_B: nn.Parameter
    expert_enabled: bool

    @property
    def rank(self) -> int:
        return self.lowrank_A.shape[0]

    def _add_lowrank(self, rank: int, init: str) -> None:
        """Create ``A`` (random) and ``B`` (zero) next to the existing weight."""
        if init not in INITS:
            raise ValueError(f"low-rank init must be one of {INITS}, got {init!r}")
        w = self.weight
        d, k = w.shape[0], w[0].numel()
        self.lowrank_A = nn.Parameter(torch.empty(rank, k, device=w.device, dtype=w.dtype))
        self.lowrank_B = nn.Parameter(torch.zeros(d, rank, device=w.device, dtype=w.dtype))
        with torch.no_grad():
            if init == "lora":  # Hu et al. / peft default: kaiming-uniform(a=sqrt(5)) on A
                nn.init.kaiming_uniform_(self.lowrank_A, a=math.sqrt(5))
            else:  # peft's "gaussian": N(0, 1/r^2)
                nn.init.normal_(self.lowrank_A, std=1.0 / rank)
        self.expert_enabled = True

    def delta_weight(self) -> Tensor:
        """``B A`` in the weight's shape."""
        return (self.lowrank_B @ self.lowrank_A).view(self.weight.shape)

    def effective_weight(self) -> Tensor:
        """``W_g + B A`` when the expert part is enabled, else ``W_g``."""
        if self.expert_enabled:
            return self.weight + self.delta_weight()
        return self.weight


def _shape_args(layer: nn.Conv2d | nn.Linear) -> dict[str, Any]:
    """The constructor arguments that give another layer of ``layer``'s shape."""
    if isinstance(layer, nn.Linear):
        return {"in_features": layer.in_features, "out_features": layer.out_features}
    keys = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation")
    return {k: getattr(layer, k) for k in (*keys, "groups", "padding_mode")}


class _Wrapping(LowRankMixin):
    """Builds the low-rank layer around a plain one, and the plain one back."""

    plain: type[nn.Conv2d] | type[nn.Linear]

    @classmethod
    def from_module(cls, base: nn.Module, rank: int, init: str = "lora") -> Any:
        """Wrap ``base``: its weight / bias Parameters become ``W_g`` (shared, not copied)."""
        # device="meta": placeholders only, replaced by base's own Parameters below
        layer = cls(**_shape_args(base), bias=base.bias is not None, device="meta")
        layer.weight, layer.bias = base.weight, base.bias
        layer.train(base.training)
        layer._add_lowrank(rank, init)
        return layer

    def to_plain(self) -> nn.Conv2d | nn.Linear:
        """A plain layer computing what this layer computes now."""
        plain = self.plain(**_shape_args(self), bias=self.bias is not None, device="meta")
        return _fill_plain(plain, self)


class LowRankConv2d(_Wrapping, nn.Conv2d):
    """``Conv2d`` whose weight is ``W_g + B A`` (``W_g`` is ``weight``)."""

    plain = nn.Conv2d

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


class LowRankLinear(_Wrapping, nn.Linear):
    """``Linear`` whose weight is ``W_g + B A`` (``W_g`` is ``weight``)."""

    plain = nn.Linear

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


def _fill_plain(plain: nn.Conv2d | nn.Linear, layer: LowRankMixin) -> nn.Conv2d | nn.Linear:
    """Give ``plain`` the merged weight of ``layer`` (summed in float64, then cast back)."""
    w = layer.weight
    with torch.no_grad():
        merged = w.double()
        if layer.expert_enabled:
            merged = merged + (layer.lowrank_B.double() @ layer.lowrank_A.double()).view(w.shape)
        plain.weight = nn.Parameter(merged.to(w.dtype), requires_grad=w.requires_grad)
    plain.bias = layer.bias  # the same Parameter (or None)
    plain.train(layer.training)
    return plain


LOWRANK_TYPES: dict[type[nn.Module], type[LowRankMixin]] = {
    nn.Conv2d: LowRankConv2d,
    nn.Linear: LowRankLinear,
}


# ----------------------------------------------------------------------------------------------
# Layer selection


def _as_prefixes(layers: str | Sequence[str]) -> list[str] | None:
    """``"all"`` -> ``None`` (every layer); a name or a list of names -> prefixes."""
    if isinstance(layers, str):
        return None if layers == "all" else [layers]
    try:
        prefixes = [str(p) for p in layers]
    except TypeError:
        raise ValueError(
            f"layers must be 'up', 'all' or a list of module-name prefixes, got {layers!r}"
        ) from None
    if not prefixes:
        raise ValueError("layers is an empty list: name at least one module prefix, or 'all'")
    return prefixes


def _matches(name: str, prefixes: list[str] | None) -> bool:
    if prefixes is None:
        return True
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def select_layers(model: nn.Module, layers: str | Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` of every plain ``Conv2d`` / ``Linear`` the spec selects.

    ``layers``: ``"up"`` (the U-Net's up-sampling half, ``model.up``), ``"all"``, or module-name
    prefixes (``["up", "tail"]``, ``["mid.0"]``). A prefix matches a module name exactly or as
    a dotted ancestor. Refuses a model that already holds low-rank layers.
    """
    if any(isinstance(m, LowRankMixin) for m in model.modules()):
        raise ValueError(
            "the model already has low-rank layers: apply one capacity transform only "
            "(check that method.model_transform is not applied twice)"
        )
    prefixes = _as_prefixes(layers)
    names = dict(model.named_modules())
    if prefixes is not None:
        missing = [p for p in prefixes if p not in names]
        if missing:
            tops = sorted({n.split(".")[0] for n in names if n})
            raise ValueError(
                f"layers {prefixes}: the model has no module named {missing} (top-level "
                f"modules: {tops}); use 'up', 'all' or existing module names"
            )
    chosen = [
        (n, m)
        for n, m in names.items()
        if type(m) in DECOMPOSABLE and _matches(n, prefixes)  # exact types on purpose
    ]
    if not chosen:
        raise ValueError(f"layers {layers!r} selects no Conv2d / Linear layer of the model")
    return chosen


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# ----------------------------------------------------------------------------------------------
# Public API


def reserve_capacity(
    model: nn.Module,
    rank_ratio: float = 0.1,
    layers: str | Sequence[str] = "up",
    init: str = "lora",
    freeze_base: bool = False,
) -> nn.Module:
    """Decompose the selected layers' weights as ``W = W_g + B A`` (in place; returns ``model``).

    Args:
        model: the backbone (for ``layers="up"``, a U-Net with an ``up`` module list).
        rank_ratio: ``r / min(d, k)`` (CM paper: 0.1); ``r`` is at least 1.
        layers: ``"up"`` (default, the paper's choice), ``"all"`` or module-name prefixes.
        init: ``"lora"`` (A kaiming-uniform, B = 0) or ``"gaussian"`` (A ~ N(0, 1/r^2), B = 0).
        freeze_base: leave only the low-rank factors trainable (LoRA fine-tuning).
    """
    if not 0.0 < float(rank_ratio) <= 1.0:
        raise ValueError(f"rank_ratio must be in (0, 1], got {rank_ratio}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    for name, layer in select_layers(model, layers):
        d, k = weight_shape(layer)
        rank = lowrank_rank(d, k, float(rank_ratio))
        replace_module(model, name, LOWRANK_TYPES[type(layer)].from_module(layer, rank, init))
    if freeze_base:
        freeze_all_but_lowrank(model)
    return model


def is_lowrank_param(name: str) -> bool:
    """Whether a parameter name (dotted) is a low-rank factor ``A`` or ``B``."""
    return name.rsplit(".", 1)[-1] in LOWRANK_PARAMS


def freeze_all_but_lowrank(model: nn.Module) -> nn.Module:
    """``requires_grad=False`` on every parameter except the low-rank factors."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_lowrank_param(name))
    return model


def lowrank_layers(model: nn.Module) -> list[LowRankMixin]:
    """Every decomposed layer of ``model`` (also through a ``torch.compile`` wrapper)."""
    return [m for m in model.modules() if isinstance(m, LowRankMixin)]


def lowrank_parameter_count(model: nn.Module) -> int:
    """Number of parameters in the low-rank factors (the decomposition's overhead)."""
    return sum(p.numel() for n, p in model.named_parameters() if is_lowrank_param(n))


def set_expert_enabled(model: nn.Module, enabled: bool) -> int:
    """Switch the ``B A`` parts of every decomposed layer on or off; returns how many layers.

    ``enabled=False`` runs ``theta_g`` only. A Python attribute per layer: no tensor work, and
    ``torch.compile`` keeps one graph per state.
    """
    layers = lowrank_layers(model)
    for layer in layers:
        layer.expert_enabled = bool(enabled)
    return len(layers)


@contextmanager
def expert_switch(model: nn.Module, enabled: bool) -> Iterator[int]:
    """Within the block, the ``B A`` parts are ``enabled`` (yields the number of layers);
    each layer's previous state is restored afterwards, also on an exception."""
    layers = lowrank_layers(model)
    before = [layer.expert_enabled for layer in layers]
    try:
        for layer in layers:
            layer.expert_enabled = bool(enabled)
        yield len(layers)
    finally:
        for layer, state in zip(layers, before):
            layer.expert_enabled = state


def theta_g_only(model: nn.Module) -> AbstractContextManager[int]:
    """``with theta_g_only(model): ...`` runs the model without its reserved capacity."""
    return expert_switch(model, False)


def merge_lowrank(model: nn.Module) -> nn.Module:
    """Fold ``B A`` into plain ``Conv2d`` / ``Linear`` layers (in place; returns the model).

    Each layer is merged as it currently computes: a layer switched off merges to ``W_g``
    alone (a merged ``theta_g``-only model). Label-routed layers (group experts) are not
    mergeable and are left as they are. After merging, the model's state dict has the plain
    backbone's keys, so merge *after* loading a checkpoint.
    """
    if isinstance(model, LowRankMixin):
        return model.to_plain() if model.mergeable else model
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankMixin) and module.mergeable:
            replace_module(model, name, module.to_plain())
    return model
