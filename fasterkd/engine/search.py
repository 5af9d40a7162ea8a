"""Teacher-guided architecture search (paper §3.3, Eq. 7) on FasterSeg's supernet.

First-order DARTS on two halves of the training set (FasterSeg spec §6):

1. pretrain epochs: weights only, sandwich rule ``max + min + random + random`` (spec §4.5);
2. search epochs, every iteration (spec §6.3):
   - architecture step on Train-2: ``L = L_seg + lambda1 * Lat + lambda2 * Dist(M, HR)`` (Eq. 7),
     Adam(3e-4, betas (0.5, 0.999)) on alpha/beta/gamma;
   - weight step on Train-1: ``L_seg`` only, SGD with global-norm clipping 5.

``L_seg`` is the sum over the five supernet heads of OHEM CE, for the Gumbel-sampled student
widths and for the ``max`` and ``min`` widths (FasterSeg's sandwich rule without its co-searched
teacher term: the paper's teacher is HRNet). ``Dist`` is the KL between HRNet's prediction and each
of the five heads of the sampled student (summed like ``L_seg``). ``Lat`` is the decoupled LUT
latency (spec §5.2), from the official table or one measured on this device (``fasterkd
latency-table``, or ``latency_table="measure"`` for the configured space and ``latency_input``).

After every search epoch the student is derived for each candidate branch set (``[2, 0]``,
``[2, 1]``), its LUT latency gives the FPS, and lambda1 is halved above ``fps_max`` and doubled
below ``fps_min`` (spec §5.3). The branch set with the best ``objective(mIoU, latency)`` is written
to ``arch_epoch{e}.json`` and ``arch.json``; ``history.json`` holds the softmaxes of alpha, beta
and gamma, the latencies and lambda1 per epoch for the book's plots.

The supernet holds one architecture (the student, ``arch_ratio`` widths): the teacher is HRNet.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fasterkd.config import TrainConfig
from fasterkd.data.loaders import build_train_set, build_val_loader, epoch_batches, steps_per_epoch, train_transform
from fasterkd.distributed import (
    DistInfo,
    average_gradients,
    barrier,
    broadcast_buffers,
    ddp_max_weight_diff,
    global_images_per_step,
    init_distributed,
    mean_over_ranks,
    resolve_device,
    shutdown,
)
from fasterkd.engine.checkpoint import (
    check_resume_config,
    checkpoint_header,
    model_identity,
    load_teacher,
    read_checkpoint,
    rng_state,
    save_epoch,
    save_interrupted,
    set_rng_state,
    supernet_kwargs,
)
from fasterkd.engine.interrupts import RunInterrupted, StopRequest, resume_hint, run_folder
from fasterkd.engine.objective import check_finite
from fasterkd.engine.trainer import (
    MetricsLog,
    StageResult,
    autocast_dtype,
    progress_bar,
    run_evaluation,
    start_run_folder,
)
from fasterkd.models.latency import decoupled_latency
from fasterkd.models.outputs import SegOutput
from fasterkd.utils import atomic_write_json, seed_everything

ARCH = 0  # the single (student) architecture of the search supernet
EVAL_HEAD = "8s_32s"  # FasterSeg validates the "8s_32s" and "16s_32s" heads (spec §6.4)


class SupernetView(nn.Module):
    """A supernet seen as a segmentation model: one head at one width mode, as a ``SegOutput``.

    Pads the input to a multiple of 32 (the supernet needs it) and crops the logits back.
    """

    def __init__(self, supernet: nn.Module, head: str = EVAL_HEAD, mode: str = "max") -> None:
        super().__init__()
        self.supernet, self.head, self.mode = supernet, head, mode

    def forward(self, image: Tensor) -> SegOutput:
        from fasterkd.models.student import pad_to_multiple

        h, w = image.shape[-2:]
        preds = self.supernet(pad_to_multiple(image), ARCH, self.mode)
        logits = preds[self.head]
        if not self.training:
            logits = logits[..., :h, :w]
        return SegOutput(pred8=logits)


def load_latency_table(cfg: TrainConfig, out_dir: Path, device: torch.device, main: bool) -> dict[str, float]:
    """The LUT: ``"official"`` (spec §5.1), a table path, or ``"measure"`` (cached in out_dir)."""
    from fasterkd.models import latency

    src = cfg.search.latency_table
    if src == "official":
        return latency.load_official_lut()
    if src == "measure":
        path = out_dir / "latency_table.json"
        if not path.is_file() and main:
            # timing builds and runs every op, which draws from the seeded generators: restore them,
            # so a run that measures its table and one that finds it cached train identically
            seeded = rng_state()
            kw = supernet_kwargs(cfg)
            latency.measure_latency_table(path, input_size=tuple(cfg.search.latency_input), device=device, repeats=3,
                                          fch=kw.get("fch", 12), width_mult_list=kw.get("width_mult_list", (4 / 12, 6 / 12, 8 / 12, 10 / 12, 1.0)),
                                          stem_head_widths=kw["stem_head_widths"], num_classes=cfg.model.num_classes,
                                          warmup=1)
            set_rng_state(seeded)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return latency.load_lut(path)
    return latency.load_lut(src)


def seg_terms(preds: dict[str, Tensor], label: Tensor, cfg: TrainConfig) -> Tensor:
    """Sum over the five supernet heads of (OHEM) CE (spec §4.5, §9.2)."""
    from fasterkd.losses import cross_entropy, ohem_cross_entropy

    lc = cfg.loss
    if lc.ohem:
        return sum(ohem_cross_entropy(p, label, lc.ohem_thresh, lc.ohem_min_kept) for p in preds.values())
    return sum(cross_entropy(p, label) for p in preds.values())


def dist_term(preds: dict[str, Tensor], teacher_logits: Tensor, label: Tensor, cfg: TrainConfig) -> Tensor:
    """Dist(M, HR) of Eq. 7: KL(HRNet || each head of the sampled student), summed over the heads."""
    from fasterkd.losses import kl_distill

    return sum(kl_distill(p.float(), teacher_logits.float(), temperature=cfg.loss.kd_temperature,
                          reduction=cfg.loss.kd_reduction, target=label) for p in preds.values())


def softmaxes(net: nn.Module) -> dict[str, list[list[float]]]:
    """alpha / beta / gamma (ratio) softmaxes of the student arch, for the history plots."""
    return {name: torch.softmax(t.float(), -1).tolist() for name, t in net.arch_tensors(ARCH).items()}


class Searcher:
    """One search run; the checkpoint holds both optimisers, lambda1 and the history."""

    def __init__(self, cfg: TrainConfig, overwrite: bool = False) -> None:
        self.overwrite, self.stop, self._partial = overwrite, StopRequest(), None
        if cfg.guide.teacher is None and cfg.loss.kd_weight > 0:
            raise ValueError("the search distils from HRNet (Eq. 7): give teacher=<checkpoint>, or kd_weight=0 "
                             "for FasterSeg's objective without it")
        if cfg.model.name != "supernet":
            raise ValueError(f"the search stage trains the supernet, got model {cfg.model.name!r}")
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.info: DistInfo = init_distributed(self.device)
        self.out = Path(cfg.out_dir)

    def _build(self) -> None:
        from fasterkd.models.supernet import Supernet, SupernetConfig

        cfg, dev = self.cfg, self.device
        seed_everything(cfg.seed)  # the sandwich rule's random widths draw from Python's random
        self.net = Supernet(SupernetConfig(num_classes=cfg.model.num_classes, **supernet_kwargs(cfg))).to(dev)
        self.identity = model_identity(self.net, cfg)
        self.teacher = load_teacher(cfg, dev) if cfg.guide.teacher is not None and cfg.loss.kd_weight > 0 else None
        s = cfg.search
        self.w_opt = torch.optim.SGD(self.net.weight_parameters(), lr=s.pretrain_lr or cfg.optim.lr,
                                     momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
        self.sched = torch.optim.lr_scheduler.ExponentialLR(self.w_opt, gamma=cfg.optim.lr_decay)
        self.a_opt = torch.optim.Adam(self.net.arch_parameters(ARCH), lr=s.arch_lr, betas=tuple(s.arch_betas),
                                      weight_decay=0.0)
        self.amp_dtype = autocast_dtype(cfg, dev)
        self.latency_weight = s.latency_weight
        self.fps_range: list[float] | None = None if s.fps_min is None else [s.fps_min, s.fps_max]
        self.history: list[dict[str, Any]] = []
        # no DistributedDataParallel wrapper: a step runs the supernet several times (sandwich rule,
        # Eq. 7's max/min terms) before one backward, which DDP's reducer refuses; the ranks average
        # their gradients with average_gradients() instead

    # -- checkpoint --------------------------------------------------------------------------

    def _state(self, epoch: int, step: int, rows: list[dict]) -> dict[str, Any]:
        return {
            **checkpoint_header(self.cfg, self.identity, self.net),
            "optimizer": self.w_opt.state_dict(), "arch_optimizer": self.a_opt.state_dict(),
            "scheduler": self.sched.state_dict(), "rng": rng_state(), "epoch": epoch, "step": step,
            "latency_weight": self.latency_weight, "fps_range": self.fps_range, "history": self.history,
            "metrics": rows, "best_miou": max([r.get("val_miou", -1.0) for r in rows] + [-1.0]),
            "partial": None,
        }

    def _resume(self, resume) -> tuple[int, int, list[dict]]:
        path = self.out / "last.pt" if resume is True else Path(resume)
        ckpt = read_checkpoint(path)
        check_resume_config(ckpt["config"], self.cfg, str(path))
        self.net.load_state_dict(ckpt["model"])
        self.w_opt.load_state_dict(ckpt["optimizer"])
        self.a_opt.load_state_dict(ckpt["arch_optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        self.latency_weight = float(ckpt["latency_weight"])
        self.fps_range = ckpt["fps_range"]
        self.history = list(ckpt["history"])
        self._partial = ckpt.get("partial")
        return int(ckpt["epoch"]), int(ckpt["step"]), list(ckpt["metrics"])

    # -- the loop ----------------------------------------------------------------------------

    def fit(self, resume=False) -> StageResult:
        """Search (rank 0 holding the folder's run lock); SIGINT/SIGTERM raise RunInterrupted after
        writing a resumable ``last.pt`` at the next step boundary."""
        with run_folder(self.out, resume, self.overwrite, self.info.main) as self.stop:
            return self._fit(resume)

    def _fit(self, resume) -> StageResult:
        cfg, info = self.cfg, self.info
        try:
            full = build_train_set(cfg, info)
            # the two halves (spec §6.1): a fixed shuffle of the indices, first half for the weights
            order = torch.randperm(len(full.base), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
            cut = int(len(order) * cfg.search.split_fraction)
            if cut < 1 or cut >= len(order):
                raise ValueError(f"the training set ({len(order)} images) is too small to split in two halves")
            half_w, half_a = copy.copy(full), copy.copy(full)
            half_w.base = torch.utils.data.Subset(full.base, order[:cut])
            half_a.base = torch.utils.data.Subset(full.base, order[cut:])
            self.split_images = len(order)
            self.transforms = {False: full.transform, True: train_transform(cfg, cfg.search.crop)}
            val_loader = build_val_loader(cfg, info)
            self._build()
            start, step, rows = 0, 0, []
            if resume:
                start, step, rows = self._resume(resume)
            start_run_folder(self.out, cfg, info)
            self.lut = load_latency_table(cfg, self.out, self.device, info.main)
            log = MetricsLog(self.out, info.main, cfg.tensorboard, rows)
            pre = cfg.search.pretrain_epochs
            total = pre + cfg.epochs
            last, best_path = self.out / "last.pt", self.out / "best.pt"
            arch_path = self.out / "arch.json"
            for epoch in range(start, total):
                searching = epoch >= pre
                if epoch == pre and cfg.search.pretrain_lr:
                    # FasterSeg restarts the weight lr at the search value after pretraining
                    for g in self.w_opt.param_groups:
                        g["lr"] = cfg.optim.lr
                    self.sched.base_lrs = [cfg.optim.lr for _ in self.sched.base_lrs]
                self._rows = log.rows
                row, step = self._epoch(half_w, half_a, epoch, step, searching, last)
                self.sched.step()
                row.update(self._after_epoch(epoch, searching, val_loader))
                if cfg.ddp_sync_check:
                    row["ddp_max_weight_diff"] = ddp_max_weight_diff(self.net, info)
                log.add(row)
                if info.main:
                    improved = not best_path.exists() or row.get("val_miou", -1) >= max(r.get("val_miou", -1)
                                                                                         for r in log.rows)
                    save_epoch(self._state(epoch + 1, step, log.rows), last, best_path, improved)
                barrier(info)
                if self.stop.requested and epoch + 1 < total:  # stopped in the epoch's last step
                    raise RunInterrupted(self.stop.signum, epoch + 1, step, last, resume_hint())
            log.close()
            final = {k: v for k, v in (self.history[-1] if self.history else {}).items()
                     if k in ("epoch", "lasts", "latency_ms", "fps", "objective", "val_miou")}
            if info.main:
                atomic_write_json(self.out / "eval.json", final)
            return StageResult(self.out, last, best_path, log.rows, final, arch=arch_path if arch_path.exists() else None)
        finally:
            shutdown(info)

    def _epoch(self, half_w, half_a, epoch: int, step: int, searching: bool, last: Path) -> tuple[dict, int]:
        cfg, dev, net = self.cfg, self.device, self.net
        # the pretrain crop (data.crop) or the search crop (search.crop; FasterSeg: 224x448)
        half_w.transform = half_a.transform = self.transforms[searching]
        n = steps_per_epoch(cfg, half_w, self.info, split_images=self.split_images)
        if searching and cfg.iters_per_epoch is None:
            n = min(n, steps_per_epoch(cfg, half_a, self.info))
        loader_w = epoch_batches(half_w, cfg, epoch, self.info, n)
        loader_a = epoch_batches(half_a, cfg, epoch, self.info, n, salt=1) if searching else None
        self.net.train()
        sums: dict[str, float] = {}
        t0, images, local_images = time.perf_counter(), 0, 0
        bar = progress_bar(n, f"{'search' if searching else 'pretrain'} {epoch + 1}", cfg.progress, self.info.main)
        rng = rng_state() if self._partial else None
        it_a = iter(loader_a) if loader_a is not None else None
        it_w = iter(loader_w)  # iterators draw their base seed from the global RNG
        if rng is not None:  # the interrupted run's RNG snapshot already includes those draws
            set_rng_state(rng)
        lr = self.w_opt.param_groups[0]["lr"]
        ac = dict(device_type=dev.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        skip, self._partial = self._partial or {"batch": 0}, None  # an interrupted epoch: its first steps are done
        if skip["batch"]:
            sums, images = dict(skip["sums"]), int(skip["images"])
        for i, batch in enumerate(it_w):
            if i >= n:
                break
            if i < skip["batch"]:
                if it_a is not None:
                    next(it_a)
                continue
            terms: dict[str, Tensor] = {}
            if searching:
                # architecture step on Train-2 (Eq. 7), first order
                ab = next(it_a)
                xa, ya = ab["image"].to(dev), ab["label"].to(dev)
                self.a_opt.zero_grad(set_to_none=True)
                with torch.autocast(**ac):
                    preds = self.net(xa, ARCH, "arch_ratio")
                    seg = seg_terms(preds, ya, cfg)
                    for mode in ("max", "min"):
                        seg = seg + seg_terms(self.net(xa, ARCH, mode), ya, cfg)
                    arch_loss = seg
                    if self.teacher is not None:
                        with torch.no_grad():
                            t = self.teacher(xa).main
                        terms["dist"] = cfg.loss.kd_weight * dist_term(preds, t, ya, cfg)
                        arch_loss = arch_loss + terms["dist"]
                lat = decoupled_latency(net, ARCH, self.lut, input_size=tuple(cfg.search.latency_input))
                terms["arch_seg"], terms["latency_ms"] = seg, lat
                arch_total = arch_loss + self.latency_weight * lat
                check_finite(arch_total, terms, step=step, epoch=epoch, batch=i, last=last, what="search loss")
                arch_total.backward()
                average_gradients(list(net.arch_parameters(ARCH)), self.info)
                self.a_opt.step()
            # weight step on Train-1: L_seg only (the May 2021 fix: clear the arch step's weight grads)
            x, y = batch["image"].to(dev), batch["label"].to(dev)
            self.w_opt.zero_grad(set_to_none=True)
            modes = ("arch_ratio", "max", "min") if searching else ("max", "min", "random", "random")
            with torch.autocast(**ac):
                loss = sum(seg_terms(self.net(x, ARCH, m), y, cfg) for m in modes)
            terms["seg"] = loss
            check_finite(loss, terms, step=step, epoch=epoch, batch=i, last=last, what="search loss")
            loss.backward()
            average_gradients(list(net.weight_parameters()), self.info)
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(net.weight_parameters(), cfg.optim.grad_clip)
            self.w_opt.step()
            step += 1
            images += x.shape[0] * self.info.world
            local_images += x.shape[0]
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            if bar is not None:
                bar.set_postfix(loss=f"{float(loss):.3f}", img_s=f"{images / (time.perf_counter() - t0):.1f}")
                bar.update(1)
            if self.stop.requested and i + 1 < n:
                self._interrupt(epoch, i + 1, step, sums, images, last)
        if bar is not None:
            bar.close()
        broadcast_buffers(net, self.info)  # every rank validates and derives with rank 0's BN statistics
        dt = time.perf_counter() - t0
        means = mean_over_ranks({k: v / max(1, n) for k, v in sums.items()}, self.info)  # the epoch's mean terms
        row = {"epoch": epoch + 1, "phase": "search" if searching else "pretrain", "lr": lr,
               **means, "images_per_s": images / dt, "epoch_s": dt, "steps": n,
               "images_per_step": global_images_per_step(local_images, n, self.info)}
        if searching:
            row["latency_weight"] = self.latency_weight
        return row, step

    def _interrupt(self, epoch: int, batch: int, step: int, sums: dict[str, float], images: int, last: Path) -> None:
        """Write a ``last.pt`` that resumes after ``batch`` steps of ``epoch``, then raise RunInterrupted."""
        state = self._state(epoch, step, self._rows)
        state["partial"] = {"batch": batch, "sums": dict(sums), "images": images}
        if self.info.main:
            save_interrupted(state, last)
        barrier(self.info)
        raise RunInterrupted(self.stop.signum, epoch + 1, step, last, resume_hint())

    def _after_epoch(self, epoch: int, searching: bool, val_loader) -> dict[str, Any]:
        """Validate, derive the candidates, adapt lambda1 (spec §5.3), write the arch files."""
        from fasterkd.models.arch_search import objective
        from fasterkd.models.latency import network_latency

        cfg, s = self.cfg, self.cfg.search
        out: dict[str, Any] = {}
        if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == s.pretrain_epochs + cfg.epochs):
            view = SupernetView(self.net, EVAL_HEAD, "max")
            ev = run_evaluation(view, val_loader, self.device)
            out["val_miou"], out["val_pixel_acc"] = ev["miou"], ev["pixel_acc"]
        if not searching:
            return out
        miou = out.get("val_miou", 0.0)
        miou = 0.0 if miou is None or miou != miou else miou
        cands = []
        for lasts in s.lasts:
            spec = self.net.derive(ARCH, list(lasts))
            lat = network_latency(spec, self.lut, tuple(s.latency_input), cfg.model.num_classes)
            cands.append({"lasts": list(lasts), "latency_ms": lat, "fps": 1000.0 / lat,
                          "objective": float(objective(max(miou, 1e-6), lat, target=s.target_ms)), "spec": spec})
        if self.fps_range is None:
            # no absolute FPS target (a tiny space on a CPU): aim 10-30 % faster than the first derivation
            f0 = max(c["fps"] for c in cands)
            self.fps_range = [1.1 * f0, 1.3 * f0]
        fps_min, fps_max = self.fps_range
        if any(c["fps"] >= fps_max for c in cands):
            self.latency_weight /= 2
        elif any(c["fps"] <= fps_min for c in cands):
            self.latency_weight *= 2
        best = max(cands, key=lambda c: c["objective"])
        record = {"epoch": epoch + 1, "lasts": best["lasts"], "latency_ms": best["latency_ms"], "fps": best["fps"],
                  "objective": best["objective"], "val_miou": out.get("val_miou"),
                  "candidates": [{k: v for k, v in c.items() if k != "spec"} for c in cands],
                  "latency_weight_next": self.latency_weight, "fps_range": list(self.fps_range),
                  "softmax": softmaxes(self.net)}
        self.history.append(record)
        if self.info.main:
            best["spec"].save(self.out / f"arch_epoch{epoch + 1}.json")
            best["spec"].save(self.out / "arch.json")
            atomic_write_json(self.out / "history.json", self.history)
        out.update(derived_latency_ms=best["latency_ms"], derived_fps=best["fps"], objective=best["objective"])
        return out


def run_search(cfg: TrainConfig, resume: bool | str | os.PathLike = False, overwrite: bool = False) -> StageResult:
    """Run the search stage (called by :func:`fasterkd.train.run_stage`)."""
    return Searcher(cfg, overwrite=overwrite).fit(resume)


__all__ = ["run_search", "Searcher", "SupernetView", "load_latency_table", "seg_terms", "dist_term", "softmaxes"]
