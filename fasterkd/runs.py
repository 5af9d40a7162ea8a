"""The run registry: which run folder each chapter writes, what a chapter needs, and how it opens.

A book run folder (``runs/book-<profile>``) holds one sub-folder per trained run. :data:`RUNS` is
the one table of those runs, the chapter (notebook) that writes each and the artifact later
chapters read (``best.pt``, or ``arch.json`` for the search). On top of it:

- :func:`chapter` opens a notebook: it resolves the run folder and the device, checks that the
  upstream runs the chapter reads exist (naming the chapter that makes a missing one) and shows
  the profile banner, with paths relative to the run folder;
- :func:`upstream` finds those artifacts, :func:`run_summary` reads what a finished run says
  about itself and :func:`run_cost` what its network costs;
- :func:`train_variant` / :func:`train_like` train one more run of the analysis chapters, and
  :func:`seed_spread` / :func:`noise_note` say how far a single-seed difference can be trusted.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from fasterkd.utils import pick_device

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Run:
    """One run of the book run folder: ``<run_dir>/<name>/<artifact>``, written by ``chapter``.

    ``table1`` is the key of the paper's Table 1 row the run reproduces (``None``: not in Table 1).
    """

    name: str
    chapter: str
    artifact: str = "best.pt"
    table1: str | None = None


#: chapter 7 retrains chapter 5's c = 1 student with another seed under this name (the noise yardstick)
RESEED_RUN = "student_c1_reseed"

#: every run of a book run folder whose name does not depend on the profile, in the order the
#: book trains them (chapter 7's FA-weight sweep and chapter 9's deeper-tutor runs are named from
#: the profile's values and are read by their own chapter only)
RUNS: Mapping[str, Run] = {r.name: r for r in (
    Run("teacher", "02_search"),
    Run("search", "02_search", artifact="arch.json"),
    Run("baseline", "03_teacher_baseline", table1="baseline"),
    Run("tutor", "04_tutor", table1="tutor"),
    Run("student_c1", "05_student", table1="student"),
    Run("student_convnorm", "05_student"),
    Run("student_scratch", "07_ablations"),
    Run("student_c0", "07_ablations"),
    Run(RESEED_RUN, "07_ablations"),
    Run("head_ps", "08_pixel_shuffle"),
    Run("head_bilinear", "08_pixel_shuffle"),
    Run("beyond_ps_fa", "09_beyond"),
    Run("beyond_fa_q2", "09_beyond"),
    Run("study", "11_study", artifact="summary.json"),
)}


#: the chapters that train the pipeline every later chapter builds on
PIPELINE = ("02_search", "03_teacher_baseline", "04_tutor", "05_student")


def chapter_of(run: str) -> str:
    """The chapter (notebook name) that writes ``run``."""
    if run not in RUNS:
        raise KeyError(f"run {run!r} is not in fasterkd.runs.RUNS (known: {', '.join(RUNS)})")
    return RUNS[run].chapter


def artifact(run_dir: PathLike, run: str) -> Path:
    """``<run_dir>/<run>/best.pt`` (``search/arch.json`` for the search)."""
    chapter_of(run)
    return Path(run_dir) / run / RUNS[run].artifact


def upstream(run_dir: PathLike, need: Iterable[str] = ("teacher", "baseline", "tutor")) -> dict[str, str | None]:
    """Checkpoint paths of the pipeline's runs in ``run_dir`` (``<name>/best.pt``) and ``"arch"``.

    Keys: the trained runs of chapters 02-05 and ``"arch"``, which is ``search/arch.json`` when the
    search ran, else ``None`` (the official student). Runs named in ``need`` (``"search"`` for the
    arch) that are missing raise one ``FileNotFoundError`` naming each and the notebook that makes it.
    """
    need = list(need)
    for name in need:
        chapter_of(name)
    missing = [name for name in need if not artifact(run_dir, name).is_file()]
    if missing:
        what = "; ".join(f"{artifact(run_dir, n)} (run notebook {chapter_of(n)} first: it trains {n})"
                         for n in missing)
        raise FileNotFoundError(f"the run folder lacks what this chapter reads: {what}")
    out: dict[str, str | None] = {}
    for run in RUNS.values():
        if run.chapter not in PIPELINE:
            continue
        path = artifact(run_dir, run.name)
        out["arch" if run.name == "search" else run.name] = str(path) if path.is_file() else None
    return out


# --------------------------------------------------------------------------------------------
# Opening a chapter
# --------------------------------------------------------------------------------------------


def profile_line(profile: str, data_root: str, device: Any) -> str:
    """The sentence every chapter states: which profile, data and device produced its numbers."""
    data = (f"Cityscapes (`{Path(data_root).name}` folder)" if data_root
            else "the embedded synthetic street scenes (not Cityscapes)")
    dev = str(device)
    if dev.startswith("cuda") and torch.cuda.is_available():
        dev += f" ({torch.cuda.get_device_name()})"
    elif dev == "cpu":
        dev += f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return f"Profile **{profile}**, data: {data}, device: {dev}."


@dataclass
class Chapter:
    """What a notebook works with once :func:`chapter` has opened it.

    ``options`` are the data root and device every run the chapter trains is given (as the
    notebook's parameters name them: the trainer resolves ``"auto"`` itself); ``device`` is the
    resolved device for the networks the notebook runs directly; ``up`` is :func:`upstream` and
    ``needed`` the upstream runs the chapter checked.
    """

    name: str
    profile: str
    run_dir: Path
    data_root: str
    device: torch.device
    up: dict[str, str | None] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    needed: tuple[str, ...] = ()

    def path(self, run: str) -> Path:
        """``<run_dir>/<run>``: a run folder of this book run."""
        return self.run_dir / run

    def out_dir(self) -> Path:
        """``<run_dir>/<chapter>``, created: where a chapter that trains nothing keeps its files."""
        folder = self.run_dir / self.name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def relative(self, path: PathLike | None) -> str:
        """``path`` relative to the run folder (as it is shown on the published page)."""
        if path is None:
            return "none"
        p = Path(path)
        try:
            return p.resolve().relative_to(self.run_dir.resolve()).as_posix()
        except ValueError:
            return p.name

    def banner(self) -> str:
        """The profile line, the student arch and the upstream runs read, relative to the run folder."""
        text = profile_line(self.profile, self.data_root, self.device)
        read = [self.relative(artifact(self.run_dir, n)) for n in self.needed]
        if self.needed:  # a chapter that builds on the pipeline names the student it uses
            arch = self.up["arch"]
            text += f" Student arch: {f'`{self.relative(arch)}`' if arch else 'the official FasterSeg student'}."
        if read:
            text += " Reads " + ", ".join(f"`{r}`" for r in read) + " of the run folder."
        return text


def _show(markdown: str) -> None:
    """Markdown in a notebook kernel, plain text elsewhere."""
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:  # pragma: no cover - IPython ships with the notebooks' kernel
        print(markdown)
        return
    if get_ipython() is None:
        print(markdown)
    else:
        display(Markdown(markdown))


def chapter(name: str, profile: str, run_dir: PathLike, data_root: str = "", device: str = "auto",
            need: Sequence[str] = (), show: bool = True) -> Chapter:
    """Open the chapter ``name`` (its notebook's file name): the one set-up call of a notebook.

    Checks the upstream runs in ``need`` (:func:`upstream`), resolves ``device`` with
    :func:`fasterkd.utils.pick_device` and shows the banner (:meth:`Chapter.banner`).
    """
    from fasterkd.train import PROFILES

    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    run_dir = Path(run_dir)
    up = upstream(run_dir, need)
    dev = pick_device(device)
    ch = Chapter(name, profile, run_dir, data_root, dev, up, dict(data_root=data_root, device=device), tuple(need))
    if show:
        _show(ch.banner())
    return ch


# --------------------------------------------------------------------------------------------
# A finished run: what it says, what it costs
# --------------------------------------------------------------------------------------------


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


def run_summary(run: PathLike) -> RunSummary:
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


def run_cost(run: PathLike, size: tuple[int, int] | str = (1024, 2048)) -> dict[str, int]:
    """:func:`fasterkd.cost.model_cost` of the network a run trained, rebuilt from its
    ``config.json`` on the meta device (shapes only: nothing allocated, so 1024x2048 costs
    milliseconds)."""
    from fasterkd.cost import model_cost
    from fasterkd.train import TrainConfig, build_network

    cfg_path = Path(run) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{str(cfg_path)!r} not found: {Path(run).name} has not been trained")
    cfg = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
    with torch.device("meta"):
        model = build_network(cfg)
    return model_cost(model, size)


# --------------------------------------------------------------------------------------------
# More runs of the analysis chapters, and how far one seed can be trusted
# --------------------------------------------------------------------------------------------


def train_variant(stage: str, profile: str, run_dir: PathLike, name: str, data_root: str = "",
                  device: str = "auto", **overrides: Any) -> RunSummary:
    """Train ``stage`` under ``profile`` into ``run_dir/name`` and return its :class:`RunSummary`.

    ``overrides`` are :func:`fasterkd.train.preset` keywords (teacher, tutor, init, arch, fa_weight, ...).
    """
    from fasterkd.train import preset, run_stage

    cfg = preset(stage, profile, data_root=data_root, out_dir=str(Path(run_dir) / name), device=device,
                 progress=False, **overrides)
    run_stage(cfg, overwrite=True)  # the book retrains its runs on every execution
    return run_summary(Path(run_dir) / name)


def train_like(source: PathLike, name: str, data_root: str = "", device: str = "auto",
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
    run_stage(cfg, overwrite=True)  # the book retrains its runs on every execution
    return run_summary(source.parent / name)


def seed_spread(run_dir: PathLike) -> float | None:
    """|mIoU(student_c1) - mIoU(student_c1_reseed)| in points: what the seed alone moves one run
    (``None`` until chapter 7 has trained the reseeded run)."""
    run_dir = Path(run_dir)
    if not (run_dir / RESEED_RUN / "eval.json").is_file() or not (run_dir / "student_c1" / "eval.json").is_file():
        return None
    return abs(run_summary(run_dir / "student_c1").miou_percent - run_summary(run_dir / RESEED_RUN).miou_percent)


def noise_note(runs: Sequence[RunSummary], profile: str, run_dir: PathLike) -> str:
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


__all__ = [
    "Run", "RUNS", "PIPELINE", "RESEED_RUN", "chapter_of", "artifact", "upstream", "profile_line", "Chapter", "chapter",
    "RunSummary", "run_summary", "run_cost", "train_variant", "train_like", "seed_spread", "noise_note",
]
