"""Paired comparisons over seeds: the mean difference of two runs and its confidence interval.

Every claim of the embedded study compares two runs that differ in one knob only and share the
initialisation and the data order of a seed, so the natural unit is the *paired difference*
``d_i = a_i - b_i`` of seed ``i``: the seed-to-seed spread that both runs share cancels in
``d_i``, and what is left is the effect plus the noise of the knob itself.

The default interval is the Student-t interval over seeds, ``mean(d) +- t_{(1+conf)/2, n-1} *
sd(d) / sqrt(n)``: with 3 to 10 seeds the normal quantile would be far too narrow (1.96 against
4.30 at n = 3), and differences of two final mIoUs are close enough to normal for the t interval
to hold its coverage. A percentile bootstrap of the mean is offered as a check on that
assumption; with so few seeds it is narrower than the t interval (it ignores the n - 1 degrees of
freedom) and should not be the headline.

numpy only: the Student-t quantile is computed here, from the regularised incomplete beta function
(continued fraction) inverted by bisection, to about 1e-12.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

METHODS = {"t": "Student-t interval", "bootstrap": "percentile bootstrap"}
DEFAULT_N_BOOT = 10_000
DEFAULT_UNIT = "mIoU points"

_EPS = 1e-15
_TINY = 1e-300
_MAX_TERMS = 100_000


# --------------------------------------------------------------------------------------------
# Student-t distribution
# --------------------------------------------------------------------------------------------


def _beta_continued_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz), fast for x < (a + 1) / (a + b + 2)."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    frac = d
    for m in range(1, _MAX_TERMS):
        # even step d_{2m}, then odd step d_{2m+1} of the fraction
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + num / c
            c = c if abs(c) > _TINY else _TINY
            step = c * d
            frac *= step
        if abs(step - 1.0) < _EPS:
            return frac
    raise ArithmeticError(f"incomplete beta: continued fraction did not converge for x={x}, a={a}, b={b}")


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) for 0 <= x <= 1 and a, b > 0."""
    if not (a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"regularized_incomplete_beta: a and b must be finite and > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"regularized_incomplete_beta: x must lie in [0, 1], got {x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # the fraction converges fast only on the lower side of the mean; use I_x(a,b) = 1 - I_{1-x}(b,a)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(1.0 - x, b, a) / b


def _check_dof(dof: float) -> float:
    dof = float(dof)
    if not (dof > 0 and math.isfinite(dof)):
        raise ValueError(f"dof must be a finite number > 0, got {dof}")
    return dof


def t_sf(t: float, dof: float) -> float:
    """Upper tail P(T > t) of Student's t with ``dof`` degrees of freedom."""
    dof = _check_dof(dof)
    t = float(t)
    if math.isnan(t):
        raise ValueError("t_sf: t is NaN")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    # P(|T| > |t|) = I_{dof / (dof + t^2)}(dof / 2, 1 / 2)
    two_sided = regularized_incomplete_beta(dof / (dof + t * t), dof / 2.0, 0.5)
    return 0.5 * two_sided if t >= 0 else 1.0 - 0.5 * two_sided


def t_cdf(t: float, dof: float) -> float:
    """P(T <= t) of Student's t with ``dof`` degrees of freedom."""
    return 1.0 - t_sf(t, dof)


def t_quantile(p: float, dof: float) -> float:
    """The p-quantile of Student's t with ``dof`` degrees of freedom (e.g. ``t_quantile(0.975, 2)``
    = 4.302653), by bisection on the upper tail (no loss of digits as p approaches 1)."""
    dof = _check_dof(dof)
    p = float(p)
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must lie strictly between 0 and 1, got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, dof)
    tail = 1.0 - p
    lo, hi = 0.0, 1.0
    while t_sf(hi, dof) > tail:
        lo, hi = hi, 2.0 * hi
        if hi > 1e300:
            raise ArithmeticError(f"t_quantile: no finite quantile found for p={p}, dof={dof}")
    for _ in range(2000):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi) or hi - lo <= 1e-13 * hi:
            break
        if t_sf(mid, dof) > tail:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------------------------
# Paired differences
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedDifference:
    """One claim measured over seeds: ``differences[i] = a[i] - b[i]`` for seed ``seeds[i]``, their
    mean and the ``confidence`` interval ``[lo, hi]`` of the mean by ``method`` (see :data:`METHODS`).

    ``paper`` is the published difference for the same claim (same unit), or None where the paper
    gives none; it is shown beside ours, never used in the interval.
    """

    claim: str
    a: tuple[float, ...]
    b: tuple[float, ...]
    differences: tuple[float, ...]
    mean: float
    sd: float
    lo: float
    hi: float
    method: str
    confidence: float
    unit: str = DEFAULT_UNIT
    paper: float | None = None
    seeds: tuple[int, ...] | None = None

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def half_width(self) -> float:
        """Half the interval's width (for the t interval, the +- of ``mean +- half_width``)."""
        return 0.5 * (self.hi - self.lo)

    @property
    def resolved(self) -> bool:
        """True only when the interval excludes zero (an end exactly at 0 does not count)."""
        return self.lo > 0.0 or self.hi < 0.0

    def verdict(self, digits: int = 1) -> str:
        """One line for a chapter, e.g. ``"resolved: +2.0 [+0.8, +3.2] mIoU points over 3 seeds
        (95 % Student-t interval)"`` or ``"cannot tell: ... ; the interval includes 0"``."""
        f = f"+.{int(digits)}f"
        text = (f"{format(self.mean, f)} [{format(self.lo, f)}, {format(self.hi, f)}] {self.unit} over "
                f"{self.n} seeds ({100 * self.confidence:g} % {METHODS[self.method]})")
        if self.resolved:
            return f"resolved: {text}"
        return f"cannot tell: {text}; the interval includes 0"


def _as_values(values: object, name: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a sequence of numbers (one per seed), got {values!r}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence (one value per seed), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        bad = [i for i in range(arr.size) if not np.isfinite(arr[i])]
        raise ValueError(f"{name}: every value must be finite, entries {bad} are not ({arr.tolist()})")
    return arr


def bootstrap_interval(differences: Sequence[float] | np.ndarray, confidence: float = 0.95,
                       n_boot: int = DEFAULT_N_BOOT, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: ``n_boot`` resamples of the seeds with replacement
    from ``numpy.random.default_rng(seed)``, and the (1 -+ confidence) / 2 quantiles of their means
    (numpy's linear interpolation). Deterministic for a given seed."""
    d = _as_values(differences, "differences")
    if not isinstance(n_boot, (int, np.integer)) or isinstance(n_boot, bool) or n_boot < 100:
        raise ValueError(f"n_boot must be an integer >= 100, got {n_boot!r}")
    alpha = 1.0 - _check_confidence(confidence)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(int(n_boot), d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def _check_confidence(confidence: float) -> float:
    confidence = float(confidence)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1 (e.g. 0.95), got {confidence}")
    return confidence


def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *, claim: str,
                      method: str = "t", confidence: float = 0.95, n_boot: int = DEFAULT_N_BOOT,
                      seed: int = 0, unit: str = DEFAULT_UNIT, paper: float | None = None,
                      seeds: Sequence[int] | None = None) -> PairedDifference:
    """The paired comparison ``a - b`` over seeds: ``a[i]`` and ``b[i]`` are the two runs of seed
    ``i`` (same initialisation, same data order, one knob changed).

    ``method="t"``: Student-t interval with n - 1 degrees of freedom (the default: n is small and
    the differences are close to normal). ``method="bootstrap"``: percentile bootstrap of the mean
    (:func:`bootstrap_interval`, ``n_boot`` resamples, generator seeded with ``seed``), a check on
    the normality assumption; it runs narrower than the t interval at small n.
    """
    if not isinstance(claim, str) or not claim.strip():
        raise ValueError(f"claim: expected a non-empty name, got {claim!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    confidence = _check_confidence(confidence)
    xa, xb = _as_values(a, "a"), _as_values(b, "b")
    if xa.size != xb.size:
        raise ValueError(f"a and b must pair up seed by seed: a has {xa.size} values, b has {xb.size}")
    if xa.size < 2:
        raise ValueError(f"a, b: a paired interval needs n >= 2 seeds, got {xa.size}")
    seed_ids = None
    if seeds is not None:
        seed_ids = tuple(int(s) for s in seeds)
        if len(seed_ids) != xa.size:
            raise ValueError(f"seeds: expected one seed per pair ({xa.size}), got {len(seed_ids)}")
        if len(set(seed_ids)) != len(seed_ids):
            raise ValueError(f"seeds: each seed may appear once, got {seed_ids}")
    if paper is not None and not math.isfinite(float(paper)):
        raise ValueError(f"paper: expected a finite number or None, got {paper!r}")
    d = xa - xb
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    if method == "t":
        half = t_quantile(0.5 + confidence / 2.0, d.size - 1) * sd / math.sqrt(d.size)
        lo, hi = mean - half, mean + half
    else:
        lo, hi = bootstrap_interval(d, confidence, n_boot, seed)
    return PairedDifference(
        claim=claim, a=tuple(xa.tolist()), b=tuple(xb.tolist()), differences=tuple(d.tolist()), mean=mean,
        sd=sd, lo=lo, hi=hi, method=method, confidence=confidence, unit=str(unit),
        paper=None if paper is None else float(paper), seeds=seed_ids,
    )


# --------------------------------------------------------------------------------------------
# Shares (claim 4: affinity-difference values near 1)
# --------------------------------------------------------------------------------------------


def share_near(values: object, target: float = 1.0, tol: float = 0.05) -> float:
    """The fraction (0..1) of ``values`` within ``tol`` of ``target`` (|v - target| <= tol).

    For claim 4 (§4.3, Fig. 4): the share of affinity entries S_ij near 1 with and without
    ConvNorm, one share per seed and setting, compared with :func:`paired_difference` (times 100
    and ``unit="percentage points"``, so the forest plot's axis reads in percent). A t interval
    on shares can reach past 0 or 100 when the shares sit near a bound; the bootstrap cannot.
    Pass numpy arrays or detached CPU tensors; every value must be finite.
    """
    try:
        arr = np.asarray(values, dtype=float).ravel()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"values: expected an array of numbers (detached CPU tensors are fine), "
                         f"got {type(values).__name__}: {exc}") from exc
    if arr.size == 0:
        raise ValueError("values: empty, no share to compute")
    if not np.isfinite(arr).all():
        raise ValueError(f"values: {int((~np.isfinite(arr)).sum())} of {arr.size} values are not finite")
    target, tol = float(target), float(tol)
    if not math.isfinite(target):
        raise ValueError(f"target must be finite, got {target}")
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    return float(np.mean(np.abs(arr - target) <= tol))


__all__ = [
    "METHODS", "DEFAULT_N_BOOT", "DEFAULT_UNIT", "PairedDifference", "paired_difference",
    "bootstrap_interval", "regularized_incomplete_beta", "t_sf", "t_cdf", "t_quantile", "share_near",
]
