"""The embedded study's claims: per-class group gains (claim 5), the paper's differences, a tidy
summary table and the forest plot of every claim beside the paper's number.

The statistics themselves (paired differences over seeds, t and bootstrap intervals, shares)
are in :mod:`fasterkd.stats`; this module turns them into what a chapter shows. A chapter calls a
claim "resolved" only when :attr:`fasterkd.stats.PairedDifference.resolved` is true (its interval
excludes zero) and otherwise says the study cannot tell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from fasterkd import paper as paper_numbers
from fasterkd.data.cityscapes import CLASS_NAMES, NUM_CLASSES
from fasterkd.stats import DEFAULT_N_BOOT, METHODS, PairedDifference, paired_difference

# claim 5: where a 1/4-resolution path should help (thin and small) against where it should not
SMALL_CLASSES: tuple[str, ...] = ("pole", "traffic light", "traffic sign", "person", "rider", "bicycle")
LARGE_CLASSES: tuple[str, ...] = ("road", "building", "sky")
IOU_UNIT = "IoU points"


# --------------------------------------------------------------------------------------------
# The paper's differences (same sign convention as ours: the claimed better run minus its control)
# --------------------------------------------------------------------------------------------


def paper_differences(size: str = "256x512") -> dict[str, float]:
    """The paper's mIoU differences (points, Cityscapes val) for the claims it gives a number for,
    computed from :mod:`fasterkd.paper` at training size ``size``:

    - ``"tutor - baseline"``: Table 1;
    - ``"FA c=1 - c=0"``: Table 2 (256x512 only);
    - ``"from baseline - from scratch"``: Table 2, the c = 1 student minus the one trained from
      scratch (the paper's table does not state the scratch row's c; we read it as c = 1);
    - ``"pixel shuffle - bilinear"``: Table 3.

    Claims 4 (ConvNorm, Fig. 4) and 5 (per class) have no published number.
    """
    if size not in paper_numbers.INPUT_SIZES:
        raise ValueError(f"size must be one of {paper_numbers.INPUT_SIZES}, got {size!r}")
    t1, t2, t3 = paper_numbers.TABLE1, paper_numbers.TABLE2, paper_numbers.TABLE3

    def diff(x, y) -> float | None:
        if size in x.miou and size in y.miou:
            return round(x.miou[size] - y.miou[size], 6)  # the tables print one decimal
        return None

    out = {
        "tutor - baseline": diff(t1["tutor"], t1["baseline"]),
        "FA c=1 - c=0": diff(t2["c1"], t2["c0"]),
        "from baseline - from scratch": diff(t2["c1"], t2["scratch"]),
        "pixel shuffle - bilinear": diff(t3["pixel_shuffle"], t3["bilinear"]),
    }
    return {k: v for k, v in out.items() if v is not None}


# --------------------------------------------------------------------------------------------
# Claim 5: per-class gains of two groups of classes
# --------------------------------------------------------------------------------------------


def class_indices(names: Sequence[str], class_names: Sequence[str] = CLASS_NAMES) -> tuple[int, ...]:
    """Train ids of the class ``names`` (e.g. ``("pole", "sky")`` -> ``(5, 10)``)."""
    if isinstance(names, str):
        raise ValueError(f"names: expected a sequence of class names, got the single string {names!r}")
    out = []
    for name in names:
        if name not in class_names:
            raise ValueError(f"unknown class {name!r}; the classes are {list(class_names)}")
        out.append(list(class_names).index(name))
    if len(set(out)) != len(out):
        raise ValueError(f"names: each class may appear once, got {list(names)}")
    return tuple(out)


def iou_matrix(evals: Sequence[Mapping[str, Any]], scale: float = 100.0) -> np.ndarray:
    """Per-class IoU of several runs (one per seed) as a ``seeds x 19`` array, times ``scale`` (IoU
    points by default), NaN where a class is undefined. Each item is an ``eval.json`` mapping
    (:func:`fasterkd.viz.read_eval`) with an ``"iou"`` list of 19 fractions (NaN or None if absent)."""
    if len(evals) == 0:
        raise ValueError("evals: no runs given")
    rows = []
    for i, ev in enumerate(evals):
        if "iou" not in ev:
            raise ValueError(f"evals[{i}]: no 'iou' entry (expected an eval.json mapping)")
        iou = [math.nan if v is None else float(v) for v in ev["iou"]]
        if len(iou) != NUM_CLASSES:
            raise ValueError(f"evals[{i}]: expected {NUM_CLASSES} IoUs, got {len(iou)}")
        rows.append(iou)
    return float(scale) * np.asarray(rows, dtype=float)


def _check_iou(values: object, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 2 or arr.shape[1] != NUM_CLASSES:
        raise ValueError(f"{name}: expected a seeds x {NUM_CLASSES} array of per-class IoU, got shape {arr.shape}")
    if np.isinf(arr).any():
        raise ValueError(f"{name}: infinite IoU values (use NaN for classes that are absent)")
    return arr


@dataclass(frozen=True)
class ClassGroupGains:
    """Claim 5: the per-seed gain ``a - b`` averaged over the thin/small classes, over the large
    ones, and their contrast (small-class gain minus large-class gain, paired by seed).

    ``small_classes`` / ``large_classes`` are the classes actually averaged: those with a defined
    IoU in every seed of both runs; ``excluded`` lists the group classes that were not."""

    small: PairedDifference
    large: PairedDifference
    contrast: PairedDifference
    small_classes: tuple[str, ...]
    large_classes: tuple[str, ...]
    excluded: tuple[str, ...]

    @property
    def results(self) -> tuple[PairedDifference, PairedDifference, PairedDifference]:
        """The three comparisons, in the order a forest plot shows them."""
        return self.small, self.large, self.contrast


def class_group_gains(iou_a: object, iou_b: object, *, claim: str = "FA gain",
                      small: Sequence[str] = SMALL_CLASSES, large: Sequence[str] = LARGE_CLASSES,
                      method: str = "t", confidence: float = 0.95, n_boot: int = DEFAULT_N_BOOT,
                      seed: int = 0, unit: str = IOU_UNIT, seeds: Sequence[int] | None = None,
                      class_names: Sequence[str] = CLASS_NAMES) -> ClassGroupGains:
    """Where a gain falls, class by class: ``iou_a`` and ``iou_b`` are ``seeds x 19`` per-class IoU
    of two runs paired by seed (row i of both from seed i; :func:`iou_matrix` builds them), NaN
    for a class that is absent.

    For each seed the group gain is the mean over the group's classes of ``IoU_a - IoU_b``; a
    class enters only if its IoU is defined in every seed of both runs, so each group averages
    the same classes in every seed (the left-out ones are in ``excluded``). The contrast's
    interval answers "does the gain fall more on thin and small classes than on large ones?".
    """
    a, b = _check_iou(iou_a, "iou_a"), _check_iou(iou_b, "iou_b")
    if a.shape != b.shape:
        raise ValueError(f"iou_a and iou_b must pair up seed by seed: shapes {a.shape} and {b.shape}")
    small_ids, large_ids = class_indices(small, class_names), class_indices(large, class_names)
    if set(small_ids) & set(large_ids):
        raise ValueError(f"small and large share classes: {sorted(set(small) & set(large))}")
    defined = np.isfinite(a).all(axis=0) & np.isfinite(b).all(axis=0)

    def kept(ids: tuple[int, ...], group: str) -> list[int]:
        keep = [c for c in ids if defined[c]]
        if not keep:
            raise ValueError(f"{group} classes {[class_names[c] for c in ids]}: none has an IoU in every seed "
                             f"of both runs, so the group gain is undefined")
        return keep

    keep_small, keep_large = kept(small_ids, "small"), kept(large_ids, "large")
    common = dict(method=method, confidence=confidence, n_boot=n_boot, seed=seed, unit=unit, seeds=seeds)
    gain_small = paired_difference(a[:, keep_small].mean(axis=1), b[:, keep_small].mean(axis=1),
                                   claim=f"{claim}: thin and small classes", **common)
    gain_large = paired_difference(a[:, keep_large].mean(axis=1), b[:, keep_large].mean(axis=1),
                                   claim=f"{claim}: large classes", **common)
    contrast = paired_difference(gain_small.differences, gain_large.differences,
                                 claim=f"{claim}: thin and small minus large", **common)
    return ClassGroupGains(
        small=gain_small, large=gain_large, contrast=contrast,
        small_classes=tuple(class_names[c] for c in keep_small),
        large_classes=tuple(class_names[c] for c in keep_large),
        excluded=tuple(class_names[c] for c in small_ids + large_ids if not defined[c]),
    )


# --------------------------------------------------------------------------------------------
# Table and forest plot
# --------------------------------------------------------------------------------------------


def _checked(results: Sequence[PairedDifference],
             paper: Mapping[str, float] | None) -> tuple[list[PairedDifference], dict[str, float | None]]:
    """The results as a list and each claim's paper number (``paper`` overrides the results' own;
    each of its keys must name a claim, so that a misspelt one cannot silently drop a marker)."""
    results = list(results)
    if not results:
        raise ValueError("results: no claims given")
    for i, r in enumerate(results):
        if not isinstance(r, PairedDifference):
            raise ValueError(f"results[{i}]: expected a fasterkd.stats.PairedDifference, got {type(r).__name__}")
    names = [r.claim for r in results]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"results: each claim name may appear once, repeated: {dup}")
    numbers: dict[str, float | None] = {r.claim: r.paper for r in results}
    for claim, value in (paper or {}).items():
        if claim not in numbers:
            raise ValueError(f"paper: no result for claim {claim!r}; the claims are {names}")
        if value is not None and not math.isfinite(float(value)):
            raise ValueError(f"paper[{claim!r}]: expected a finite number or None, got {value!r}")
        numbers[claim] = None if value is None else float(value)
    return results, numbers


def summary_table(results: Sequence[PairedDifference],
                  paper: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per claim: claim, unit, n, mean, lo, hi, method, "confidence (%)", resolved, paper
    (None where the paper gives no number) and the verdict line. Plain dicts, so a notebook can
    show them with :func:`fasterkd.viz.markdown_table` without pandas. ``paper`` as in
    :func:`forest_plot`."""
    results, numbers = _checked(results, paper)
    return [
        {"claim": r.claim, "unit": r.unit, "n": r.n, "mean": r.mean, "lo": r.lo, "hi": r.hi, "method": r.method,
         "confidence (%)": 100 * r.confidence, "resolved": r.resolved, "paper": numbers[r.claim], "verdict": r.verdict()}
        for r in results
    ]


def _interval_label(results: Sequence[PairedDifference]) -> str:
    kinds = {(r.confidence, r.method) for r in results}
    if len(kinds) == 1:
        conf, method = kinds.pop()
        return f"ours: mean and {100 * conf:g} % interval ({METHODS[method]})"
    return "ours: mean and interval"


def forest_plot(results: Sequence[PairedDifference], paper: Mapping[str, float] | None = None, ax=None,
                *, digits: int = 1, title: str | None = None):
    """A forest plot: one row per claim (top to bottom in the given order), the mean paired
    difference as a dot (filled when resolved, open when the interval includes 0) on its interval,
    a vertical line at zero, and a red diamond labelled "paper" at the paper's number where it
    gives one (from ``paper`` if it names the claim, else the result's own ``paper``). Each row's
    numbers are written at its right.

    Claims in different units get one panel per unit (in order of first appearance), each with
    its axis labelled "paired difference (<unit>)"; ``ax`` may be given only when all claims share
    one unit. Returns the Figure. Artists carry gids ("interval", "mean", "paper", "zero",
    "row_text") so they can be found again.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    results, numbers = _checked(results, paper)
    units: list[str] = []
    for r in results:
        if r.unit not in units:
            units.append(r.unit)
    panels = [[r for r in results if r.unit == u] for u in units]
    if ax is not None:
        if len(units) > 1:
            raise ValueError(f"ax: one axes can show one unit, but the claims have {len(units)} units {units}; "
                             f"pass ax=None for one panel per unit")
        fig, axes = ax.figure, [ax]
    else:
        fig, grid = plt.subplots(len(units), 1, squeeze=False, layout="constrained",
                                 figsize=(9.0, 1.2 + 1.1 * len(units) + 0.45 * len(results)),
                                 gridspec_kw={"height_ratios": [len(p) for p in panels]})
        axes = list(grid[:, 0])
    fmt = f"+.{int(digits)}f"
    for axis, unit, rows in zip(axes, units, panels):
        ys = np.arange(len(rows))[::-1]  # the first claim on top
        for y, r in zip(ys, rows):
            axis.plot([r.lo, r.hi], [y, y], color="tab:blue", lw=2.2, solid_capstyle="butt", gid="interval")
            axis.plot([r.mean], [y], "o", color="tab:blue", ms=7, gid="mean",
                      markerfacecolor="tab:blue" if r.resolved else "white")
            text = f"{format(r.mean, fmt)} [{format(r.lo, fmt)}, {format(r.hi, fmt)}], n={r.n}"
            p = numbers[r.claim]
            if p is not None:
                axis.plot([p], [y], "D", color="tab:red", ms=6, gid="paper")
                text += f"; paper {format(p, fmt)}"
            axis.annotate(text, xy=(1.02, y), xycoords=("axes fraction", "data"), va="center", ha="left",
                          fontsize=8, gid="row_text")
        axis.axvline(0.0, color="0.3", lw=1, ls="--", gid="zero")
        xs = [0.0] + [v for r in rows for v in (r.lo, r.hi)]
        xs += [numbers[r.claim] for r in rows if numbers[r.claim] is not None]
        span = max(xs) - min(xs) or 1.0
        axis.set_xlim(min(xs) - 0.08 * span, max(xs) + 0.08 * span)
        axis.set_ylim(-0.6, len(rows) - 0.4)
        axis.set_yticks(ys, [r.claim for r in rows])
        axis.set_xlabel(f"paired difference ({unit})")
        axis.grid(axis="x", alpha=0.3)
    label = _interval_label(results)
    handles = []
    if any(r.resolved for r in results):
        handles.append(Line2D([], [], color="tab:blue", marker="o", lw=2.2, label=f"{label}, resolved"))
    if not all(r.resolved for r in results):
        handles.append(Line2D([], [], color="tab:blue", marker="o", markerfacecolor="white", lw=2.2,
                              label=f"{label}, cannot tell (includes 0)"))
    if any(v is not None for v in numbers.values()):
        handles.append(Line2D([], [], color="tab:red", marker="D", ls="none", label="paper"))
    # the title heads the legend, above the rows (a suptitle would collide with a figure legend)
    style = dict(handles=handles, fontsize=8, frameon=False, title=title, alignment="left")
    if ax is not None:
        ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), **style)
    else:
        fig.legend(loc="outside upper left", **style)  # one legend above all panels
    return fig


__all__ = [
    "SMALL_CLASSES", "LARGE_CLASSES", "IOU_UNIT", "paper_differences", "class_indices", "iou_matrix",
    "ClassGroupGains", "class_group_gains", "summary_table", "forest_plot",
]
