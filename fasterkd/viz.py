"""Plots and tables the pipeline notebooks share: training curves from a run's metrics files,
results tables with the paper's numbers as labelled reference rows, per-class IoU, and the
architecture softmaxes (alpha / beta / gamma) of the search over its epochs.

Everything reads a run folder written by :func:`fasterkd.train.run_stage` (``metrics.json`` or
``metrics.csv``, ``eval.json``, ``config.json``; the search adds ``history.json``), so a notebook
only names the folders.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fasterkd import paper
from fasterkd.data.cityscapes import CLASS_NAMES, NUM_CLASSES
from fasterkd.models.arch import PRIMITIVES
from fasterkd.runs import RUNS, run_cost

PathLike = str | os.PathLike

# the choices behind each softmax of fasterkd.search.softmaxes (beta: where a cell's input comes from)
BETA_CHOICES = ("from the finer path (down)", "same resolution (keep)")
GROUP_NAMES = {"alpha": "alpha (operator)", "beta": "beta (input path)", "ratio": "gamma (width ratio)"}
PATH_NAMES = {"0": "1/8", "1": "1/16", "2": "1/32"}


def _num(v: Any) -> Any:
    """CSV cells back to numbers ('' -> None)."""
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return int(f) if isinstance(v, str) and v.lstrip("-").isdigit() else f


def read_metrics(run: PathLike) -> list[dict[str, Any]]:
    """The per-epoch rows of a run: ``metrics.json`` if present, else ``metrics.csv``."""
    run = Path(run)
    if (run / "metrics.json").is_file():
        rows = json.loads((run / "metrics.json").read_text())
        if not isinstance(rows, list):
            raise ValueError(f"{run / 'metrics.json'}: expected a list of per-epoch rows, got {type(rows).__name__}")
        return rows
    if (run / "metrics.csv").is_file():
        with open(run / "metrics.csv", newline="") as f:
            return [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(f)]
    raise FileNotFoundError(f"{run}: no metrics.json or metrics.csv (is this a fasterkd run folder?)")


def read_eval(run: PathLike) -> dict[str, Any]:
    """The final evaluation of a run (``eval.json``: miou, iou per class, pixel_acc, ...)."""
    path = Path(run) / "eval.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (the run has no final evaluation)")
    result = json.loads(path.read_text())
    if "miou" not in result:
        raise ValueError(f"{path}: expected a 'miou' entry, found {sorted(result)}")
    return result


def series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of ``key`` over the rows that have it (validation runs every few epochs)."""
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        xs.append(int(r["epoch"]))
        ys.append(float(v))
    return xs, ys


def plot_curves(runs: Mapping[str, PathLike], keys: Sequence[str] = ("loss", "val_miou"), ax_size: float = 4.0):
    """One panel per metric key, one line per run (label -> run folder). Returns the figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(ax_size * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, run in runs.items():
            xs, ys = series(read_metrics(run), key)
            if xs:
                ax.plot(xs, [100 * y for y in ys] if key.endswith("miou") else ys, marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{key} (%)" if key.endswith("miou") else key)
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 1) -> str:
    """A Markdown table of dict rows (columns: the union of keys in order, or ``columns``)."""
    if not rows:
        raise ValueError("markdown_table: no rows")
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c), digits) for c in columns) + " |")
    return "\n".join(lines)


def per_class_iou(evals: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows ``{"class", <label>: IoU %}`` for each of the 19 classes; None where a class is absent
    from the validation labels and predictions (IoU undefined)."""
    rows = []
    for c, name in enumerate(CLASS_NAMES):
        row: dict[str, Any] = {"class": name}
        for label, ev in evals.items():
            iou = ev["iou"]
            if len(iou) != NUM_CLASSES:
                raise ValueError(f"{label}: expected {NUM_CLASSES} IoUs, got {len(iou)}")
            v = iou[c]
            row[label] = None if v is None or (isinstance(v, float) and math.isnan(v)) else 100 * float(v)
        rows.append(row)
    return rows


def plot_per_class_iou(evals: Mapping[str, Mapping[str, Any]]):
    """Grouped bars of per-class IoU (%), one colour per run; absent classes left empty."""
    import matplotlib.pyplot as plt

    rows = per_class_iou(evals)
    labels = list(evals)
    fig, ax = plt.subplots(figsize=(11, 3.4))
    width = 0.8 / max(1, len(labels))
    x = np.arange(len(rows))
    for i, label in enumerate(labels):
        ys = [np.nan if r[label] is None else r[label] for r in rows]
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, ys, width, label=f"{label} (mIoU {100 * evals[label]['miou']:.1f})")
    ax.set_xticks(x, [r["class"] for r in rows], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("IoU (%)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


#: (paper key, Table 1 row name, run folder) of the runs Table 1 reproduces, from :data:`fasterkd.runs.RUNS`
TABLE1_RUNS = tuple((r.table1, paper.TABLE1[r.table1].name, r.name) for r in RUNS.values() if r.table1)


def table1(run_dir: PathLike, size: tuple[int, int] = (1024, 2048), paper_size: str = "256x512",
           runs: Sequence[tuple[str, str, str]] = TABLE1_RUNS, cost: bool = True) -> list[dict[str, Any]]:
    """Table 1 from a book run folder: per network, our measured row (params used at inference,
    GMACs at ``size``, mIoU % of ``eval.json``) followed by the paper's row labelled
    :func:`fasterkd.paper.reference_label`. ``runs``: (paper key, name, sub-folder)."""
    run_dir = Path(run_dir)
    rows = []
    for key, name, sub in runs:
        run = run_dir / sub
        ev = read_eval(run)
        row: dict[str, Any] = {"network": name, "source": f"ours ({sub})", "mIoU (%)": 100 * float(ev["miou"])}
        if cost:
            c = run_cost(run, size)
            row["params (M)"] = c["params_inference"] / 1e6
            row["GMACs"] = c["macs"] / 1e9
        rows.append(row)
        ref = paper.TABLE1[key]
        p, m = (ref.cost or "/").split("/")
        rows.append({"network": name, "source": paper.reference_label(paper_size),
                     "mIoU (%)": ref.miou.get(paper_size), "params (M)": p.rstrip("M"), "GMACs": m.rstrip("G")})
    return rows


def gain(rows: Sequence[Mapping[str, Any]], a: str, b: str, source_prefix: str = "ours") -> float:
    """mIoU(b) - mIoU(a) in points among the rows whose source starts with ``source_prefix``."""
    got = {r["network"]: r["mIoU (%)"] for r in rows if str(r["source"]).startswith(source_prefix)}
    missing = [n for n in (a, b) if n not in got]
    if missing:
        raise KeyError(f"gain: no {source_prefix!r} row for {missing}; rows have {sorted(got)}")
    return float(got[b]) - float(got[a])


# --------------------------------------------------------------------------------------------
# The search: softmaxes of the architecture parameters over epochs
# --------------------------------------------------------------------------------------------


def read_history(run: PathLike) -> list[dict[str, Any]]:
    """``history.json`` of a search run: one record per search epoch (softmax, latency, lasts, ...)."""
    path = Path(run) / "history.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (only a search run writes history.json)")
    hist = json.loads(path.read_text())
    if not hist or "softmax" not in hist[0]:
        raise ValueError(f"{path}: expected a non-empty list of records with a 'softmax' entry")
    return hist


def choice_names(key: str, n: int) -> list[str]:
    """Names of the n choices of softmax ``key`` (alpha_*: operators, beta_*: input, ratio_*: widths)."""
    group = key.split("_")[0]
    if group == "alpha" and n == len(PRIMITIVES):
        return list(PRIMITIVES)
    if group == "beta" and n == 2:
        return list(BETA_CHOICES)
    return [f"{group} choice {i}" for i in range(n)]


def mean_softmax(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], np.ndarray]:
    """(epochs, array epochs x choices): the softmax of ``key`` averaged over its layers."""
    epochs = [int(h["epoch"]) for h in history]
    probs = np.stack([np.asarray(h["softmax"][key], dtype=float).mean(axis=0) for h in history])
    return epochs, probs


def plot_arch_history(history: Sequence[Mapping[str, Any]], width_mults: Sequence[float] | None = None,
                      relative: bool = False):
    """One panel per softmax (rows alpha / beta / gamma, columns the path), lines = choices,
    each the mean over the path's layers, against the search epoch. ``relative``: plot the
    departure from uniform, p - 1/n (short searches move the softmaxes by ~1e-3)."""
    import matplotlib.pyplot as plt

    keys = list(history[0]["softmax"])
    groups = [g for g in ("alpha", "beta", "ratio") if any(k.startswith(g) for k in keys)]
    paths = sorted({k.split("_")[-1] for k in keys})
    fig, axes = plt.subplots(len(groups), len(paths), figsize=(3.6 * len(paths), 2.6 * len(groups)), squeeze=False)
    for i, g in enumerate(groups):
        for j, p in enumerate(paths):
            ax = axes[i][j]
            key = next((k for k in keys if k.startswith(g) and k.endswith("_" + p)), None)
            if key is None:
                ax.axis("off")
                continue
            epochs, probs = mean_softmax(history, key)
            names = choice_names(key, probs.shape[1])
            if g == "ratio" and width_mults is not None and len(width_mults) == probs.shape[1]:
                names = [f"width x{w:g}" for w in width_mults]
            if relative:
                probs = probs - 1.0 / probs.shape[1]
                ax.axhline(0.0, color="0.5", lw=0.8)
            else:
                ax.set_ylim(0, 1)
            for c in range(probs.shape[1]):
                ax.plot(epochs, probs[:, c], marker="o", label=names[c])
            ax.set_title(f"{GROUP_NAMES[g]}, {PATH_NAMES.get(p, p)} path", fontsize=9)
            ax.set_xlabel("search epoch")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("softmax - 1/n (layer mean)" if relative else "softmax (layer mean)")
            if j == len(paths) - 1 or (j == 0 and g == "beta"):
                ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def max_departure(history: Sequence[Mapping[str, Any]]) -> float:
    """Largest |p - 1/n| over every softmax entry of the last search epoch (0: still uniform)."""
    return max(float(np.abs(np.asarray(v, dtype=float) - 1.0 / np.asarray(v).shape[-1]).max())
               for v in history[-1]["softmax"].values())


def search_table(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per search epoch: the derived arch's branch ends, its latency, FPS, objective and mIoU."""
    names = {0: "1/8", 1: "1/16", 2: "1/32"}
    return [{"epoch": h["epoch"], "branches end at": " & ".join(names[i] for i in h["lasts"]),
             "latency (ms)": h.get("latency_ms"), "FPS": h.get("fps"), "objective": h.get("objective"),
             "val mIoU (%)": None if h.get("val_miou") is None else 100 * h["val_miou"],
             "lambda1 next": h.get("latency_weight_next")} for h in history]


__all__ = [
    "read_metrics", "read_eval", "series", "plot_curves", "markdown_table", "per_class_iou", "plot_per_class_iou",
    "TABLE1_RUNS", "table1", "gain", "read_history", "choice_names", "mean_softmax", "plot_arch_history", "max_departure",
    "search_table",
]
