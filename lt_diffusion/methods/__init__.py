"""Training objectives, one per method (DESIGN.md: the method is the objective)."""

from lt_diffusion.methods.ada import (
    AUG_DIM,
    ADAObjective,
    AugmentParams,
    AugmentPipeline,
    enable_augment_labels,
)
from lt_diffusion.methods.base import NoisedBatch, Objective, ObjectiveOutput
from lt_diffusion.methods.cbdm import CBDMObjective
from lt_diffusion.methods.cm import CMObjective, cm_class_weights
from lt_diffusion.methods.common import (
    TARGET_DISTS,
    BaseContext,
    ComposableObjective,
    label_distribution,
)
from lt_diffusion.methods.ddpm import DDPMObjective
from lt_diffusion.methods.focal import FocalObjective
from lt_diffusion.methods.group_expert import GroupExpertObjective, group_expert_lora
from lt_diffusion.methods.lora import (
    expert_switch,
    merge_lowrank,
    reserve_capacity,
    set_expert_enabled,
    theta_g_only,
)
from lt_diffusion.methods.oc import (
    OCObjective,
    oc_gate,
    oc_selection_logits,
    oc_selection_probs,
    oc_target,
)

__all__ = [
    "CMObjective",
    "GroupExpertObjective",
    "cm_class_weights",
    "expert_switch",
    "group_expert_lora",
    "merge_lowrank",
    "reserve_capacity",
    "set_expert_enabled",
    "theta_g_only",
    "ADAObjective",
    "AUG_DIM",
    "AugmentParams",
    "AugmentPipeline",
    "BaseContext",
    "CBDMObjective",
    "ComposableObjective",
    "DDPMObjective",
    "FocalObjective",
    "NoisedBatch",
    "OCObjective",
    "Objective",
    "ObjectiveOutput",
    "TARGET_DISTS",
    "enable_augment_labels",
    "label_distribution",
    "oc_gate",
    "oc_selection_logits",
    "oc_selection_probs",
    "oc_target",
]
