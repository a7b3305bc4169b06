"""Success-rate statistics."""

from __future__ import annotations

import math

from scipy.stats import norm


def success_rate_ci(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial success rate; honest near 0 and 1, unlike the normal interval."""
    if trials <= 0:
        return 0.0, 1.0
    z = float(norm.ppf(0.5 + confidence / 2))
    rate = successes / trials
    denominator = 1 + z * z / trials
    centre = (rate + z * z / (2 * trials)) / denominator
    half_width = z * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials)) / denominator
    # Rounding can leave the bound a hair inside the rate at 0 or 1; the interval always contains the rate.
    return max(0.0, min(centre - half_width, rate)), min(1.0, max(centre + half_width, rate))
