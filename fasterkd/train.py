"""Training, as the notebooks see it: one call per stage of the paper.

Stages (paper §3.3 and §4.2; FasterSeg spec §6 and §9 where the paper is silent):

- ``teacher``:  an HRNet (or HRNet-OCR) trained with CE (OCR: 0.4 * aux + 1.0 * main);
- ``search``:   the teacher-guided architecture search, Eq. 7 (:mod:`fasterkd.engine.search`);
- ``baseline``: the derived student distilled from HRNet, Eq. 8;
- ``tutor``:    the student plus a 1/4 path, initialised from the baseline, distilled from HRNet, Eq. 9;
- ``student``:  the student with a virtual 1/4 path: c * path-wise FA (Eq. 6) with the frozen tutor
  + multi-path CE + KL(tutor pred4, student pred8), Eq. 10;
- ``head``:     the baseline objective with the pixel-shuffle prediction module (paper §5, Table 3).
  Any stage takes ``head="pixel_shuffle"``; ``preset("student", head="pixel_shuffle")`` is the
  combination of both ideas (the paper's future work).

The notebooks use exactly three names::

    cfg = preset("baseline", profile="quick", teacher="runs/teacher/best.pt", out_dir="runs/baseline")
    result = run_stage(cfg)            # StageResult(out_dir, last, best, metrics, eval[, arch])
    model, cfg = load_checkpoint(result.best)

The work is done below this module: :mod:`fasterkd.config` (configs, presets),
:mod:`fasterkd.data.loaders` (the data of a run), :mod:`fasterkd.distributed` (torchrun),
:mod:`fasterkd.engine` (checkpoints, objectives, the trainer, the search) and
:mod:`fasterkd.inference` (prediction and export); their public names are re-exported here.
A search run also writes ``arch.json``, ``arch_epoch{e}.json`` and ``history.json``.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from fasterkd.config import (
    DEFAULT_TEACHER,
    OVERRIDES,
    PROFILES,
    STAGES,
    DataConfig,
    GuideConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    SearchConfig,
    TrainConfig,
    apply_overrides,
    preset,
)
from fasterkd.data.loaders import (
    SeededTrainSet,
    build_train_set,
    build_val_loader,
    epoch_loader,
    open_split,
    resolve_data_root,
    synthetic_root,
    synthetic_subset,
)
from fasterkd.distributed import DistInfo, ddp_max_weight_diff, init_distributed
from fasterkd.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    build_network,
    check_resume_config,
    freeze,
    initialise_from,
    load_checkpoint,
    load_teacher,
    load_tutor,
    model_identity,
    read_checkpoint,
    rng_state,
    run_config,
    set_rng_state,
)
from fasterkd.engine.objective import NonFiniteLossError, Objective, build_convnorm
from fasterkd.engine.search import run_search
from fasterkd.engine.trainer import MetricsLog, StageResult, Trainer, autocast_dtype, run_evaluation
from fasterkd.inference import export_onnx, inference_model, predict_images
from fasterkd.utils import strict_json


def run_stage(cfg: TrainConfig, resume: bool | str | os.PathLike = False, overwrite: bool = False) -> StageResult:
    """Train one stage end to end (see the module docstring); returns a :class:`StageResult`.

    ``resume=True`` continues from ``out_dir/last.pt`` (a path: from that checkpoint); the next
    epochs are bit-identical on CPU to a run that never stopped. A folder that already holds a run
    is refused unless resuming or ``overwrite=True`` (which deletes its checkpoints first); a
    folder in use by another live run is refused (:class:`fasterkd.runlock.RunLockedError`).
    SIGINT/SIGTERM stop the run at the next step boundary with a resumable ``last.pt`` and raise
    :class:`fasterkd.engine.interrupts.RunInterrupted` (a ``KeyboardInterrupt``).
    """
    cfg = copy.deepcopy(cfg).validate()
    if cfg.stage == "search":
        return run_search(cfg, resume=resume, overwrite=overwrite)
    return Trainer(cfg, overwrite=overwrite).fit(resume)


def validation_items(source: TrainConfig | str | os.PathLike, count: int, data_root: str = "") -> list[dict[str, Any]]:
    """The first ``count`` validation items (normalised image, label, name) of a run's data.

    ``source`` is a :class:`TrainConfig` or a checkpoint whose config names the data;
    ``data_root`` (e.g. a Cityscapes root) replaces the config's when given. For the chapters that
    look at a few images of a trained run (FA histograms, Fig. 3).
    """
    from fasterkd.data.transforms import EvalTransform

    if int(count) != count or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    data = copy.deepcopy(run_config(source).data)
    if data_root:
        data.root = str(data_root)
    ds = open_split(data, data.val_split, EvalTransform())
    if len(ds) == 0:
        raise ValueError(f"the {data.val_split!r} split of {data.root or 'the synthetic data'} holds no images")
    return [ds[i] for i in range(min(int(count), len(ds)))]


__all__ = ["TrainConfig", "DataConfig", "OptimConfig", "LossConfig", "ModelConfig", "GuideConfig", "SearchConfig",
           "STAGES", "PROFILES", "OVERRIDES", "DEFAULT_TEACHER", "preset", "apply_overrides", "run_stage",
           "load_checkpoint", "read_checkpoint", "StageResult", "NonFiniteLossError", "validation_items",
           "build_network", "export_onnx", "predict_images", "inference_model", "resolve_data_root", "synthetic_root",
           "strict_json", "CHECKPOINT_FORMAT", "DistInfo", "init_distributed", "ddp_max_weight_diff", "MetricsLog",
           "Trainer", "Objective", "build_convnorm", "autocast_dtype", "run_evaluation", "SeededTrainSet",
           "build_train_set", "build_val_loader", "epoch_loader", "synthetic_subset", "model_identity", "freeze",
           "initialise_from", "load_teacher", "load_tutor", "rng_state", "set_rng_state", "check_resume_config"]
