"""The synthetic benchmark's floors (lt_diffusion/evaluation/toy_floors.py): the analytic score
against autograd of the noised mixture's log-density in float64, and the floors' points
reproducible from their seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lt_diffusion.data.toy import GaussianMixtureClasses, constellation_mixture, ring_mixture
from lt_diffusion.diffusion import DDIMSampler, NoiseSchedule, generate_vectors
from lt_diffusion.evaluation import toy_floors as TF


def noised_log_density(
    truth: GaussianMixtureClasses, x: torch.Tensor, abar: torch.Tensor, weights: np.ndarray
) -> torch.Tensor:
    """``log sum_m w_m N(x; sqrt(abar) mu_m, (abar s^2 + 1 - abar) I)`` over ``weights`` (C, K),
    written directly in float64 (the independent computation)."""
    mu = torch.from_numpy(truth.means.reshape(-1, truth.dim))
    w = torch.from_numpy(weights.reshape(-1))
    v = abar * truth.std**2 + 1.0 - abar
    d2 = ((x[:, None, :] - abar.sqrt() * mu[None]) ** 2).sum(-1)
    log_n = -d2 / (2 * v) - 0.5 * truth.dim * torch.log(2 * torch.pi * v)
    return torch.logsumexp(torch.log(w)[None] + log_n, dim=1)


@pytest.mark.parametrize("mixture", ["ring", "constellation_16d"])
def test_the_true_score_is_autograd_of_the_noised_log_density(mixture: str) -> None:
    truth = (
        ring_mixture(10)
        if mixture == "ring"
        else constellation_mixture(10, 4, dim=16, spread=0.15, std=0.015, lift=0.3)
    )
    schedule = NoiseSchedule()
    prior = np.linspace(1.0, 0.1, truth.num_classes)
    prior /= prior.sum()
    model = TF.TrueScoreDenoiser(truth, schedule, prior)
    gen = torch.Generator().manual_seed(0)
    abar_all = schedule.host64("alphas_cumprod")
    for t_value in (0, 3, 40, 400, 999):
        for label in (0, 7, truth.num_classes):  # two classes and the null label
            x = (torch.randn(16, truth.dim, generator=gen, dtype=torch.float64) * 0.5).clamp(-1, 1)
            x = x.requires_grad_(True)
            t = torch.full((16,), t_value)
            abar = abar_all[t_value]
            if label == truth.num_classes:
                weights = prior[:, None] * truth.weights
            else:
                weights = np.zeros_like(truth.weights)
                weights[label] = truth.weights[label]
            logp = noised_log_density(truth, x, abar, weights)
            (grad,) = torch.autograd.grad(logp.sum(), x)
            want = -(1.0 - abar).sqrt() * grad
            got = TF.noised_eps(
                truth, x.detach(), abar.expand(16), model.weights[label].expand(16, -1),
                model.means[label].expand(16, -1, -1),
            )  # fmt: skip
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
            y = torch.full((16,), label)
            out = model(x.detach(), t, y)  # the backbone call: same numbers, x's dtype
            torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)


def test_the_true_score_through_ddim_lands_on_the_modes_reproducibly() -> None:
    truth = ring_mixture(10)
    schedule = NoiseSchedule()
    model = TF.TrueScoreDenoiser(truth, schedule)
    sampler = DDIMSampler(schedule, steps=50, clip_denoised=True)
    labels = torch.arange(10).repeat_interleave(50)
    a = generate_vectors(model, sampler, labels, seed=3, batch_size=500)
    b = generate_vectors(model, sampler, labels, seed=3, batch_size=500)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # the floor is a function of its seed
    assert not torch.equal(a, generate_vectors(model, sampler, labels, seed=4, batch_size=500))
    hit = truth.hit_mode(a.numpy().astype(np.float64))
    assert (truth.mode_class[hit[hit >= 0]] == labels.numpy()[hit >= 0]).all()
    assert (hit >= 0).mean() > 0.95  # the exact score: on its own class's modes


def test_the_draw_and_gmm_floors_are_reproducible_from_their_seeds() -> None:
    truth = ring_mixture(10)
    a, b = TF.true_draws(truth, 3, 100, seed=5), TF.true_draws(truth, 3, 100, seed=5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, TF.true_draws(truth, 3, 100, seed=6))
    assert not np.array_equal(a, TF.true_draws(truth, 4, 100, seed=5))
    train = truth.sample(2, 2000, np.random.default_rng(0))
    g1 = TF.class_gmm_points(train, 2, label=2, n=2000, seed=1)
    np.testing.assert_array_equal(g1, TF.class_gmm_points(train, 2, label=2, n=2000, seed=1))
    assert not np.array_equal(g1, TF.class_gmm_points(train, 2, label=2, n=2000, seed=2))
    # Two well-separated modes: BIC keeps two components, at the modes, in their proportions.
    gmm = TF.fit_class_gmm(train, 2, seed=1)
    assert gmm.n_components == 2
    hit = truth.hit_mode(g1)
    share = np.bincount(hit[hit >= 0] - 2 * 2, minlength=2)[:2] / len(g1)
    np.testing.assert_allclose(share, truth.weights[2], atol=0.05)
    one_mode = train[truth.hit_mode(train) == 4]  # one of its modes only: one component
    assert TF.fit_class_gmm(one_mode, 2, seed=1).n_components == 1
