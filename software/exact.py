"""Exact enumeration of small Ising models, and sample-size-aware comparison against it.

Used by ``opentsu demo`` and by the tests, which compare every sampler against exact moments with a
tolerance derived from the effective sample size of the samples themselves.
"""

from __future__ import annotations

import numpy as np

from .model import IsingModel

__all__ = ["MAX_EXACT_NODES", "exact_distribution", "exact_moments", "effective_sample_size", "moment_errors"]

#: Largest model enumerated exactly (2^22 states).
MAX_EXACT_NODES = 22


def exact_distribution(model: IsingModel) -> tuple[np.ndarray, np.ndarray]:
    """``(states, probabilities)``: every spin configuration allowed by the clamps and its Boltzmann weight."""
    n = model.n
    free = np.flatnonzero(model.clamp == 0)
    if len(free) > MAX_EXACT_NODES:
        raise ValueError(f"{len(free)} free nodes are too many to enumerate (at most {MAX_EXACT_NODES})")
    codes = np.arange(1 << len(free), dtype=np.int64)
    states = np.empty((len(codes), n), dtype=np.int8)
    states[:] = model.clamp
    for k, node in enumerate(free):
        states[:, node] = np.where((codes >> k) & 1, 1, -1)
    log_weight = model.beta * model.energy_terms(states)
    prob = np.exp(log_weight - log_weight.max())
    return states, prob / prob.sum()


def exact_moments(model: IsingModel) -> tuple[np.ndarray, np.ndarray]:
    """``(⟨s_i⟩, ⟨s_i s_j⟩)`` exactly."""
    states, prob = exact_distribution(model)
    s = states.astype(np.float64)
    return prob @ s, (s * prob[:, None]).T @ s


def effective_sample_size(chains: np.ndarray) -> np.ndarray:
    """Multi-chain ESS of each observable (``chains`` has shape (C, T, k): C chains of T draws of k).

    Gelman et al. (BDA3, §11.5): autocorrelations are taken against the pooled variance
    ``var+ = (T-1)/T·W + B/T``, so chains stuck in different modes (a large between-chain variance B)
    shrink the ESS as they should; Geyer's initial positive sequence truncates the sum. The ESS is
    ``C·T / τ``, capped at ``C·T``.
    """
    x = np.asarray(chains, dtype=np.float64)
    c, t, k = x.shape
    chain_means = x.mean(axis=1)
    centred = x - chain_means[:, None, :]
    within = (centred ** 2).sum(axis=1) / max(t - 1, 1)       # (C, k)
    W = within.mean(axis=0)
    B_over_t = chain_means.var(axis=0, ddof=1) if c > 1 else np.zeros(k)
    var_plus = (t - 1) / t * W + B_over_t
    size = 1 << int(np.ceil(np.log2(2 * t)))
    spectrum = np.fft.rfft(centred, n=size, axis=1)
    acov = np.fft.irfft(np.abs(spectrum) ** 2, n=size, axis=1)[:, :t] / t   # (C, t, k), biased estimate
    mean_acov = acov.mean(axis=0)
    ess = np.empty(k)
    for j in range(k):
        if var_plus[j] <= 0:
            ess[j] = c * t
            continue
        rho = 1.0 - (W[j] - mean_acov[:, j]) / var_plus[j]
        tau = -1.0 + 2 * rho[0]  # rho[0] is ~1: tau starts at 1
        for lag in range(1, t - 1, 2):
            pair = rho[lag] + rho[lag + 1]
            if pair <= 0:
                break
            tau += 2 * pair
        ess[j] = min(c * t, c * t / max(tau, 1e-9))
    return ess


def moment_errors(samples: np.ndarray, model: IsingModel, pairs: np.ndarray | None = None):
    """Compare samples (C, T, n) of ±1 against exact moments.

    Returns ``(z_mean, z_pair)``: the deviation of every ``⟨s_i⟩`` and of ``⟨s_i s_j⟩`` for each pair in
    ``pairs`` (default: the model's edges), in units of its standard error ``sqrt(var_exact / ESS)``.
    """
    samples = np.asarray(samples, dtype=np.float64)
    mean, corr = exact_moments(model)
    if pairs is None:
        pairs = np.argwhere(np.triu(model.J != 0, 1))
    products = samples[..., pairs[:, 0]] * samples[..., pairs[:, 1]]
    observables = np.concatenate([samples, products], axis=-1)
    expected = np.concatenate([mean, corr[pairs[:, 0], pairs[:, 1]]])
    variance = np.maximum(1 - expected ** 2, 0.0)
    ess = effective_sample_size(observables)
    error = np.sqrt(variance / ess)
    measured = observables.mean(axis=(0, 1))
    deviation = measured - expected
    deviation[np.abs(deviation) < 1e-9] = 0.0  # exact moments of clamped nodes carry rounding noise
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(error > 0, deviation / np.where(error > 0, error, 1), np.where(deviation == 0, 0.0, np.inf))
    n = samples.shape[-1]
    return z[:n], z[n:]
