"""fasterkd.stats: the Student-t quantile, paired differences with t and bootstrap intervals, shares."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from fasterkd.stats import (
    bootstrap_interval,
    paired_difference,
    regularized_incomplete_beta,
    share_near,
    t_cdf,
    t_quantile,
    t_sf,
)

# t_{0.975, dof}, from published tables (R: qt(0.975, dof))
KNOWN_T975 = {1: 12.7062047, 2: 4.30265273, 4: 2.77644511, 9: 2.26215716, 29: 2.04522964}


@pytest.mark.parametrize("dof,expected", sorted(KNOWN_T975.items()))
def test_t_quantile_matches_tables(dof, expected):
    assert t_quantile(0.975, dof) == pytest.approx(expected, abs=5e-8)


def test_t_quantile_large_dof_approaches_normal():
    assert t_quantile(0.975, 1000) == pytest.approx(1.962339, abs=1e-6)
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-6)  # z_{0.975}


@pytest.mark.parametrize("p", [0.55, 0.75, 0.9, 0.95, 0.99, 0.999])
def test_t_quantile_closed_forms_for_one_and_two_dof(p):
    # dof 1 is Cauchy: tan(pi (p - 1/2)); dof 2: (2p - 1) / sqrt(2 p (1 - p))
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)


@pytest.mark.parametrize("dof", [1, 2.5, 3, 7, 40])
def test_t_quantile_inverts_cdf_and_is_symmetric(dof):
    for p in (0.6, 0.8, 0.975, 0.995):
        q = t_quantile(p, dof)
        assert t_cdf(q, dof) == pytest.approx(p, abs=1e-12)
        assert t_quantile(1 - p, dof) == pytest.approx(-q, rel=1e-12)
    assert t_quantile(0.5, dof) == 0.0
    assert t_cdf(0.0, dof) == pytest.approx(0.5, abs=1e-15)


def test_t_cdf_dof_one_is_cauchy_and_tails_add_up():
    for t in (-30.0, -2.0, -0.3, 0.7, 5.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)
        assert t_cdf(t, 6) + t_sf(t, 6) == pytest.approx(1.0, abs=1e-15)
    assert t_sf(math.inf, 3) == 0.0 and t_sf(-math.inf, 3) == 1.0


def test_regularized_incomplete_beta_special_cases():
    for x in (0.01, 0.3, 0.5, 0.77, 0.99):
        assert regularized_incomplete_beta(x, 1, 1) == pytest.approx(x, rel=1e-13)
        assert regularized_incomplete_beta(x, 3.5, 1) == pytest.approx(x ** 3.5, rel=1e-12)
        assert regularized_incomplete_beta(x, 1, 4) == pytest.approx(1 - (1 - x) ** 4, rel=1e-12)
    assert regularized_incomplete_beta(0.5, 7.25, 7.25) == pytest.approx(0.5, abs=1e-14)
    assert regularized_incomplete_beta(0.0, 2, 3) == 0.0 and regularized_incomplete_beta(1.0, 2, 3) == 1.0


@pytest.mark.parametrize("call,match", [
    (lambda: t_quantile(1.0, 3), "p must lie strictly between 0 and 1"),
    (lambda: t_quantile(0.9, 0), "dof must be a finite number > 0"),
    (lambda: t_quantile(0.9, math.inf), "dof must be a finite number > 0"),
    (lambda: regularized_incomplete_beta(1.2, 1, 1), "x must lie in"),
    (lambda: regularized_incomplete_beta(0.2, -1, 1), "a and b must be"),
])
def test_distribution_functions_reject_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------------------------
# paired_difference: hand-computed cases
# --------------------------------------------------------------------------------------------


def test_hand_computed_unresolved_case():
    # d = [1, 2, 3]: mean 2, sd 1, se 1/sqrt(3) = 0.577350; t_{0.975,2} = 4.302653 -> 2 +- 2.484138
    r = paired_difference([10.0, 12.0, 11.0], [9.0, 10.0, 8.0], claim="FA c=1 - c=0", seeds=[0, 1, 2])
    assert r.differences == (1.0, 2.0, 3.0)
    assert r.a == (10.0, 12.0, 11.0) and r.b == (9.0, 10.0, 8.0) and r.seeds == (0, 1, 2)
    assert (r.n, r.mean, r.sd) == (3, 2.0, 1.0)
    assert r.lo == pytest.approx(-0.48414, abs=1e-5) and r.hi == pytest.approx(4.48414, abs=1e-5)
    assert r.half_width == pytest.approx(4.30265273 / math.sqrt(3), abs=1e-7)
    assert not r.resolved
    assert r.verdict() == ("cannot tell: +2.0 [-0.5, +4.5] mIoU points over 3 seeds "
                           "(95 % Student-t interval); the interval includes 0")


def test_hand_computed_resolved_case_and_digits():
    # d = [1.5, 2, 2.5]: sd 0.5, half width 4.302653 * 0.5 / sqrt(3) = 1.242068
    r = paired_difference([1.5, 2.0, 2.5], [0.0, 0.0, 0.0], claim="tutor - baseline")
    assert r.lo == pytest.approx(0.757932, abs=1e-6) and r.hi == pytest.approx(3.242068, abs=1e-6)
    assert r.resolved
    assert r.verdict() == "resolved: +2.0 [+0.8, +3.2] mIoU points over 3 seeds (95 % Student-t interval)"
    assert r.verdict(digits=2).startswith("resolved: +2.00 [+0.76, +3.24]")


def test_resolved_below_zero_and_other_confidence():
    r = paired_difference([0.0, 0.0, 0.0], [1.5, 2.0, 2.5], claim="pixel shuffle - bilinear", unit="IoU points")
    assert r.resolved and r.hi == pytest.approx(-0.757932, abs=1e-6)
    assert r.verdict().startswith("resolved: -2.0 [-3.2, -0.8] IoU points")
    # 90 %: t_{0.95,2} = 2.91998558
    r90 = paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], claim="c", confidence=0.90)
    assert r90.half_width == pytest.approx(2.91998558 / math.sqrt(3), abs=1e-7)
    assert "(90 % Student-t interval)" in r90.verdict()


def test_zero_spread_collapses_the_interval_and_an_end_at_zero_is_not_resolved():
    # constant differences: sd 0, so the t interval is the single point mean
    flat = paired_difference([1.0, 1.0, 1.0], [0.0, 0.0, 0.0], claim="flat")
    assert flat.lo == flat.hi == 1.0 and flat.resolved
    zero = paired_difference([1.0, 1.0], [1.0, 1.0], claim="zero")
    assert zero.lo == zero.hi == 0.0 and not zero.resolved


def test_result_is_frozen():
    r = paired_difference([1.0, 2.0], [0.0, 0.0], claim="c")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.mean = 0.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(a=[1, 2, 3], b=[1, 2]), "a has 3 values, b has 2"),
    (dict(a=[1], b=[0]), "n >= 2"),
    (dict(a=[1, 2], b=[0, float("nan")]), r"^b: every value must be finite, entries \[1\]"),
    (dict(a=[1, math.inf], b=[0, 0]), r"^a: every value must be finite"),
    (dict(a=[[1, 2]], b=[[0, 0]]), r"^a: expected a 1-D sequence"),
    (dict(a=["x", "y"], b=[0, 0]), r"^a: expected a sequence of numbers"),
    (dict(a=[1, 2], b=[0, 0], method="z"), "method must be one of"),
    (dict(a=[1, 2], b=[0, 0], confidence=95), "confidence must lie strictly between 0 and 1"),
    (dict(a=[1, 2], b=[0, 0], claim=""), "claim: expected a non-empty name"),
    (dict(a=[1, 2], b=[0, 0], seeds=[0]), "seeds: expected one seed per pair"),
    (dict(a=[1, 2], b=[0, 0], seeds=[3, 3]), "seeds: each seed may appear once"),
    (dict(a=[1, 2], b=[0, 0], paper=math.nan), "paper: expected a finite number"),
    (dict(a=[1, 2], b=[0, 0], method="bootstrap", n_boot=10), "n_boot must be an integer >= 100"),
])
def test_paired_difference_rejects_bad_input_naming_the_parameter(kwargs, match):
    kwargs.setdefault("claim", "c")
    with pytest.raises(ValueError, match=match):
        paired_difference(**kwargs)


# --------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------


def test_bootstrap_is_deterministic_and_brackets_the_mean():
    a = [3.1, 2.2, 4.5, 1.0, 2.9, 3.3, 0.7, 2.6]
    b = [1.0, 1.5, 1.5, 0.5, 1.0, 1.1, 0.9, 0.4]
    r1 = paired_difference(a, b, claim="c", method="bootstrap", seed=7, n_boot=500)
    r2 = paired_difference(a, b, claim="c", method="bootstrap", seed=7, n_boot=500)
    r3 = paired_difference(a, b, claim="c", method="bootstrap", seed=8, n_boot=500)
    assert (r1.lo, r1.hi) == (r2.lo, r2.hi)
    assert (r1.lo, r1.hi) != (r3.lo, r3.hi)  # the seed drives the resampling
    d = np.subtract(a, b)
    for r in (r1, r3):
        assert min(d) <= r.lo < r.mean < r.hi <= max(d)
        assert r.mean == pytest.approx(d.mean()) and r.method == "bootstrap"
    assert "percentile bootstrap" in r1.verdict()


def test_bootstrap_matches_the_exact_bootstrap_distribution():
    # n = 4: all 4^4 resamples are equally likely, so their means are the exact bootstrap distribution
    d = np.array([0.5, 1.0, 2.5, 4.0])
    exact = np.array([d[list(idx)].mean() for idx in itertools.product(range(4), repeat=4)])
    lo_exact, hi_exact = np.quantile(exact, [0.025, 0.975])
    lo, hi = bootstrap_interval(d, 0.95, n_boot=40_000, seed=0)
    assert lo == pytest.approx(lo_exact, abs=0.08) and hi == pytest.approx(hi_exact, abs=0.08)


def test_bootstrap_runs_narrower_than_t_at_three_seeds():
    # the documented reason the t interval is the default: d = [1, 2, 3] bootstraps to [1, 3] at most
    t = paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], claim="c")
    boot = paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], claim="c", method="bootstrap")
    assert t.lo < 1.0 <= boot.lo and boot.hi <= 3.0 < t.hi


# --------------------------------------------------------------------------------------------
# share_near
# --------------------------------------------------------------------------------------------


def test_share_near_counts_values_within_tolerance():
    assert share_near([0.97, 1.0, 1.04, 1.06, 0.5], target=1.0, tol=0.05) == pytest.approx(3 / 5)
    # the boundary counts (|v - target| <= tol), checked on numbers exact in binary
    assert share_near([0.5, -0.5, 0.75, 0.0], target=0.0, tol=0.5) == pytest.approx(3 / 4)
    assert share_near(torch.tensor([[1.0, 2.0], [1.01, 0.99]]), tol=0.02) == pytest.approx(3 / 4)
    assert share_near(np.ones(10), tol=0.0) == 1.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(values=[]), "values: empty"),
    (dict(values=[1.0, math.nan]), "1 of 2 values are not finite"),
    (dict(values=[1.0], tol=-0.1), "tol must be a finite number >= 0"),
    (dict(values=[1.0], target=math.inf), "target must be finite"),
    (dict(values=object()), "values: expected an array of numbers"),
])
def test_share_near_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        share_near(**kwargs)
