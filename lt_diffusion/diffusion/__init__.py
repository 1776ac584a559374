"""Noise schedule, samplers (DDPM ancestral, DDIM, DPM-Solver++, classifier-free guidance) and
generation."""

from lt_diffusion.diffusion.consistency import ConsistencySampler
from lt_diffusion.diffusion.dpm_solver import DPMSolverSampler
from lt_diffusion.diffusion.generate import (
    balanced_labels,
    chunk_ranges,
    chunk_seed,
    gather_order,
    generate,
    generate_vectors,
    is_vector_model,
    rank_count,
    to_uint8,
)
from lt_diffusion.diffusion.samplers import (
    DDIMSampler,
    DDPMSampler,
    Sampler,
    ddim_timesteps,
    guided_eps,
)
from lt_diffusion.diffusion.schedule import NoiseSchedule, make_betas

__all__ = [
    "ConsistencySampler",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverSampler",
    "NoiseSchedule",
    "Sampler",
    "balanced_labels",
    "chunk_ranges",
    "chunk_seed",
    "ddim_timesteps",
    "gather_order",
    "generate",
    "generate_vectors",
    "guided_eps",
    "is_vector_model",
    "make_betas",
    "rank_count",
    "to_uint8",
]
