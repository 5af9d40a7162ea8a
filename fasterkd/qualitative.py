"""Logic of the analysis chapters (07-10): ablation runs, the §5 head-cost sweep, Fig. 3 panels.

- :func:`upstream` finds the checkpoints the pipeline chapters (02-05) leave in a book run folder
  and the searched arch every student of the book uses.
- :func:`train_variant` trains one more run of a stage into ``run_dir/<name>`` (preset + run_stage)
  and :func:`run_summary` reads a run's own artifacts (``eval.json``, ``config.json``).
- :func:`head_cost_sweep` puts the paper's §5 formulas beside the counted prediction modules over a
  grid of C (channels into the FFM) and N (classes).
- :func:`difference_map` and :func:`figure3` draw paper Fig. 3: input, label, baseline, student,
  with the pixels where the two predictions differ marked (green: the student is right there,
  red: the baseline is, yellow: neither).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fasterkd.data.cityscapes import IGNORE_INDEX, NUM_CLASSES

#: which pipeline notebook writes each upstream run of the book run folder
UPSTREAM = {
    "teacher": "02_search",
    "search": "02_search",
    "baseline": "03_teacher_baseline",
    "tutor": "04_tutor",
    "student_c1": "05_student",
}


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def upstream(run_dir: str | os.PathLike, need: Iterable[str] = ("teacher", "baseline", "tutor")) -> dict[str, str | None]:
    """Checkpoint paths of the pipeline's runs in ``run_dir`` (``<name>/best.pt``) and ``"arch"``.

    ``"arch"`` is ``search/arch.json`` when the search ran, else ``None`` (the official student).
    A run named in ``need`` that is missing raises ``FileNotFoundError`` naming the notebook that
    trains it.
    """
    run_dir = Path(run_dir)
    out: dict[str, str | None] = {}
    for name, notebook in UPSTREAM.items():
        if name == "search":
            continue
        path = run_dir / name / "best.pt"
        if not path.is_file() and name in need:
            raise FileNotFoundError(f"checkpoint {str(path)!r} not found; run notebook {notebook} first (it trains {name})")
        out[name] = str(path) if path.is_file() else None
    arch = run_dir / "search" / "arch.json"
    out["arch"] = str(arch) if arch.is_file() else None
    return out


@dataclass
class RunSummary:
    """What a run's own artifacts say: its name, final-eval mIoU (fraction), per-class IoU, config."""

    name: str
    miou: float
    iou: list[float]
    pixel_acc: float
    config: dict[str, Any]
    path: str

    @property
    def miou_percent(self) -> float:
        return 100.0 * self.miou


def run_summary(run: str | os.PathLike) -> RunSummary:
    """Read ``<run>/eval.json`` (the final evaluation of the best checkpoint) and ``<run>/config.json``."""
    run = Path(run)
    ev_path, cfg_path = run / "eval.json", run / "config.json"
    for p in (ev_path, cfg_path):
        if not p.is_file():
            raise FileNotFoundError(f"{str(p)!r} not found: {run.name} has not finished training")
    ev = json.loads(ev_path.read_text())
    if "miou" not in ev or ev["miou"] is None:
        raise ValueError(f"{ev_path}: expected a finite 'miou' in the final evaluation")
    iou = [float("nan") if v is None else float(v) for v in ev.get("iou", [])]
    return RunSummary(run.name, float(ev["miou"]), iou, float(ev.get("pixel_acc", float("nan"))),
                      json.loads(cfg_path.read_text()), str(run))


#: chapter 7 retrains chapter 5's c = 1 student with another seed under this name (the noise yardstick)
RESEED_RUN = "student_c1_reseed"


def seed_spread(run_dir: str | os.PathLike) -> float | None:
    """|mIoU(student_c1) - mIoU(student_c1_reseed)| in points: what the seed alone moves one run
    (``None`` until chapter 7 has trained the reseeded run)."""
    run_dir = Path(run_dir)
    if not (run_dir / RESEED_RUN / "eval.json").is_file() or not (run_dir / "student_c1" / "eval.json").is_file():
        return None
    return abs(run_summary(run_dir / "student_c1").miou_percent - run_summary(run_dir / RESEED_RUN).miou_percent)


def noise_note(runs: Sequence[RunSummary], profile: str, run_dir: str | os.PathLike) -> str:
    """A sentence on how far a profile's numbers can be trusted, from the runs' configs and the measured
    seed spread (:func:`seed_spread`)."""
    cfg = runs[0].config
    epochs = sorted({r.config["epochs"] for r in runs})
    data = cfg["data"]["root"] or f"{cfg['data']['synthetic_train']} synthetic training scenes"
    spread = seed_spread(run_dir)
    noise = ("the seed's effect on one run was not measured in this run folder" if spread is None else
             f"retraining chapter 5's c = 1 student with only the seed changed moved its mIoU by {spread:.1f} points "
             "(chapter 7), so differences of that size are noise")
    return (f"These runs trained {'/'.join(map(str, epochs))} epoch(s) on {data} (`{profile}` profile); {noise}. "
            "A single seed per row cannot separate smaller effects; only the `paper` profile (Cityscapes, hundreds "
            "of epochs) can confirm or contradict the paper's rows.")


def train_variant(stage: str, profile: str, run_dir: str | os.PathLike, name: str, data_root: str = "",
                  device: str = "auto", **overrides: Any) -> RunSummary:
    """Train ``stage`` under ``profile`` into ``run_dir/name`` and return its :class:`RunSummary`.

    ``overrides`` are :func:`fasterkd.train.preset` keywords (teacher, tutor, init, arch, fa_weight, ...).
    """
    from fasterkd.train import preset, run_stage

    cfg = preset(stage, profile, data_root=data_root, out_dir=str(Path(run_dir) / name), device=device,
                 progress=False, **overrides)
    run_stage(cfg)
    return run_summary(Path(run_dir) / name)


def checkpoint_cost(checkpoint: str | os.PathLike, size: tuple[int, int] | str = (1024, 2048)) -> dict[str, int]:
    """:func:`fasterkd.cost.model_cost` of the network a checkpoint holds, rebuilt from its config on the
    meta device (shapes only: nothing allocated, so 1024x2048 costs milliseconds)."""
    from fasterkd.cost import model_cost
    from fasterkd.train import TrainConfig, _read_checkpoint, build_network

    ckpt = _read_checkpoint(checkpoint, "cpu")
    cfg = TrainConfig.from_dict(ckpt["config"])
    with torch.device("meta"):
        model = build_network(cfg, ckpt["identity"].get("arch"))
    return model_cost(model, size)


def train_like(source: str | os.PathLike, name: str, data_root: str = "", device: str = "auto",
               **overrides: Any) -> RunSummary:
    """Retrain the run ``source`` (a run folder with ``config.json``) with ``overrides`` into
    ``<source's parent>/name`` and return its :class:`RunSummary`.

    An ablation must differ from the run it is compared with in the changed knob only: starting
    from that run's saved config (not from today's preset) keeps epochs, learning rate, crops and
    seed identical even when the presets are retuned between the two runs.
    """
    from fasterkd.train import TrainConfig, apply_overrides, run_stage

    source = Path(source)
    cfg_path = source / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{str(cfg_path)!r} not found: {source.name} has not been trained")
    cfg = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
    cfg.out_dir, cfg.device, cfg.progress = str(source.parent / name), device, False
    if data_root:
        cfg.data.root = str(data_root)
    apply_overrides(cfg, overrides)
    run_stage(cfg)
    return run_summary(source.parent / name)


# --------------------------------------------------------------------------------------------
# §5: the prediction modules' cost, formula vs counted
# --------------------------------------------------------------------------------------------


def head_cost(head: str, C: int, N: int, H: int, W: int) -> dict[str, int]:
    """Counted cost of one prediction module (meta device) for a C x H x W input, output 8H x 8W.

    ``conv_params``: convolution weights only (the quantity §5 counts); ``params_inference``:
    every parameter an eval forward uses (adds the classifier bias and the BatchNorms);
    ``macs``: :func:`fasterkd.cost.count_macs`.
    """
    from fasterkd.cost import count_macs, inference_parameters
    from fasterkd.models.heads import make_predictor

    with torch.device("meta"):
        module = make_predictor(head, C, N)
    wrapped = _HeadOnly(module, C, (8 * H, 8 * W))
    conv = sum(m.weight.numel() for m in _ran_convs(wrapped, (H, W)))
    return {"conv_params": int(conv), "params_inference": inference_parameters(wrapped, (H, W)),
            "macs": count_macs(wrapped, (H, W))}


class _HeadOnly(nn.Module):
    """Feeds a (1, C, H, W) tensor to a prediction module: cost.* build a 3-channel dummy input."""

    def __init__(self, module: nn.Module, channels: int, out_size: tuple[int, int]) -> None:
        super().__init__()
        self.module, self.channels, self.out_size = module, channels, out_size

    def forward(self, x: Tensor) -> Tensor:
        z = x.new_zeros(x.shape[0], self.channels, *x.shape[-2:])
        return self.module(z, self.out_size)[0]


def _ran_convs(model: nn.Module, size: tuple[int, int]) -> list[nn.Conv2d]:
    ran: list[nn.Conv2d] = []
    hooks = [m.register_forward_hook(lambda m, i, o: ran.append(m)) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, *size, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return ran


def head_cost_sweep(channels: Sequence[int], classes: Sequence[int], H: int = 128, W: int = 256) -> list[dict[str, Any]]:
    """One row per (head, C, N): the §5 formula (params, MACs) and the counted module.

    The student's FFM sees C = 128 channels at H x W = 128 x 256 for a 1024x2048 input.
    """
    from fasterkd.paper import bilinear_head_formula, pixel_shuffle_head_formula

    formulas = {"bilinear": bilinear_head_formula, "pixel_shuffle": pixel_shuffle_head_formula}
    rows = []
    for C in channels:
        for N in classes:
            for head, formula in formulas.items():
                fp, fm = formula(C, N, H, W)
                counted = head_cost(head, C, N, H, W)
                rows.append({"head": head, "C": int(C), "N": int(N), "params_formula": fp, "macs_formula": fm,
                             **counted})
    return rows


# --------------------------------------------------------------------------------------------
# Fig. 3: predictions and where they differ
# --------------------------------------------------------------------------------------------

#: RGB of the difference classes of :func:`difference_map`
DIFF_COLOURS = {1: (0, 200, 0), 2: (230, 0, 0), 3: (255, 210, 0)}
DIFF_NAMES = {1: "only the student is right", 2: "only the baseline is right", 3: "differ, both wrong"}


def difference_map(baseline: Tensor | np.ndarray, student: Tensor | np.ndarray,
                   label: Tensor | np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Per pixel: 0 same prediction (or ignored label), 1 only the student right, 2 only the baseline
    right, 3 the predictions differ and both are wrong. All inputs are (H, W) train-id maps."""
    b, s, y = (np.asarray(t.detach().cpu() if isinstance(t, Tensor) else t) for t in (baseline, student, label))
    if not (b.shape == s.shape == y.shape) or b.ndim != 2:
        raise ValueError(f"baseline, student and label must be (H, W) maps of one size, got {b.shape}, {s.shape}, {y.shape}")
    valid = y != ignore_index
    differ = (b != s) & valid
    out = np.zeros(y.shape, dtype=np.uint8)
    out[differ & (s == y)] = 1
    out[differ & (b == y)] = 2
    out[differ & (s != y) & (b != y)] = 3
    return out


def difference_counts(diff: np.ndarray) -> dict[str, int]:
    """Pixels of each difference class of :func:`difference_map` (keys from :data:`DIFF_NAMES`)."""
    return {DIFF_NAMES[k]: int((diff == k).sum()) for k in DIFF_NAMES}


def pixel_accuracy(pred: Tensor | np.ndarray, label: Tensor | np.ndarray, ignore_index: int = IGNORE_INDEX) -> float:
    """Share of labelled pixels predicted right (NaN when no pixel is labelled)."""
    p, y = (np.asarray(t.detach().cpu() if isinstance(t, Tensor) else t) for t in (pred, label))
    valid = y != ignore_index
    return float((p[valid] == y[valid]).mean()) if valid.any() else float("nan")


def predict(model: nn.Module, images: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """Train-id predictions (B, H, W) of ``model`` for normalised ``images``, at ``size`` (default: the images')."""
    import torch.nn.functional as F

    from fasterkd.evaluate import predict_logits

    model.eval()
    with torch.no_grad():
        logits = predict_logits(model, images)
        size = size or tuple(images.shape[-2:])
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits.argmax(1).cpu()


def validation_batch(checkpoint: str | os.PathLike, count: int, data_root: str = "") -> tuple[Tensor, Tensor, list[str]]:
    """The first ``count`` validation images (normalised), labels and names of the data a checkpoint trained on."""
    from fasterkd.train import validation_items

    items = validation_items(checkpoint, count, data_root)
    return (torch.stack([it["image"] for it in items]), torch.stack([it["label"] for it in items]),
            [str(it["name"]) for it in items])


def _outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a boolean mask (4-neighbourhood), for marking regions on a panel."""
    m = mask.astype(bool)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def mark_differences(rgb: np.ndarray, diff: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """``rgb`` (H, W, 3 uint8) with the difference classes tinted and outlined in their colours."""
    out = rgb.astype(np.float32).copy()
    for k, colour in DIFF_COLOURS.items():
        m = diff == k
        out[m] = (1 - alpha) * out[m] + alpha * np.array(colour, np.float32)
        out[_outline(m)] = colour
    return out.clip(0, 255).astype(np.uint8)


def figure3(images: Tensor, labels: Tensor, baseline: Tensor, student: Tensor,
            names: Sequence[str] | None = None, titles: tuple[str, str] = ("baseline", "student")):
    """Paper Fig. 3: per row input, label, baseline, student, and the student with the pixels where
    the two predictions differ marked (:data:`DIFF_COLOURS`). Returns the matplotlib figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from fasterkd.data.cityscapes import colorize
    from fasterkd.data.transforms import denormalize

    n = images.shape[0]
    if not (labels.shape[0] == baseline.shape[0] == student.shape[0] == n):
        raise ValueError("images, labels and both predictions must hold the same number of images")
    h, w = images.shape[-2:]
    # 3 inches per panel across; each row as tall as its panels plus a title line, then the legend
    fig, axes = plt.subplots(n, 5, figsize=(15, n * (3.0 * h / w + 0.45) + 0.7), squeeze=False)
    cols = ["input", "label", titles[0], titles[1], f"{titles[1]}: differences marked"]
    for i in range(n):
        rgb = (denormalize(images[i]).clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
        diff = difference_map(baseline[i], student[i], labels[i])
        panels = [rgb, colorize(labels[i]), colorize(baseline[i]), colorize(student[i]),
                  mark_differences(colorize(student[i]), diff)]
        for j, (ax, panel) in enumerate(zip(axes[i], panels)):
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=10)
        if names:
            axes[i][0].set_ylabel(Path(names[i]).name, fontsize=8)
    handles = [Patch(color=np.array(c) / 255, label=DIFF_NAMES[k]) for k, c in DIFF_COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1))
    return fig


def percent(x: float) -> str:
    """A fraction as a percentage with one decimal ("n/a" for NaN)."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


__all__ = [
    "UPSTREAM", "upstream", "RunSummary", "run_summary", "RESEED_RUN", "seed_spread", "noise_note",
    "train_variant", "train_like", "checkpoint_cost", "head_cost", "head_cost_sweep",
    "DIFF_COLOURS", "DIFF_NAMES", "difference_map", "difference_counts", "pixel_accuracy", "predict",
    "validation_batch", "mark_differences", "figure3", "percent",
]
