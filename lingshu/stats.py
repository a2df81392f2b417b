"""Random draws shared by every stage: the negative-binomial sampler of the simulator and of
models that decode to counts (scLDM)."""

from __future__ import annotations

import numpy as np

# Means up to this use exact CDF inversion; larger ones the gamma-Poisson mixture.
_INVERSION_MAX_MEAN = 3.0


def sample_negative_binomial(means: np.ndarray, theta: np.ndarray,
                             rng: np.random.Generator) -> np.ndarray:
    """Draw NB counts, int32 of the shape of ``means`` (n, G), with per-gene ``theta`` (G,).

    Mean ``means``, variance ``means + means**2 / theta``. Small means use CDF inversion, which is
    exact and skips the zeros (most entries) after one comparison; large means use the
    gamma-Poisson mixture.
    """
    theta32 = theta.astype(np.float32)
    uniform = rng.random(means.shape, dtype=np.float32)
    # P(X = 0) = (theta / (theta + mu))^theta
    p_zero = np.exp(-theta32 * np.log1p(means / theta32))
    small = means <= _INVERSION_MAX_MEAN
    counts = np.zeros(means.shape, dtype=np.int32)
    flat_counts = counts.reshape(-1)
    nonzero = np.flatnonzero((uniform > p_zero) & small)
    if nonzero.size:
        gene = nonzero % means.shape[1]
        flat_counts[nonzero] = _invert_nb_cdf(means.reshape(-1)[nonzero].astype(np.float64),
                                              theta[gene].astype(np.float64),
                                              uniform.reshape(-1)[nonzero].astype(np.float64))
    large = np.flatnonzero(~small)
    if large.size:
        mu, th = means.reshape(-1)[large].astype(np.float64), theta[large % means.shape[1]]
        flat_counts[large] = rng.poisson(rng.gamma(th, mu / th))
    return counts


def _invert_nb_cdf(mu: np.ndarray, theta: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """Smallest k >= 1 with NB-CDF(k) >= uniform, for entries already known to be non-zero.

    All inputs have shape (n,); returns int32 (n,). Uses pmf(k) = pmf(k-1) * (k-1+theta)/k * q,
    q = mu / (theta + mu), and shrinks the working arrays as entries finish.
    """
    result = np.ones(mu.size, dtype=np.int32)
    idx = np.arange(mu.size)
    q = mu / (theta + mu)
    pmf = np.exp(-theta * np.log1p(mu / theta))  # float64 pmf(0), so the CDF reaches 1 accurately
    cdf = pmf.copy()
    k = 0
    while idx.size:
        k += 1
        pmf *= (k - 1 + theta) / k * q
        cdf += pmf
        done = cdf >= uniform
        result[idx[done]] = k
        keep = ~done
        idx, theta, q = idx[keep], theta[keep], q[keep]
        pmf, cdf, uniform = pmf[keep], cdf[keep], uniform[keep]
        if k >= 100_000:  # unreachable for means <= _INVERSION_MAX_MEAN; guards rounding at u ~ 1
            result[idx] = k
            break
    return result
