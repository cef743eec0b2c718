"""Small-sample statistics for seed-replicated training studies (scripts/locality_study.py).

Pure Python (no scipy): the Student-t distribution through the regularized incomplete beta function
(Numerical Recipes' continued fraction, Lentz's method), a t-based confidence interval of a mean, the
paired t-test, the exact sign-flip permutation test for paired differences, and first-crossing epochs.

Conventions. ``values`` are one number per seed. The interval is mean ± t_{1-α/2, n-1} · s / √n with the
sample standard deviation s (n - 1 in the denominator); n = 1 gives an infinite half-width. Paired tests
take per-seed pairs (a_i, b_i) from runs that share seed i (same initial model, same rollout noise), so
the differences d_i = a_i - b_i cancel the seed's own luck.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

__all__ = ["Interval", "mean_interval", "student_t_cdf", "student_t_quantile", "paired_t_test",
           "sign_flip_test", "first_crossing", "crossing_summary", "parse_seeds"]


@dataclasses.dataclass(frozen=True)
class Interval:
    """mean ± half_width (a ``level`` two-sided t interval) of n values; std is the sample std (n - 1)."""

    mean: float
    half_width: float
    std: float
    n: int
    level: float = 0.95

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def format(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), relative accuracy ~1e-14."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` > 0 degrees of freedom."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _regularized_beta(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """t with P(T <= t) = p (0 < p < 1), by bisection on :func:`student_t_cdf` (absolute accuracy 1e-10)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if student_t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-10:
            break
    return 0.5 * (low + high)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    m = sum(values) / n
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return m, s


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean of ``values`` with its two-sided t interval at ``level`` (n = 1: half-width inf, std nan)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_interval needs at least one value")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    n = len(values)
    m, s = _mean_std(values)
    if n == 1:
        return Interval(m, float("inf"), s, n, level)
    half = student_t_quantile(0.5 + level / 2.0, n - 1) * s / math.sqrt(n)
    return Interval(m, half, s, n, level)


def _differences(a: Sequence[float], b: Sequence[float]) -> list[float]:
    if len(a) != len(b) or not a:
        raise ValueError(f"paired tests need two equally long, non-empty lists, got {len(a)} and {len(b)}")
    return [float(x) - float(y) for x, y in zip(a, b)]


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Two-sided paired t-test of mean(a - b) = 0. Returns mean_difference, t, df and p
    (p = 1 when every difference is 0; p = 0 when they are all equal and non-zero; nan for one pair)."""
    d = _differences(a, b)
    n = len(d)
    m, s = _mean_std(d)
    if n < 2:
        return {"mean_difference": m, "t": float("nan"), "df": 0, "p": float("nan")}
    if s == 0:
        return {"mean_difference": m, "t": math.copysign(float("inf"), m) if m else 0.0, "df": n - 1,
                "p": 0.0 if m else 1.0}
    t = m / (s / math.sqrt(n))
    return {"mean_difference": m, "t": t, "df": n - 1, "p": 2.0 * (1.0 - student_t_cdf(abs(t), n - 1))}


def sign_flip_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Exact two-sided sign-flip permutation test of paired differences d = a - b.

    Under H0 (no difference) each d_i is as likely to be -d_i; p = the share of all 2^n sign patterns
    whose |sum| is >= the observed |sum| (the observed one included, so p >= 2 / 2^n when d != 0;
    with 5 seeds the smallest possible p is 1/16). ``p_min`` reports that floor. n <= 20.
    """
    d = _differences(a, b)
    n = len(d)
    if n > 20:
        raise ValueError(f"sign_flip_test enumerates 2^n patterns; n = {n} > 20")
    observed = abs(sum(d))
    tolerance = 1e-12 * max(1.0, sum(abs(x) for x in d))
    hits = sum(1 for signs in itertools.product((1.0, -1.0), repeat=n)
               if abs(sum(s * x for s, x in zip(signs, d))) >= observed - tolerance)
    nonzero = sum(1 for x in d if x != 0)
    return {"mean_difference": sum(d) / n, "p": hits / 2 ** n, "n": n,
            "p_min": (2.0 / 2 ** nonzero if nonzero else 1.0)}


def first_crossing(curve: Sequence[float], threshold: float) -> int | None:
    """First index e with curve[e] >= threshold, or None when the curve never reaches it."""
    return next((e for e, v in enumerate(curve) if v >= threshold), None)


def crossing_summary(curves: Sequence[Sequence[float]], threshold: float) -> dict:
    """Epochs to ``threshold`` per seed and their spread.

    Returns ``per_seed`` (int or None), ``reached`` (how many seeds crossed), ``median`` / ``min`` / ``max``
    over the seeds that crossed (None if none did) and ``censored_mean``: the mean with a never-crossing seed
    counted as len(curve) (a lower bound on its true crossing epoch, so the mean is a lower bound too).
    """
    per_seed = [first_crossing(c, threshold) for c in curves]
    reached = sorted(e for e in per_seed if e is not None)
    censored = [e if e is not None else len(c) for e, c in zip(per_seed, curves)]
    median = None
    if reached:
        k = len(reached)
        median = reached[k // 2] if k % 2 else 0.5 * (reached[k // 2 - 1] + reached[k // 2])
    return {"per_seed": per_seed, "reached": len(reached), "median": median,
            "min": reached[0] if reached else None, "max": reached[-1] if reached else None,
            "censored_mean": sum(censored) / len(censored) if censored else None}


def parse_seeds(text: str) -> list[int]:
    """A studies' ``--seeds`` value: a count N (seeds 0..N-1) or comma-separated seeds ("0,3,7").
    SystemExit naming the flag on anything else."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds {text!r}: give a count N or comma-separated integers") from None
    if len(values) == 1:
        if values[0] < 1:
            raise SystemExit(f"--seeds {text!r}: a count must be >= 1 (one count N means seeds 0..N-1)")
        return list(range(values[0]))
    return values
