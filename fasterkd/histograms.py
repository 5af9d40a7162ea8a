"""Histograms of the affinities S_ij that the FA loss compares (paper §4.3, Fig. 4).

For each Eq. 6 path pair (student 1/8 vs tutor 1/4, 1/16 vs 1/16, 1/32 vs 1/32) the values are
exactly those of Eq. 5: the tutor's unit pixel vectors A and the student's unit vectors
interpolated to the tutor's resolution B (:func:`fasterkd.affinity.prepare_rows`), with
S^t_ij = a_i . a_j and S^s_ij = b_i . b_j for the same pixel pairs i < j. When a map has more
than ``max_pixels`` pixels, that many are drawn per image with a generator seeded by (seed, path,
image), so every checkpoint, with or without ConvNorm, is measured on the same pairs and a
recomputation gives the same numbers.

"With ConvNorm" passes both sides through the §4.3 ConvNorm layers (1x1 conv + BN,
:class:`fasterkd.losses.PathConvNorm`) that a ``fa_convnorm`` student run trained and saved in
its checkpoint; a checkpoint trained without them has no ConvNorm view.

Two widgets show the histograms with the same controls (path, checkpoint, ConvNorm, bins):

* :func:`live_widget` recomputes from the networks in a running kernel (JupyterLab);
* :func:`static_widget` holds pre-rendered frames in nested ``ipywidgets.Stack`` s whose
  ``selected_index`` is ``jslink`` ed to the controls, so the controls work in the static book
  page with no kernel (the links run in the browser from the embedded widget state).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from fasterkd.affinity import prepare_rows
from fasterkd.losses import PATH_PAIRS, PathConvNorm
from fasterkd.runs import RUNS, artifact, chapter_of

#: the student runs of the book's run folder whose affinities are compared with the tutor's
STUDENT_RUNS = ("baseline", "student_c1", "student_convnorm")
DEFAULT_BINS = (10, 25, 50, 100)
DEFAULT_MAX_PIXELS = 1024
RANGE = (-1.0, 1.0)
#: colours of the two sides in every frame
STUDENT_COLOR, TUTOR_COLOR = "#d62728", "#7f7f7f"


def path_label(student_key: str, tutor_key: str) -> str:
    """``"student 1/8 vs tutor 1/4"``: the name of an Eq. 6 pair in the controls and titles."""
    return f"student {student_key} vs tutor {tutor_key}"


PATH_LABELS = tuple(path_label(s, t) for s, t in PATH_PAIRS)


# --------------------------------------------------------------------------------------------
# Loading: checkpoints, their ConvNorm layers, validation images
# --------------------------------------------------------------------------------------------


@dataclass
class Source:
    """One trained network and the ConvNorm layers its run trained (None if it had none)."""

    name: str
    model: nn.Module
    convnorm: PathConvNorm | None = None
    path: str = ""


def convnorm_from_state(objective_state: Mapping[str, Tensor]) -> PathConvNorm | None:
    """The ConvNorm layers saved in a checkpoint's ``objective`` state (None when absent).

    Channel counts are read from the saved 1x1 conv weights; keys look like
    ``convnorm.student.1_8.0.weight`` (``"1_8"`` is the module name of path ``"1/8"``).
    """
    prefix = "convnorm."
    state = {k[len(prefix):]: v for k, v in objective_state.items() if k.startswith(prefix)}
    if not state:
        return None
    channels: dict[str, dict[str, int]] = {"student": {}, "teacher": {}}
    for key, value in state.items():
        side, mod, idx, name = key.split(".", 3)
        if idx == "0" and name == "weight":
            channels[side][mod.replace("_", "/")] = int(value.shape[0])
    layers = PathConvNorm(channels["student"], channels["teacher"])
    layers.load_state_dict(state)
    return layers.eval()


def load_source(path: str | os.PathLike, name: str | None = None, device: str | torch.device = "cpu",
                made_by: str | None = None) -> Source:
    """Load a fasterkd checkpoint (and its ConvNorm layers) for the histograms.

    A missing file raises ``FileNotFoundError`` naming the notebook that writes it (``made_by``).
    """
    from fasterkd.engine.checkpoint import load_checkpoint, read_checkpoint
    from fasterkd.utils import pick_device

    path = Path(path)
    name = name or path.parent.name
    if not path.is_file():
        hint = f"; run notebook {made_by} first (it trains it)" if made_by else ""
        raise FileNotFoundError(f"checkpoint {str(path)!r} ({name}) not found{hint}")
    dev = pick_device(device)
    model, _ = load_checkpoint(path, dev)
    convnorm = convnorm_from_state(read_checkpoint(path, "cpu").get("objective", {}))
    if convnorm is not None:
        convnorm = convnorm.to(dev)
    return Source(name=name, model=model, convnorm=convnorm, path=str(path))


def load_run(run_dir: str | os.PathLike, students: Sequence[str] = STUDENT_RUNS,
             device: str | torch.device = "cpu") -> tuple[Source, dict[str, Source]]:
    """The tutor and the student runs of a book run folder (``<run_dir>/<name>/best.pt``)."""
    run_dir = Path(run_dir)
    tutor = load_source(artifact(run_dir, "tutor"), "tutor", device, chapter_of("tutor"))
    out = {}
    for name in students:
        made_by = chapter_of(name) if name in RUNS else None
        out[name] = load_source(run_dir / name / "best.pt", name, device, made_by)
    return tutor, out


def validation_images(run_dir_or_cfg: Any, count: int = 2, data_root: str = "",
                      device: str | torch.device = "cpu") -> Tensor:
    """The first ``count`` validation images (normalised, full resolution) as one batch.

    ``run_dir_or_cfg`` is a :class:`fasterkd.train.TrainConfig` or a checkpoint path whose config
    names the data; ``data_root`` (a Cityscapes root) replaces the config's when given.
    """
    from fasterkd.train import validation_items
    from fasterkd.utils import pick_device

    items = [item["image"] for item in validation_items(run_dir_or_cfg, count, data_root)]
    sizes = {tuple(x.shape) for x in items}
    if len(sizes) != 1:
        raise ValueError(f"validation images differ in size {sorted(sizes)}; use count=1")
    return torch.stack(items).to(pick_device(device))


# --------------------------------------------------------------------------------------------
# Affinity values and histograms
# --------------------------------------------------------------------------------------------


@dataclass
class PairValues:
    """S^s_ij and S^t_ij (Eq. 4-5) of the same sampled pixel pairs, float32 on the CPU."""

    student: Tensor
    tutor: Tensor

    @property
    def pairs(self) -> int:
        return int(self.student.numel())


def sample_indices(n: int, max_pixels: int, generator: torch.Generator) -> Tensor | None:
    """``max_pixels`` pixel indices drawn without replacement (None: keep all ``n``)."""
    if n <= max_pixels:
        return None
    return torch.randperm(n, generator=generator)[:max_pixels]


def pair_values(student: Tensor, tutor: Tensor, max_pixels: int = DEFAULT_MAX_PIXELS, seed: int = 0) -> PairValues:
    """Sampled S_ij of one path pair: student (B, C_s, h, w) and tutor (B, C_t, H, W) maps.

    The student's affinity is interpolated to the tutor's H x W as in the loss (Eq. 5,
    ``interp="affinity"``). Per image b, pixels are drawn with a generator seeded by
    ``seed * 1009 + b``; all pairs i < j of the drawn pixels are returned, images concatenated.
    Values are clamped to [-1, 1] (rounding can give 1 + 1e-7 for a vector with itself).
    """
    if int(max_pixels) != max_pixels or max_pixels < 2:
        raise ValueError(f"max_pixels must be an integer >= 2, got {max_pixels!r}")
    if student.dim() != 4 or tutor.dim() != 4 or student.shape[0] != tutor.shape[0]:
        raise ValueError(f"student and tutor must be (B, C, H, W) maps of one batch, got "
                         f"{tuple(student.shape)} and {tuple(tutor.shape)}")
    with torch.no_grad():
        a, b = prepare_rows(student.float(), tutor.float())
    s_out, t_out = [], []
    for img in range(a.shape[0]):
        g = torch.Generator().manual_seed(int(seed) * 1009 + img)
        idx = sample_indices(a.shape[1], int(max_pixels), g)
        ra, rb = (a[img], b[img]) if idx is None else (a[img][idx.to(a.device)], b[img][idx.to(b.device)])
        iu = torch.triu_indices(ra.shape[0], ra.shape[0], offset=1, device=ra.device)
        t_out.append((ra @ ra.t())[iu[0], iu[1]].clamp(-1.0, 1.0).cpu())
        s_out.append((rb @ rb.t())[iu[0], iu[1]].clamp(-1.0, 1.0).cpu())
    return PairValues(student=torch.cat(s_out), tutor=torch.cat(t_out))


def path_values(student_feats: Mapping[str, Tensor], tutor_feats: Mapping[str, Tensor],
                convnorm: PathConvNorm | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                seed: int = 0) -> dict[str, PairValues]:
    """:func:`pair_values` of every Eq. 6 pair, keyed by :data:`PATH_LABELS`.

    With ``convnorm`` both sides first pass through its (eval-mode) layers, as in the FA loss of
    a ConvNorm run. The sampling seed of path k is ``seed * 7 + k``.
    """
    for s_key, t_key in PATH_PAIRS:
        if s_key not in student_feats:
            raise ValueError(f"student features lack the {s_key!r} path (have {sorted(student_feats)})")
        if t_key not in tutor_feats:
            raise ValueError(f"tutor features lack the {t_key!r} path (have {sorted(tutor_feats)}); "
                             "is the guide a tutor checkpoint?")
    if convnorm is not None:
        with torch.no_grad():
            student_feats, tutor_feats = convnorm.eval()(student_feats, tutor_feats)
    return {path_label(s, t): pair_values(student_feats[s], tutor_feats[t], max_pixels, seed * 7 + k)
            for k, (s, t) in enumerate(PATH_PAIRS)}


def histogram(values: Tensor | np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts of ``values`` in ``bins`` equal bins over [-1, 1] (1 falls in the last bin)."""
    if int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    v = values.numpy() if isinstance(values, Tensor) else np.asarray(values)
    counts, edges = np.histogram(np.clip(v, *RANGE), bins=int(bins), range=RANGE)
    return counts.astype(np.int64), edges


# --------------------------------------------------------------------------------------------
# The measured set: values per (checkpoint, ConvNorm, path)
# --------------------------------------------------------------------------------------------


@dataclass
class FAHistograms:
    """Affinity values per (checkpoint, convnorm, path label); ``None`` where no ConvNorm exists.

    Built lazily: :meth:`values` runs the networks the first time a (checkpoint, convnorm) is asked
    for and caches the result, so the live widget and the pre-rendered frames share one code path.
    """

    tutor: Source
    students: dict[str, Source]
    images: Tensor
    max_pixels: int = DEFAULT_MAX_PIXELS
    seed: int = 0
    _cache: dict[tuple[str, bool], dict[str, PairValues] | None] = field(default_factory=dict, repr=False)
    _feats: dict[str, dict[str, Tensor]] = field(default_factory=dict, repr=False)

    @property
    def checkpoints(self) -> list[str]:
        return list(self.students)

    def has_convnorm(self, checkpoint: str) -> bool:
        return self._source(checkpoint).convnorm is not None

    def _source(self, checkpoint: str) -> Source:
        if checkpoint not in self.students:
            raise ValueError(f"checkpoint must be one of {self.checkpoints}, got {checkpoint!r}")
        return self.students[checkpoint]

    def _features(self, name: str, model: nn.Module) -> dict[str, Tensor]:
        if name not in self._feats:
            model.eval()
            with torch.no_grad():
                self._feats[name] = {k: v.float() for k, v in model(self.images).features.items()}
        return self._feats[name]

    def values(self, checkpoint: str, convnorm: bool, path: str) -> PairValues | None:
        """S_ij of ``path`` for ``checkpoint``; None for ``convnorm=True`` without ConvNorm layers."""
        if path not in PATH_LABELS:
            raise ValueError(f"path must be one of {PATH_LABELS}, got {path!r}")
        key = (checkpoint, bool(convnorm))
        if key not in self._cache:
            src = self._source(checkpoint)
            if convnorm and src.convnorm is None:
                self._cache[key] = None
            else:
                s = self._features(checkpoint, src.model)
                t = self._features("__tutor__", self.tutor.model)
                self._cache[key] = path_values(s, t, src.convnorm if convnorm else None, self.max_pixels, self.seed)
        got = self._cache[key]
        return None if got is None else got[path]

    def counts(self, checkpoint: str, convnorm: bool, path: str, bins: int):
        """(student counts, tutor counts, edges), or None where there is no ConvNorm view."""
        v = self.values(checkpoint, convnorm, path)
        if v is None:
            return None
        s, edges = histogram(v.student, bins)
        t, _ = histogram(v.tutor, bins)
        return s, t, edges

    def summary(self, near_one: float = 0.9) -> list[dict[str, Any]]:
        """One row per (checkpoint, ConvNorm, path): pairs, means and the share of S_ij > ``near_one``."""
        rows = []
        for ck in self.checkpoints:
            for cn in (False, True):
                for p in PATH_LABELS:
                    v = self.values(ck, cn, p)
                    if v is None:
                        continue
                    rows.append({
                        "checkpoint": ck, "convnorm": cn, "path": p, "pairs": v.pairs,
                        "mean S student": float(v.student.double().mean()),
                        "mean S tutor": float(v.tutor.double().mean()),
                        f"share S>{near_one} student": float((v.student > near_one).double().mean()),
                        f"share S>{near_one} tutor": float((v.tutor > near_one).double().mean()),
                        "mean |S_t - S_s|": float((v.tutor - v.student).abs().double().mean()),
                    })
        return rows


def compute_fa_histograms(run_dir: str | os.PathLike, images: int = 2, data_root: str = "",
                          device: str | torch.device = "cpu", students: Sequence[str] = STUDENT_RUNS,
                          max_pixels: int = DEFAULT_MAX_PIXELS, seed: int = 0) -> FAHistograms:
    """Load the tutor and the student runs of ``run_dir`` and the first validation images."""
    tutor, srcs = load_run(run_dir, students, device)
    imgs = validation_images(tutor.path, images, data_root, device)
    return FAHistograms(tutor=tutor, students=srcs, images=imgs, max_pixels=max_pixels, seed=seed)


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _frame_title(checkpoint: str, convnorm: bool, path: str, bins: int) -> str:
    return f"{checkpoint}, {path}, {'with' if convnorm else 'without'} ConvNorm, {bins} bins"


def draw_histogram(ax, counts: tuple[np.ndarray, np.ndarray, np.ndarray] | None, title: str = "",
                   checkpoint: str = "") -> None:
    """Student (colour) and tutor (grey) shares of pairs per bin on a matplotlib axis."""
    ax.set_title(title, fontsize=9)
    ax.set_xlim(*RANGE)
    ax.set_xlabel("affinity $S_{ij}$ (cosine similarity)")
    ax.set_ylabel("share of pixel pairs")
    if counts is None:
        ax.text(0.5, 0.5, f"{checkpoint} was trained without ConvNorm layers:\nthere is no ConvNorm view",
                ha="center", va="center", transform=ax.transAxes, fontsize=10)
        ax.set_yticks([])
        return
    s, t, edges = counts
    width = np.diff(edges)
    ax.bar(edges[:-1], t / max(t.sum(), 1), width=width, align="edge", color=TUTOR_COLOR, alpha=0.55,
           label=f"tutor $S^t$ ({int(t.sum())} pairs)")
    ax.bar(edges[:-1], s / max(s.sum(), 1), width=width, align="edge", color=STUDENT_COLOR, alpha=0.55,
           label=f"student $S^s$ ({int(s.sum())} pairs)")
    ax.legend(loc="upper left", fontsize=8)


def render_png(counts, title: str, checkpoint: str = "", size: tuple[float, float] = (6.4, 3.0),
               dpi: int = 72) -> bytes:
    """One frame as PNG bytes (matplotlib's Agg canvas; no pyplot state is touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    draw_histogram(ax, counts, title, checkpoint)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def figure4(data: FAHistograms, bins: int = 50, with_convnorm: str = "student_convnorm",
            without_convnorm: str = "student_c1"):
    """The paper's Fig. 4 as a matplotlib figure: a row per path, (a) with and (b) without ConvNorm."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PATH_LABELS), 2, figsize=(11, 2.8 * len(PATH_LABELS)), squeeze=False)
    for r, p in enumerate(PATH_LABELS):
        draw_histogram(axes[r, 0], data.counts(with_convnorm, True, p, bins),
                       f"(a) {with_convnorm} with ConvNorm, {p}", with_convnorm)
        draw_histogram(axes[r, 1], data.counts(without_convnorm, False, p, bins),
                       f"(b) {without_convnorm}, {p}", without_convnorm)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Widgets
# --------------------------------------------------------------------------------------------


@dataclass
class Controls:
    """The four controls shared by both widgets; each exposes an integer ``index``."""

    path: Any
    checkpoint: Any
    convnorm: Any
    bins: Any

    def all(self) -> list[Any]:
        return [self.path, self.checkpoint, self.convnorm, self.bins]

    def selection(self, data_checkpoints: Sequence[str], bins_options: Sequence[int]) -> tuple[str, bool, str, int]:
        return (data_checkpoints[self.checkpoint.index], bool(self.convnorm.index), PATH_LABELS[self.path.index],
                int(bins_options[self.bins.index]))


def make_controls(checkpoints: Sequence[str], bins_options: Sequence[int] = DEFAULT_BINS,
                  checkpoint: str | None = None, convnorm: bool = False, bins: int | None = None) -> Controls:
    import ipywidgets as w

    bins_options = [int(b) for b in bins_options]
    if not bins_options or any(b < 1 for b in bins_options):
        raise ValueError(f"bins_options must be positive integers, got {bins_options!r}")
    if checkpoint is not None and checkpoint not in checkpoints:
        raise ValueError(f"checkpoint must be one of {list(checkpoints)}, got {checkpoint!r}")
    if bins is not None and int(bins) not in bins_options:
        raise ValueError(f"bins must be one of {bins_options}, got {bins!r}")
    style = {"description_width": "90px"}
    path = w.Dropdown(options=list(PATH_LABELS), index=0, description="path", style=style)
    ck = w.Dropdown(options=list(checkpoints), description="checkpoint", style=style,
                    index=list(checkpoints).index(checkpoint) if checkpoint else 0)
    cn = w.ToggleButtons(options=["without ConvNorm", "with ConvNorm"], index=int(bool(convnorm)),
                         description="ConvNorm", style=style)
    b = w.SelectionSlider(options=bins_options, description="bins", style=style, continuous_update=True,
                          index=bins_options.index(int(bins)) if bins is not None else len(bins_options) // 2)
    return Controls(path, ck, cn, b)


def _nested_stack(levels: Sequence[tuple[Any, int]], leaf, links: list[Any]) -> Any:
    """A Stack per level whose children are the next level; each level's selected_index is
    jslink-ed to that level's control index (the link runs in the browser without a kernel)."""
    import ipywidgets as w

    def build(depth: int, chosen: tuple[int, ...]):
        if depth == len(levels):
            return leaf(chosen)
        control, n = levels[depth]
        children = [build(depth + 1, chosen + (i,)) for i in range(n)]
        stack = w.Stack(children=children, selected_index=int(control.index))
        links.append(w.jslink((control, "index"), (stack, "selected_index")))
        return stack

    return build(0, ())


@dataclass
class StaticFAWidget:
    """The kernel-free widget: controls + nested Stacks of PNG frames; ``counts`` per frame key."""

    widget: Any
    controls: Controls
    checkpoints: list[str]
    bins_options: list[int]
    frames: dict[tuple[str, bool, str, int], bytes]
    counts: dict[tuple[str, bool, str, int], Any]
    stack: Any = None
    links: list[Any] = field(default_factory=list)

    def current_key(self) -> tuple[str, bool, str, int]:
        return self.controls.selection(self.checkpoints, self.bins_options)

    def _ipython_display_(self) -> None:  # pragma: no cover - display hook
        from IPython.display import display

        display(self.widget)


def static_widget(data: FAHistograms, bins_options: Sequence[int] = DEFAULT_BINS, checkpoint: str | None = None,
                  convnorm: bool = False, bins: int | None = None, dpi: int = 72) -> StaticFAWidget:
    """Every (path, checkpoint, ConvNorm, bins) frame pre-rendered; controls switch frames in the browser."""
    import ipywidgets as w

    bins_options = [int(b) for b in bins_options]
    cks = data.checkpoints
    controls = make_controls(cks, bins_options, checkpoint, convnorm, bins)
    frames: dict[tuple[str, bool, str, int], bytes] = {}
    counts: dict[tuple[str, bool, str, int], Any] = {}

    def leaf(chosen: tuple[int, ...]):
        p, c, cn, b = PATH_LABELS[chosen[0]], cks[chosen[1]], bool(chosen[2]), bins_options[chosen[3]]
        key = (c, cn, p, b)
        counts[key] = data.counts(c, cn, p, b)
        frames[key] = render_png(counts[key], _frame_title(c, cn, p, b), c, dpi=dpi)
        return w.Image(value=frames[key], format="png")

    levels = [(controls.path, len(PATH_LABELS)), (controls.checkpoint, len(cks)), (controls.convnorm, 2),
              (controls.bins, len(bins_options))]
    links: list[Any] = []
    stack = _nested_stack(levels, leaf, links)
    box = w.VBox([w.HBox([controls.path, controls.checkpoint]), w.HBox([controls.convnorm, controls.bins]), stack])
    box.add_class("fasterkd-fa-histograms")
    return StaticFAWidget(box, controls, cks, bins_options, frames, counts, stack, links)


@dataclass
class LiveFAWidget:
    """The kernel widget: the same controls; a change recomputes (affinities cached per run)."""

    widget: Any
    controls: Controls
    data: FAHistograms
    bins_options: list[int]
    image: Any
    dpi: int = 72
    counts: Any = None

    def current_key(self) -> tuple[str, bool, str, int]:
        return self.controls.selection(self.data.checkpoints, self.bins_options)

    def update(self, *_: Any) -> None:
        c, cn, p, b = self.current_key()
        self.counts = self.data.counts(c, cn, p, b)
        self.image.value = render_png(self.counts, _frame_title(c, cn, p, b), c, dpi=self.dpi)

    def _ipython_display_(self) -> None:  # pragma: no cover - display hook
        from IPython.display import display

        display(self.widget)


def live_widget(data: FAHistograms, bins_options: Sequence[int] = DEFAULT_BINS, checkpoint: str | None = None,
                convnorm: bool = False, bins: int | None = None, dpi: int = 72) -> LiveFAWidget:
    """Controls observed in the kernel: every change recomputes the histogram from the networks."""
    import ipywidgets as w

    bins_options = [int(b) for b in bins_options]
    controls = make_controls(data.checkpoints, bins_options, checkpoint, convnorm, bins)
    image = w.Image(format="png")
    box = w.VBox([w.HBox([controls.path, controls.checkpoint]), w.HBox([controls.convnorm, controls.bins]), image])
    box.add_class("fasterkd-fa-histograms-live")
    live = LiveFAWidget(box, controls, data, bins_options, image, dpi)
    for c in controls.all():
        c.observe(live.update, names="index")
    live.update()
    return live


def frames_keys(checkpoints: Iterable[str], bins_options: Iterable[int]) -> list[tuple[str, bool, str, int]]:
    """Every frame key of :func:`static_widget`, in (path, checkpoint, ConvNorm, bins) nesting order."""
    bins_options = list(bins_options)
    return [(c, cn, p, b) for p in PATH_LABELS for c in checkpoints for cn in (False, True) for b in bins_options]
