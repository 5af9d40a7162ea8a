"""The embedded study's runs: for every seed of the profile, the paired arms of each claim, trained
into ``<run_dir>/study/<seed>/<arm>/`` (or read from the chapters' runs), and the claims measured
from them.

Per seed ``s`` (every run of the seed starts from ``seed = s``, so the two arms of a pair share
their initialisation and data order and differ in one knob):

- ``baseline`` (Eq. 8) and ``tutor`` from it (Eq. 9): claim 1, Table 1;
- ``student_c1`` and ``student_c0`` from the baseline with the tutor (Eq. 10, c = 1 and c = 0,
  same tutor KL and epochs): claim 2, Table 2; ``student_scratch`` (c = 1, no init): claim 2b;
- ``head_ps`` and ``head_bilinear`` from the baseline, the same epochs: claim 3, Table 3;
- ``student_convnorm`` (c = 1 with ConvNorm): claim 4, the share of S_ij near 1 (Fig. 4);
- claim 5: the per-class gain of c = 1 over c = 0 on thin and small against large classes.

Every run of the study trains with ``torch.set_num_threads(threads)`` (results depend on the
thread count), recorded in ``study/summary.json``; seeds train side by side in separate processes
(:func:`train_seeds`). A run whose ``eval.json`` exists and whose saved
config is the one asked for is read back, not retrained. The chapters' own runs are the arms of
the default seed (:func:`chapter_arms`) when all of them match: that seed is read, not trained
twice (its arms then ran at the chapters' thread count, the same for both arms of every pair).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from fasterkd.config import PROFILES, TrainConfig, preset
from fasterkd.stats import PairedDifference, paired_difference, share_near
from fasterkd.study import class_group_gains, iou_matrix, paper_differences
from fasterkd.utils import atomic_write_json, strict_json

#: the seeds of each profile, fixed up front: all are trained and reported, none dropped
STUDY_SEEDS: Mapping[str, tuple[int, ...]] = {
    "smoke": (12345, 12346),  # the fewest that give an interval: the tests train it (minutes)
    "quick": (12345, 12346, 12347),
    "study": tuple(range(12345, 12357)),
    "paper": (12345, 12346, 12347),
}
#: torch threads of every run the study trains (both arms of a pair train with the same count).
#: One thread per run and the seeds in parallel processes: on the 2-core machine of the README two
#: 1-thread quick student runs side by side took 22 s each, one 2-thread run 17 s (1.5x the
#: throughput), and a result then does not depend on how many cores the machine has.
STUDY_THREADS = 1
#: the runs of one seed, in training order
ARMS = ("baseline", "tutor", "student_c1", "student_c0", "student_scratch", "student_convnorm",
        "head_ps", "head_bilinear")
#: (claim, better arm, control arm) of the mIoU claims; names match study.paper_differences()
MIOU_CLAIMS = (
    ("tutor - baseline", "tutor", "baseline"),
    ("FA c=1 - c=0", "student_c1", "student_c0"),
    ("from baseline - from scratch", "student_c1", "student_scratch"),
    ("pixel shuffle - bilinear", "head_ps", "head_bilinear"),
)
CONVNORM_CLAIM = "ConvNorm: share of S near 1"
SHARE_UNIT = "percentage points"
NEAR_ONE_TOL = 0.05  # |S_ij - 1| <= 0.05 counts as "near 1"
FA_GAIN = "FA c=1 - c=0"


def study_seeds(profile: str) -> tuple[int, ...]:
    """The seeds of ``profile`` (:data:`STUDY_SEEDS`)."""
    if profile not in STUDY_SEEDS:
        raise ValueError(f"profile must be one of {sorted(STUDY_SEEDS)} (known profiles {PROFILES}), "
                         f"got {profile!r}")
    return STUDY_SEEDS[profile]


def seed_dir(run_dir: str | Path, seed: int) -> Path:
    """``<run_dir>/study/<seed>``: the runs of one seed."""
    return Path(run_dir) / "study" / str(int(seed))


def arm_configs(profile: str, seed: int, run_dir: str | Path, teacher: str, arch: str | None = None,
                data_root: str = "", device: str = "auto", folder: str | Path | None = None) -> dict[str, TrainConfig]:
    """The :data:`ARMS` of ``seed`` as configs, trained into ``folder`` (default :func:`seed_dir`);
    the paths of the runs they read point into it (a run reads them once the earlier arms trained)."""
    folder = Path(folder) if folder is not None else seed_dir(run_dir, seed)
    base, tutor = str(folder / "baseline" / "best.pt"), str(folder / "tutor" / "best.pt")
    common = dict(seed=int(seed), arch=arch, data_root=data_root, device=device, progress=False)

    def cfg(stage: str, arm: str, **kw: Any) -> TrainConfig:
        return preset(stage, profile, out_dir=str(folder / arm), **common, **kw)

    student = dict(tutor=tutor, fa_weight=1.0)
    return {
        "baseline": cfg("baseline", "baseline", teacher=teacher),
        "tutor": cfg("tutor", "tutor", teacher=teacher, init=base),
        "student_c1": cfg("student", "student_c1", init=base, **student),
        "student_c0": cfg("student", "student_c0", init=base, **{**student, "fa_weight": 0.0}),
        "student_scratch": cfg("student", "student_scratch", init=None, **student),
        "student_convnorm": cfg("student", "student_convnorm", init=base, fa_convnorm=True, **student),
        "head_ps": cfg("head", "head_ps", teacher=teacher, init=base),
        "head_bilinear": cfg("head", "head_bilinear", teacher=teacher, init=base, head="bilinear"),
    }


def chapter_arms(profile: str, seed: int, run_dir: str | Path, teacher: str, arch: str | None = None,
                data_root: str = "", device: str = "auto") -> dict[str, TrainConfig] | None:
    """The arms of ``seed`` as the chapters' own runs (``<run_dir>/<arm>``: the chapters name their
    runs as the study names its arms), when every one of them finished with exactly the config the
    study asks for (:func:`finished`); else None and the seed trains in :func:`seed_dir`.

    The chapters train with the default seed, so the study reads that seed back instead of training
    it twice (the same config gives the same run: the quick book's seed-12345 arms matched the
    chapters' runs to every digit). All or none: a pair never mixes a chapter run and a study run."""
    configs = arm_configs(profile, seed, run_dir, teacher, arch, data_root, device, folder=run_dir)
    return configs if all(finished(c) is not None for c in configs.values()) else None


def _comparable(d: Mapping[str, Any]) -> dict[str, Any]:
    # where a run ran and how it reported progress do not change what it trained
    return {k: v for k, v in d.items() if k not in ("device", "progress")}


def finished(cfg: TrainConfig) -> dict[str, Any] | None:
    """The final evaluation of ``cfg``'s run folder if it trained exactly ``cfg``, else None."""
    out = Path(cfg.out_dir)
    ev, saved = out / "eval.json", out / "config.json"
    if not (ev.is_file() and saved.is_file() and (out / "best.pt").is_file()):
        return None
    if _comparable(json.loads(saved.read_text())) != _comparable(cfg.to_dict()):
        return None
    return json.loads(ev.read_text())


@contextlib.contextmanager
def pinned_threads(threads: int) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block, the previous count after it."""
    if int(threads) != threads or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_seed(configs: Mapping[str, TrainConfig], threads: int = STUDY_THREADS) -> dict[str, dict[str, Any]]:
    """Train (or read back, :func:`finished`) the arms of one seed in :data:`ARMS` order; returns
    each arm's final evaluation."""
    from fasterkd.train import run_stage

    missing = [a for a in ARMS if a not in configs]
    if missing:
        raise ValueError(f"configs: arms {missing} are missing (expected {list(ARMS)})")
    evals: dict[str, dict[str, Any]] = {}
    with pinned_threads(threads):
        for arm in ARMS:
            got = finished(configs[arm])
            # an arm whose folder holds anything else (an interrupted or older run) is retrained from
            # scratch, as runs.train_variant does
            evals[arm] = got if got is not None else run_stage(configs[arm], overwrite=True).eval
    return evals


def convnorm_shares(folder: str | Path, images: int = 1, max_pixels: int = 256, data_root: str = "",
                    tol: float = NEAR_ONE_TOL) -> tuple[float, float]:
    """Claim 4 for one seed: the share (%) of S_ij within ``tol`` of 1, student and tutor sides of
    every Eq. 6 path pooled, for the ConvNorm student seen through its ConvNorm and for the plain
    c = 1 student. Returns (with ConvNorm, without)."""
    from fasterkd.histograms import PATH_LABELS, compute_fa_histograms

    data = compute_fa_histograms(folder, images=images, data_root=data_root, device="cpu",
                                 students=("student_c1", "student_convnorm"), max_pixels=max_pixels)

    def share(checkpoint: str, convnorm: bool) -> float:
        pooled = []
        for path in PATH_LABELS:
            v = data.values(checkpoint, convnorm, path)
            pooled += [v.student.numpy(), v.tutor.numpy()]
        return 100.0 * share_near(np.concatenate(pooled), 1.0, tol)

    return share("student_convnorm", True), share("student_c1", False)


def measure(per_seed: Mapping[int, Mapping[str, Mapping[str, Any]]],
            shares: Mapping[int, tuple[float, float]] | None = None, *, paper_size: str = "256x512",
            method: str = "t") -> tuple[list[PairedDifference], list[str]]:
    """The claims from the runs' evaluations (``per_seed[seed][arm]`` an eval.json mapping) and the
    ConvNorm shares of :func:`convnorm_shares` (``shares[seed]``); returns the paired differences
    in the forest plot's order and notes on any claim that could not be measured."""
    seeds = sorted(per_seed)
    if len(seeds) < 2:
        raise ValueError(f"per_seed: a paired interval needs at least 2 seeds, got {len(seeds)}")
    paper = paper_differences(paper_size)
    out, notes = [], []

    def miou(arm: str) -> list[float]:
        return [100.0 * float(per_seed[s][arm]["miou"]) for s in seeds]

    for claim, a, b in MIOU_CLAIMS:
        out.append(paired_difference(miou(a), miou(b), claim=claim, method=method, seeds=seeds,
                                     paper=paper.get(claim)))
    if shares is not None:
        if sorted(shares) != seeds:
            raise ValueError(f"shares: seeds {sorted(shares)} differ from the runs' seeds {seeds}")
        out.append(paired_difference([shares[s][0] for s in seeds], [shares[s][1] for s in seeds],
                                     claim=CONVNORM_CLAIM, unit=SHARE_UNIT, method=method, seeds=seeds))
    try:
        groups = class_group_gains(iou_matrix([per_seed[s]["student_c1"] for s in seeds]),
                                   iou_matrix([per_seed[s]["student_c0"] for s in seeds]),
                                   claim=FA_GAIN, method=method, seeds=seeds)
    except ValueError as exc:  # a group with no class seen in every seed of both runs
        notes.append(f"claim 5 (per class) cannot be measured: {exc}")
    else:
        out += list(groups.results)
        if groups.excluded:
            notes.append("claim 5 leaves out classes without an IoU in every seed: " + ", ".join(groups.excluded))
    return out, notes


def study_workers(threads: int, device: str | torch.device = "auto") -> int:
    """Seeds trained at once: as many ``threads``-thread processes as the CPU has cores (one on a
    GPU, whose runs would share the card)."""
    from fasterkd.utils import pick_device

    if pick_device(device).type != "cpu":
        return 1
    return max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
               // max(1, int(threads)))


#: seconds between a worker's checks that the process that started it is still there, and the
#: grace it gives its own SIGTERM handling (the trainer stops at a step boundary) before it exits
PARENT_POLL_S = 1.0
PARENT_GRACE_S = 60.0


def _stop_with_parent(parent: int) -> None:
    """Pool initializer: a daemon thread that ends this worker when ``parent`` is gone.

    A killed book (its kernel, or ``python -m fasterkd.book``) would otherwise leave its spawned
    seed workers training on: they are separate processes, and nothing else tells them. The worker
    sends itself SIGTERM (the trainer's stop request: it stops after the step, and every file it
    writes is written atomically), then exits outright after :data:`PARENT_GRACE_S`.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(PARENT_GRACE_S)
        os._exit(143)

    threading.Thread(target=watch, name="stop-with-parent", daemon=True).start()


def seed_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """A ``ProcessPoolExecutor`` of ``workers`` spawned processes (forking a process whose OpenMP
    threads already ran can hang) that end themselves when this process dies."""
    return concurrent.futures.ProcessPoolExecutor(int(workers), mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_stop_with_parent, initargs=(os.getpid(),))


def train_seeds(configs: Mapping[int, Mapping[str, TrainConfig]], threads: int = STUDY_THREADS,
                workers: int = 1) -> dict[int, dict[str, dict[str, Any]]]:
    """:func:`train_seed` of every seed of ``configs``, ``workers`` seeds at a time in fresh
    processes (:func:`seed_pool`). A seed whose arms all finished is read back here, without a
    process."""
    todo = [s for s, c in configs.items() if any(finished(cfg) is None for cfg in c.values())]
    out = {s: train_seed(c, threads) for s, c in configs.items() if s not in todo}
    if int(workers) <= 1 or len(todo) <= 1:
        out.update({s: train_seed(configs[s], threads) for s in todo})
    else:
        with seed_pool(min(int(workers), len(todo))) as pool:
            futures = {s: pool.submit(train_seed, dict(configs[s]), threads) for s in todo}
            out.update({s: f.result() for s, f in futures.items()})
    return {s: out[s] for s in configs}


def run_study(profile: str, run_dir: str | Path, teacher: str, arch: str | None = None, data_root: str = "",
              device: str = "auto", seeds: Sequence[int] | None = None, threads: int = STUDY_THREADS,
              convnorm_images: int = 1, workers: int | None = None) -> dict[str, Any]:
    """Train every arm of every seed (:func:`train_seeds`, ``workers`` seeds at a time, default
    :func:`study_workers`), measure the claims (:func:`measure`) and write
    ``<run_dir>/study/summary.json``. Returns ``{"results", "notes", "miou", "threads", "workers",
    "seeds", "folders"}`` (``miou[arm]``: the per-seed mIoU %, in seed order; ``folders[seed]``:
    where its arms are, the run folder itself for a seed read from the chapters)."""
    seeds = tuple(study_seeds(profile) if seeds is None else seeds)
    workers = study_workers(threads, device) if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    configs = {s: (chapter_arms(profile, s, run_dir, teacher, arch, data_root, device)
                   or arm_configs(profile, s, run_dir, teacher, arch, data_root, device)) for s in seeds}
    folders = {s: Path(c["baseline"].out_dir).parent for s, c in configs.items()}
    per_seed = train_seeds(configs, threads, workers)
    shares = {}
    for s in seeds:
        with pinned_threads(threads):
            shares[s] = convnorm_shares(folders[s], images=convnorm_images, data_root=data_root)
    results, notes = measure(per_seed, shares)
    miou = {arm: [100.0 * float(per_seed[s][arm]["miou"]) for s in seeds] for arm in ARMS}
    summary = {
        "profile": profile, "seeds": list(seeds), "threads": int(threads), "workers": workers, "miou": miou,
        "folders": {str(s): _relative(folders[s], run_dir) for s in seeds},
        "convnorm_share": {str(s): list(shares[s]) for s in seeds}, "notes": notes,
        "claims": [{"claim": r.claim, "unit": r.unit, "differences": list(r.differences), "mean": r.mean,
                    "lo": r.lo, "hi": r.hi, "method": r.method, "resolved": r.resolved,
                    "paper": r.paper} for r in results],
    }
    atomic_write_json(Path(run_dir) / "study" / "summary.json", strict_json(summary))
    return {"results": results, "notes": notes, "miou": miou, "threads": int(threads), "workers": workers,
            "seeds": seeds, "folders": folders}


def _relative(folder: Path, run_dir: str | Path) -> str:
    try:
        return str(folder.relative_to(Path(run_dir))) or "."
    except ValueError:
        return str(folder)


def arm_table(miou: Mapping[str, Sequence[float]], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """One row per arm: its mIoU % per seed and the mean (for the chapter's table of runs)."""
    rows = []
    for arm, values in miou.items():
        if len(values) != len(seeds):
            raise ValueError(f"miou[{arm!r}]: {len(values)} values for {len(seeds)} seeds")
        row: dict[str, Any] = {"run": arm}
        row.update({str(s): v for s, v in zip(seeds, values)})
        row["mean"] = float(np.mean(values)) if values else math.nan
        rows.append(row)
    return rows


def conclusions(results: Sequence[PairedDifference]) -> list[str]:
    """One sentence per claim, from its interval: "resolved" only when it excludes zero."""
    lines = []
    for r in results:
        paper = "" if r.paper is None else f" (the paper: {r.paper:+.1f})"
        lines.append(f"{r.claim}: {'' if r.resolved else 'the study '}{r.verdict()}{paper}.")
    return lines


def summary_markdown(summary: Mapping[str, Any] | None) -> str:
    """What the study of one build supports, as Markdown for the book's introduction, from its
    ``study/summary.json`` (None: the study has not run in this build)."""
    if not summary:
        return ("This build has not run chapter 11 (the embedded study): its verdicts appear here "
                "once it has.\n")
    seeds = summary.get("seeds", [])

    def item(c: Mapping[str, Any]) -> str:
        paper = "" if c.get("paper") is None else f" (the paper: {c['paper']:+.1f})"
        return f"{c['claim']}: {c['mean']:+.2f} {c['unit']} [{c['lo']:+.2f}, {c['hi']:+.2f}]{paper}"

    claims = summary.get("claims", [])
    resolved = [item(c) for c in claims if c.get("resolved")]
    open_ = [item(c) for c in claims if not c.get("resolved")]
    lines = [f"In this build (profile `{summary.get('profile')}`, {len(seeds)} paired seeds, 95 % intervals "
             f"of the mean paired difference, printed from `study/summary.json`):", ""]
    lines.append("- **resolved** (the interval excludes zero): " + ("; ".join(resolved) if resolved else "none") + ".")
    lines.append("- **the study cannot tell**: " + ("; ".join(open_) if open_ else "none") + ".")
    return "\n".join(lines) + "\n"


def write_summary_page(run_dir: str | Path, dest: str | Path) -> Path:
    """Write :func:`summary_markdown` of ``<run_dir>/study/summary.json`` to ``dest`` (the file the
    book's introduction includes)."""
    from fasterkd.utils import atomic_write_text

    path = Path(run_dir) / "study" / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else None
    atomic_write_text(Path(dest), summary_markdown(summary))
    return Path(dest)


__all__ = [
    "STUDY_SEEDS", "STUDY_THREADS", "ARMS", "MIOU_CLAIMS", "CONVNORM_CLAIM", "SHARE_UNIT", "study_seeds",
    "seed_dir", "arm_configs", "chapter_arms", "finished", "pinned_threads", "train_seed", "train_seeds",
    "study_workers", "convnorm_shares", "measure",
    "run_study", "arm_table", "conclusions", "summary_markdown", "write_summary_page",
]
