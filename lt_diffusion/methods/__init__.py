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
from lt_diffusion.methods.consistency import ConsistencyDistillationObjective
from lt_diffusion.methods.coral import CORALObjective, supcon_loss
from lt_diffusion.methods.ddpm import DDPMObjective
from lt_diffusion.methods.focal import FocalObjective
from lt_diffusion.methods.group_expert import GroupExpertObjective, group_expert_lora
from lt_diffusion.methods.imba import FrequencyBalancedObjective, IMBAObjective, imba_distance
from lt_diffusion.methods.oc import (
    OCObjective,
    oc_gate,
    oc_selection_logits,
    oc_selection_probs,
    oc_target,
)
from lt_diffusion.methods.overlap import (
    OverlapObjective,
    negative_labels,
    overlap_timestep_weights,
)
from lt_diffusion.methods.pd_cbdm import PDCBDMObjective, head_tail_split, reverse_mean_from_eps

__all__ = [
    "ConsistencyDistillationObjective",
    "CORALObjective",
    "FrequencyBalancedObjective",
    "IMBAObjective",
    "OverlapObjective",
    "PDCBDMObjective",
    "head_tail_split",
    "imba_distance",
    "negative_labels",
    "overlap_timestep_weights",
    "reverse_mean_from_eps",
    "supcon_loss",
    "CMObjective",
    "GroupExpertObjective",
    "cm_class_weights",
    "group_expert_lora",
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
