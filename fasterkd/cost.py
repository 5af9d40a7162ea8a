"""What a network costs: parameters, multiply-accumulates, FLOPs and latency.

Three different numbers hide behind the word "FLOPs" in the segmentation literature, so each
function here says which one it returns (DESIGN.md, *Counting*):

- :func:`count_macs`: conv and linear multiply-accumulates of one eval-mode forward of a
  ``1 x 3 x H x W`` image (weight elements x output pixels). FasterSeg's "27 G FLOPs" and the
  HRNet README's "GFLOPs" are this number.
- :func:`count_flops`: what ``torch.utils.flop_counter.FlopCounterMode`` counts: 2 per
  multiply-accumulate of every matmul-like op (conv, linear, bmm, ...), so OCR's attention
  products appear here and not in the MACs.
- :func:`inference_parameters`: parameters of the modules that take part in an eval forward;
  auxiliary heads (not run in eval) and FFM's attention (never run in FasterSeg) are left out.

:func:`head_cost_sweep` puts the paper's §5 formulas for the two prediction modules (bilinear x8
and pixel shuffle) beside these counts over a grid of C (channels into the FFM) and N (classes).

Counting runs on whatever device the model lives on; build large models under
``torch.device("meta")`` and nothing is allocated or computed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor, nn

from fasterkd.utils import parse_size, pick_device

if TYPE_CHECKING:
    from fasterkd.models.arch import ArchSpec

_COUNTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _dummy_input(model: nn.Module, size: tuple[int, int] | str) -> torch.Tensor:
    h, w = parse_size(size, "size")
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {h}x{w}")
    return torch.zeros(1, 3, h, w, device=_model_device(model))


class _EvalForward:
    """Run one eval-mode, no-grad forward with hooks; restore the training flag afterwards."""

    def __init__(self, model: nn.Module, size: tuple[int, int] | str) -> None:
        self.model, self.x = model, _dummy_input(model, size)

    def run(self, hook=None) -> None:
        handles = [m.register_forward_hook(hook) for m in self.model.modules()] if hook is not None else []
        was = self.model.training
        try:
            self.model.eval()
            with torch.no_grad():
                self.model(self.x)
        finally:
            self.model.train(was)
            for h in handles:
                h.remove()


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """All parameters of ``model`` (shared tensors once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def inference_parameters(model: nn.Module, size: tuple[int, int] | str = (256, 512)) -> int:
    """Parameters owned by the modules that run in an eval forward at ``size`` (HxW)."""
    ran: list[nn.Module] = []
    _EvalForward(model, size).run(lambda m, i, o: ran.append(m))
    seen: set[int] = set()
    total = 0
    for m in ran:
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def _out_elements_per_channel(out: torch.Tensor, m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return out.numel() // m.out_features  # rows that each saw the full weight
    return out[0, 0].numel() * out.shape[0]  # spatial positions x batch


def count_macs(model: nn.Module, size: tuple[int, int] | str = (1024, 2048)) -> int:
    """Conv + linear multiply-accumulates of one eval forward of a 1x3xHxW image.

    Per layer: weight elements x output positions (the official FasterSeg/HRNet rule), so a
    grouped or depthwise conv counts its reduced weight; biases, BatchNorm, interpolation and
    activations are not multiply-accumulates of a weight and are left out.
    """
    total = 0

    def hook(m: nn.Module, inputs: Any, out: Any) -> None:
        nonlocal total
        if isinstance(m, _COUNTED) and isinstance(out, torch.Tensor):
            total += m.weight.numel() * _out_elements_per_channel(out, m)

    _EvalForward(model, size).run(hook)
    return int(total)


def count_flops(model: nn.Module, size: tuple[int, int] | str = (1024, 2048)) -> int:
    """FLOPs of one eval forward as ``torch.utils.flop_counter`` counts them (2 per MAC of matmul-like ops)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        _EvalForward(model, size).run()
    return int(counter.get_total_flops())


def model_cost(model: nn.Module, size: tuple[int, int] | str = (1024, 2048)) -> dict[str, int]:
    """``{"params", "params_inference", "macs", "flops"}`` of ``model`` at input ``size`` (HxW)."""
    return {
        "params": count_parameters(model),
        "params_inference": inference_parameters(model, size),
        "macs": count_macs(model, size),
        "flops": count_flops(model, size),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(model: nn.Module, size: tuple[int, int] | str, device: str | torch.device = "auto",
                    warmup: int = 5, repeats: int = 20, batch: int = 1) -> dict[str, Any]:
    """Eval-mode latency of one forward: ``warmup`` untimed runs, then the median of ``repeats`` runs.

    Each timed run is bracketed by device synchronisation, so CUDA times are the kernels' and not
    the launch's. Returns milliseconds: ``{"median_ms", "mean_ms", "min_ms", "max_ms", "repeats",
    "warmup", "device", "input"}``. The model is moved to ``device``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    h, w = parse_size(size, "size")
    dev = pick_device(device)
    model = model.to(dev).eval()
    x = torch.randn(batch, 3, h, w, device=dev)
    times: list[float] = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            _sync(dev)
            start = time.perf_counter()
            model(x)
            _sync(dev)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return {
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "repeats": repeats,
        "warmup": warmup,
        "device": str(dev),
        "input": [batch, 3, h, w],
    }


def tutor_design_table(arch: "ArchSpec | None" = None, size: tuple[int, int] = (1024, 2048),
                       param_tol: float = 0.05e6, macs_tol: float = 3e9) -> list[dict[str, Any]]:
    """Parameters used at inference and conv MACs at ``size`` of each reading in :data:`TUTOR_DESIGNS`.

    Built on the meta device (nothing allocated). ``arch`` None: the official student. Each row:
    ``design``, ``options``, ``params``, ``macs``, ``quarter_params`` / ``quarter_macs`` (on top of
    the student), ``fits_table_1`` (within ``param_tol`` of 3.9 M and ``macs_tol`` of 100 G) and
    ``text`` (what the paper's text says about the design).
    """
    from fasterkd.models import official_arch
    from fasterkd.models.student import FasterSegStudent, StudentConfig
    from fasterkd.models.tutor import TABLE_1_TUTOR, TUTOR_DESIGNS, Tutor, TutorConfig

    arch = arch or official_arch()
    with torch.device("meta"):
        student = FasterSegStudent(StudentConfig(arch=arch))
        s_params, s_macs = inference_parameters(student, size), count_macs(student, size)
        rows = []
        for name, options, text in TUTOR_DESIGNS:
            model = Tutor(replace(TutorConfig(arch=arch), **options))
            params, macs = inference_parameters(model, size), count_macs(model, size)
            rows.append({
                "design": name, "options": dict(options), "params": params, "macs": macs,
                "quarter_params": params - s_params, "quarter_macs": macs - s_macs,
                "fits_table_1": abs(params - TABLE_1_TUTOR[0]) <= param_tol and abs(macs - TABLE_1_TUTOR[1]) <= macs_tol,
                "text": text,
            })
    return rows


# --------------------------------------------------------------------------------------------
# §5: the prediction modules' cost, formula vs counted
# --------------------------------------------------------------------------------------------


def head_cost(head: str, C: int, N: int, H: int, W: int) -> dict[str, int]:
    """Counted cost of one prediction module (meta device) for a C x H x W input, output 8H x 8W.

    ``conv_params``: convolution weights only (the quantity §5 counts); ``params_inference``:
    every parameter an eval forward uses (adds the classifier bias and the BatchNorms);
    ``params``: every parameter of the module (adds FFM's attention, which never runs);
    ``macs``: :func:`count_macs`.
    """
    from fasterkd.models.heads import make_predictor

    with torch.device("meta"):
        module = make_predictor(head, C, N)
    wrapped = _HeadOnly(module, C, (8 * H, 8 * W))
    conv = sum(m.weight.numel() for m in _ran_convs(wrapped, (H, W)))
    return {"conv_params": int(conv), "params_inference": inference_parameters(wrapped, (H, W)),
            "params": count_parameters(module), "macs": count_macs(wrapped, (H, W))}


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
    _EvalForward(model, size).run(lambda m, i, o: ran.append(m) if isinstance(m, nn.Conv2d) else None)
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
