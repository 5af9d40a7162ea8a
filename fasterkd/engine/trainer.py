"""The trainer of the stages after the search (teacher, baseline, tutor, student, head), and what it
shares with the search loop: the metrics log, the progress bar, mixed precision, the evaluation of a
possibly wrapped model and the result of a run.

Every stage runs under ``torchrun --nproc_per_node N`` (DistributedDataParallel; rank 0 writes).
Output folder: ``last.pt``, ``best.pt``, ``metrics.csv``, ``metrics.json``, ``eval.json``,
``config.json``, TensorBoard events (when ``tensorboard`` is importable).
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fasterkd.config import TrainConfig
from fasterkd.data.loaders import build_train_set, build_val_loader, epoch_batches, steps_per_epoch
from fasterkd.distributed import (
    DistInfo,
    barrier,
    ddp_max_weight_diff,
    global_images_per_step,
    init_distributed,
    mean_over_ranks,
    resolve_device,
    shutdown,
    unwrap,
)
from fasterkd.engine.checkpoint import (
    arch_spec,
    build_network,
    check_identity,
    check_resume_config,
    checkpoint_header,
    initialise_from,
    load_teacher,
    load_tutor,
    model_identity,
    read_checkpoint,
    rng_state,
    save_epoch,
    save_interrupted,
    set_rng_state,
)
from fasterkd.engine.interrupts import RunInterrupted, StopRequest, resume_hint, run_folder
from fasterkd.engine.objective import Objective, build_convnorm, check_finite
from fasterkd.utils import atomic_path, atomic_write_json, seed_everything, strict_json


@dataclass
class StageResult:
    """What ``run_stage`` returns: paths of the run's files, the metrics and the final evaluation."""

    out_dir: Path
    last: Path
    best: Path
    metrics: list[dict[str, Any]]
    eval: dict[str, Any]
    arch: Path | None = None


class MetricsLog:
    """Per-epoch rows to metrics.csv / metrics.json (atomically) and TensorBoard (optional)."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, rows: list[dict[str, Any]] | None = None):
        self.out_dir, self.enabled = out_dir, enabled
        self.rows: list[dict[str, Any]] = list(rows or [])
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(log_dir=str(out_dir / "tb"))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        epoch = row["epoch"]
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
                self.scalar(f"epoch/{k}", v, epoch)
        atomic_write_json(self.out_dir / "metrics.json", self.rows)
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.rows)
        with atomic_path(self.out_dir / "metrics.csv") as tmp:
            tmp.write_text(buf.getvalue())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def progress_bar(total: int, desc: str, enabled: bool | None, main: bool):
    """A tqdm bar on rank 0 (``enabled=None``: when stderr is a terminal), else None."""
    show = (sys.stderr.isatty() if enabled is None else enabled) and main
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def start_run_folder(out: Path, cfg: TrainConfig, info: DistInfo) -> None:
    """Rank 0 makes the run folder and writes ``config.json``."""
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", cfg.to_dict())


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or cfg.amp == "off":
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def run_evaluation(model: nn.Module, loader, device: torch.device) -> dict[str, Any]:
    """:func:`fasterkd.evaluate.evaluate` of the unwrapped model (it restores the training flag and
    returns plain Python numbers)."""
    from fasterkd.evaluate import evaluate

    return evaluate(unwrap(model), loader, device)


class Trainer:
    """One training run of a stage (teacher, baseline, tutor, student, head)."""

    def __init__(self, cfg: TrainConfig, overwrite: bool = False) -> None:
        self.cfg = cfg
        self.overwrite = overwrite  # replace a run already in out_dir (else refused unless resuming)
        self.stop = StopRequest()
        self._partial: dict[str, Any] | None = None  # the interrupted epoch a resume continues
        self.device = resolve_device(cfg.device)
        self.info = init_distributed(self.device)
        self.out = Path(cfg.out_dir)
        self._check_stage_inputs()

    def _check_stage_inputs(self) -> None:
        cfg, st = self.cfg, self.cfg.stage
        from fasterkd.models import HRNET_NAMES

        if st == "teacher" and cfg.model.name not in HRNET_NAMES:
            raise ValueError(f"the teacher stage trains an HRNet ({HRNET_NAMES}), got model {cfg.model.name!r}")
        if st in ("baseline", "tutor", "head", "student") and cfg.model.name not in ("student", "tutor"):
            raise ValueError(f"stage {st!r} trains a student or tutor, got model {cfg.model.name!r}")
        if st in ("baseline", "tutor", "head") and cfg.guide.teacher is None and cfg.loss.kd_weight > 0:
            raise ValueError(f"stage {st!r} distils from HRNet: give teacher=<checkpoint> (a teacher run or an "
                             "official HRNet file), or kd_weight=0 to train without it")
        if st == "student" and cfg.guide.tutor is None:
            raise ValueError("stage 'student' distils from the tutor (Eq. 10): give tutor=<checkpoint of a tutor run>")
        if st == "student" and cfg.loss.fa_weight > 0:
            lasts = sorted(arch_spec(cfg).lasts)
            if lasts != [1, 2]:
                raise ValueError(f"arch={cfg.model.arch or 'official'!r} has branches ending at {lasts} (0: 1/8, "
                                 "1: 1/16, 2: 1/32); the FA loss (Eq. 6) needs a student with a 1/16 and a 1/32 "
                                 "branch, [2, 1]: search with search.lasts=[[2, 1]], or fa_weight=0")

    # -- set-up ------------------------------------------------------------------------------

    def _build(self) -> None:
        cfg, dev = self.cfg, self.device
        seed_everything(cfg.seed)  # the same initial weights on every rank, the same draws on every run
        model = build_network(cfg)
        self.init_fresh: list[str] = []
        if cfg.model.init is not None:
            self.init_fresh = initialise_from(model, cfg)
        self.identity = model_identity(model, cfg)
        model.to(dev)
        if dev.type == "cuda" and cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.info.enabled and dev.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        teacher = load_teacher(cfg, dev) if cfg.guide.teacher is not None and cfg.stage != "teacher" else None
        tutor = load_tutor(cfg, dev) if cfg.stage == "student" else None
        convnorm = build_convnorm(model, tutor, cfg, dev) if tutor is not None and cfg.loss.fa_convnorm else None
        self.objective = Objective(cfg, teacher, tutor, convnorm).to(dev)
        params = list(model.parameters()) + list(self.objective.parameters())
        self.optimizer = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                         weight_decay=cfg.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=cfg.optim.lr_decay)
        self.amp_dtype = autocast_dtype(cfg, dev)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.ddp_model = model
        if self.info.enabled:
            ids = [dev.index] if dev.type == "cuda" else None
            # find_unused_parameters: FasterSeg's FFM channel attention is built (official weights,
            # parameter counts) but never run, so its weights get no gradient
            self.ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
        self.step_model = torch.compile(self.ddp_model) if cfg.compile else self.ddp_model

    def _state(self, epoch: int, step: int, best: float, rows: list[dict]) -> dict[str, Any]:
        return {
            **checkpoint_header(self.cfg, self.identity, unwrap(self.model)),
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "epoch": epoch,  # epochs completed
            "step": step,
            "best_miou": best,
            "metrics": rows,
            "partial": None,
        }

    def _resume(self, resume: bool | str | os.PathLike) -> tuple[int, int, float, list[dict]]:
        path = self.out / "last.pt" if resume is True else Path(resume)
        ckpt = read_checkpoint(path, "cpu")
        check_resume_config(ckpt["config"], self.cfg, str(path))
        check_identity(ckpt["identity"], self.identity, str(path), "run")
        unwrap(self.model).load_state_dict(ckpt["model"])
        self.objective.load_state_dict(ckpt["objective"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self._partial = ckpt.get("partial")
        return int(ckpt["epoch"]), int(ckpt["step"]), float(ckpt["best_miou"]), list(ckpt["metrics"])

    # -- the loop ----------------------------------------------------------------------------

    def fit(self, resume: bool | str | os.PathLike = False) -> StageResult:
        """Train (rank 0 holding the folder's run lock); SIGINT/SIGTERM raise :class:`RunInterrupted`
        after writing a resumable ``last.pt`` at the next step boundary."""
        with run_folder(self.out, resume, self.overwrite, self.info.main) as self.stop:
            return self._fit(resume)

    def _fit(self, resume: bool | str | os.PathLike) -> StageResult:
        cfg, info, dev = self.cfg, self.info, self.device
        try:
            train_set = build_train_set(cfg, info)
            val_loader = build_val_loader(cfg, info)
            self._build()
            start, step, best, rows = 0, 0, -1.0, []
            if resume:
                start, step, best, rows = self._resume(resume)
            start_run_folder(self.out, cfg, info)
            log = MetricsLog(self.out, info.main, cfg.tensorboard, rows)
            last, best_path = self.out / "last.pt", self.out / "best.pt"
            best_eval = None  # the evaluation of the weights in best.pt, when this process made it
            for epoch in range(start, cfg.epochs):
                self._best = best
                row, step = self._train_epoch(train_set, epoch, step, log, last)
                self.scheduler.step()
                ev = None
                if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                    ev = run_evaluation(self.ddp_model, val_loader, dev)
                    row.update(val_miou=ev["miou"], val_pixel_acc=ev["pixel_acc"])
                if cfg.ddp_sync_check:
                    row["ddp_max_weight_diff"] = ddp_max_weight_diff(self.model, info)
                log.add(row)
                score = row.get("val_miou", -1.0)
                # eval_every=0 scores no epoch: the latest weights are then the best known ones
                improved = score > best or not best_path.exists() or not cfg.eval_every
                best = max(best, score)
                if improved:
                    best_eval = ev
                if info.main:
                    save_epoch(self._state(epoch + 1, step, best, log.rows), last, best_path, improved)
                barrier(info)
                if self.stop.requested and epoch + 1 < cfg.epochs:  # stopped in the epoch's last step
                    raise RunInterrupted(self.stop.signum, epoch + 1, step, last, resume_hint())
            log.close()
            final: dict[str, Any] = {}
            if cfg.final_eval:
                # the final full-resolution evaluation of the best checkpoint (spec §9.5); when this
                # process evaluated exactly those weights at their epoch, that evaluation is it
                if best_path.exists():
                    unwrap(self.model).load_state_dict(read_checkpoint(best_path)["model"])
                final = dict(best_eval) if best_eval is not None else run_evaluation(self.ddp_model, val_loader, dev)
                final["checkpoint"] = str(best_path)
                if info.main:
                    atomic_write_json(self.out / "eval.json", strict_json(final))
            return StageResult(self.out, last, best_path, log.rows, final)
        finally:
            shutdown(info)

    def _train_epoch(self, train_set, epoch: int, step: int, log: MetricsLog, last: Path) -> tuple[dict, int]:
        cfg, dev = self.cfg, self.device
        n_steps = steps_per_epoch(cfg, train_set, self.info)
        loader = epoch_batches(train_set, cfg, epoch, self.info, n_steps)
        self.ddp_model.train()
        sums: dict[str, float] = {}
        images, local_images, t0 = 0, 0, time.perf_counter()
        bar = progress_bar(n_steps, f"{cfg.stage} {epoch + 1}/{cfg.epochs}", cfg.progress, self.info.main)
        lr = self.optimizer.param_groups[0]["lr"]
        skip, self._partial = self._partial or {"batch": 0}, None  # an interrupted epoch: its first steps are done
        if skip["batch"]:
            sums, images = dict(skip["sums"]), int(skip["images"])
            local_images = images // self.info.world  # every rank's batches have the same size
        rng = rng_state() if skip["batch"] else None
        batches = iter(loader)
        for _ in range(skip["batch"]):  # fast-forward over the done steps: each new pass draws a
            next(batches)               # loader seed from the global RNG, which the snapshot holds
        if rng is not None:  # the interrupted run's RNG as it was before its next batch
            set_rng_state(rng)
        for i, batch in enumerate(batches, start=skip["batch"]):
            if i >= n_steps:
                break
            image = batch["image"].to(dev, non_blocking=True)
            label = batch["label"].to(dev, non_blocking=True)
            if dev.type == "cuda" and cfg.channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                loss, terms = self.objective(self.step_model, image, label)
            total, values = check_finite(loss, terms, step=step, epoch=epoch, batch=i, last=last)
            self.scaler.scale(loss).backward()
            if cfg.optim.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            step += 1
            images += image.shape[0] * self.info.world
            local_images += image.shape[0]
            for k, v in {"loss": total, **values}.items():
                sums[k] = sums.get(k, 0.0) + v
            log.scalar("step/loss", total, step)
            if bar is not None:
                bar.set_postfix(loss=f"{total:.3f}", img_s=f"{images / (time.perf_counter() - t0):.1f}")
                bar.update(1)
            if self.stop.requested and i + 1 < n_steps:
                self._interrupt(epoch, i + 1, step, sums, images, log, last)
        if bar is not None:
            bar.close()
        dt = time.perf_counter() - t0
        done = max(1, n_steps)
        means = mean_over_ranks({k: v / done for k, v in sums.items()}, self.info)  # the epoch's mean over ranks
        row = {"epoch": epoch + 1, "lr": lr, **means, "images_per_s": images / dt, "epoch_s": dt,
               "steps": n_steps, "images_per_step": global_images_per_step(local_images, n_steps, self.info)}
        return row, step

    def _interrupt(self, epoch: int, batch: int, step: int, sums: dict[str, float], images: int,
                   log: MetricsLog, last: Path) -> None:
        """Write a ``last.pt`` that resumes after ``batch`` steps of ``epoch``, then raise RunInterrupted."""
        state = self._state(epoch, step, self._best, log.rows)
        state["partial"] = {"batch": batch, "sums": dict(sums), "images": images}
        if self.info.main:
            save_interrupted(state, last)
        barrier(self.info)
        raise RunInterrupted(self.stop.signum, epoch + 1, step, last, resume_hint())
