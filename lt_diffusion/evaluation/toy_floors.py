"""The synthetic benchmark's floors: what its metrics give when the generator is not a trained
network, so that every method's number can be read against what is attainable.

* **true score** (:class:`TrueScoreDenoiser`): the exact noise prediction of the noised
  mixture, run through the protocol's own sampler (DDIM-50, x0 clipped): the best any
  denoiser can do with that sampler. For class ``c`` with modes ``mu_k``, weights ``w_k`` and
  per-coordinate std ``s``, ``x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps`` has the density
  ``p_t(x | c) = sum_k w_k N(x; sqrt(abar) mu_k, v I)`` with ``v = abar s^2 + 1 - abar``, so
  ``eps(x, t, c) = -sqrt(1 - abar) grad log p_t(x | c) = sqrt(1 - abar) (x - sqrt(abar) sum_k
  r_k mu_k) / v`` with the responsibilities ``r_k = softmax_k(log w_k - |x - sqrt(abar)
  mu_k|^2 / (2 v))``. The null label (classifier-free guidance) is the class mixture under the
  training class frequencies.
* **class GMM** (:func:`class_gmm_points`): per class, a Gaussian mixture fitted to the class's
  own training points alone (scikit-learn, isotropic components as the truth's, their number
  chosen by BIC among 1 .. K), sampled: what the tail's data alone support, without any
  sharing between classes.
* **true draws** (:func:`true_draws`): fresh draws of the true class densities, of the
  protocol's generated size: the sampling floor (two finite samples of one law are at a
  distance of their own).

Every floor is reproducible from its seed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from lt_diffusion.data.toy import GaussianMixtureClasses
from lt_diffusion.diffusion import NoiseSchedule

GENERATORS = ("model", "true_score", "class_gmm", "true_draws")
# Stream of the floors' own draws (apart from the protocol's noise and real subsets).
_FLOOR_STREAM = 7
_REG_COVAR = 1e-6  # scikit-learn's GaussianMixture default


def noised_eps(
    truth: GaussianMixtureClasses, x: Tensor, abar: Tensor, weights: Tensor, means: Tensor
) -> Tensor:
    """The exact noise prediction of a mixture at noise level ``abar`` (B,), float64: ``means``
    (B, M, D) and ``weights`` (B, M) are each point's mixture (its class's modes, or every mode
    for the null label)."""
    x, abar = x.double(), abar.double()[:, None]
    v = abar * truth.std**2 + (1.0 - abar)
    centred = x[:, None, :] - abar.sqrt()[:, :, None] * means
    logits = torch.log(weights.clamp_min(1e-300)) - centred.square().sum(-1) / (2.0 * v)
    r = torch.softmax(logits, dim=1)
    mean = (r[:, :, None] * means).sum(1)
    return (1.0 - abar).sqrt() * (x - abar.sqrt() * mean) / v


class TrueScoreDenoiser(nn.Module):
    """The analytic noise prediction of the true class densities, with the backbone call
    ``model(x_t, t, y) -> eps`` the samplers use (floor (a)).

    Args:
        truth: the class densities, in the run's class order.
        schedule: the noise schedule (its ``alphas_cumprod``, in float64).
        class_prior: the class frequencies of the null label's mixture (default uniform).
    """

    def __init__(
        self,
        truth: GaussianMixtureClasses,
        schedule: NoiseSchedule,
        class_prior: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        C, K, D = truth.means.shape
        prior = np.full(C, 1.0 / C) if class_prior is None else np.asarray(class_prior, float)
        self.truth = truth
        self.vector_dim = self.in_channels = D
        self.image_size = None
        self.num_classes = C
        self.null_label = C
        means = torch.from_numpy(truth.means)  # (C, K, D) float64
        weights = torch.from_numpy(truth.weights)
        # Row C: the null label, every mode with weight prior_c w_ck.
        all_means = means.reshape(1, C * K, D)
        all_w = (torch.from_numpy(prior / prior.sum())[:, None] * weights).reshape(1, C * K)
        pad = C * K - K
        self.register_buffer(
            "means",
            torch.cat([torch.cat([means, means[:, :1].expand(C, pad, D)], 1), all_means]),
            persistent=False,
        )
        self.register_buffer(
            "weights",
            torch.cat([torch.cat([weights, weights.new_zeros(C, pad)], 1), all_w]),
            persistent=False,
        )
        self.register_buffer("abar", schedule.host64("alphas_cumprod").clone(), persistent=False)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if y is None:
            y = torch.full_like(t, self.null_label)
        eps = noised_eps(self.truth, x, self.abar[t], self.weights[y], self.means[y])
        return eps.to(x.dtype)


def floor_rng(seed: int, label: int) -> np.random.Generator:
    """The seeded stream of a floor's draws for one class."""
    return np.random.default_rng([int(seed), _FLOOR_STREAM, int(label)])


def true_draws(truth: GaussianMixtureClasses, label: int, n: int, seed: int) -> np.ndarray:
    """``n`` fresh draws of class ``label`` (floor (c))."""
    return truth.sample(int(label), int(n), floor_rng(seed, label))


def fit_class_gmm(points: np.ndarray, max_components: int, seed: int) -> object:
    """A Gaussian mixture with isotropic components fitted to one class's training points, the
    number of components chosen by BIC among ``1 .. min(max_components, N)``; N >= 2."""
    from sklearn.mixture import GaussianMixture

    x = np.asarray(points, dtype=np.float64)
    if len(x) < 2:
        raise ValueError(f"a class GMM needs at least 2 training points, got {len(x)}")
    best, best_bic = None, np.inf
    for k in range(1, min(int(max_components), len(x)) + 1):
        gmm = GaussianMixture(k, covariance_type="spherical", n_init=3, random_state=int(seed))
        gmm.fit(x)
        bic = gmm.bic(x)
        if bic < best_bic:
            best, best_bic = gmm, bic
    return best


def class_gmm_points(
    train_points: np.ndarray, max_components: int, label: int, n: int, seed: int
) -> np.ndarray:
    """``n`` draws of the GMM fitted to class ``label``'s training points (floor (b)); a class
    with one training point gives it back with scikit-learn's minimal component variance
    (``reg_covar``, 1e-6): all one point supports."""
    rng = floor_rng(seed, label)
    train = np.asarray(train_points, dtype=np.float64)
    if len(train) == 1:
        return train[0] + np.sqrt(_REG_COVAR) * rng.standard_normal((int(n), train.shape[1]))
    gmm = fit_class_gmm(train, max_components, seed)
    state = int(rng.integers(2**31 - 1))
    gmm.random_state = state  # sklearn's sample() draws from the estimator's random_state
    x, _ = gmm.sample(int(n))
    return x[np.random.default_rng(state).permutation(len(x))]  # sample() groups by component
