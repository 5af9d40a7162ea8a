"""A trained checkpoint at work: its model as image -> prediction, the evaluation of a checkpoint on a
split, colour-coded predictions of image files, and the ONNX export (checked with onnxruntime).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fasterkd.config import TrainConfig
from fasterkd.data.loaders import open_split
from fasterkd.engine.checkpoint import load_checkpoint
from fasterkd.engine.search import SupernetView
from fasterkd.engine.trainer import run_evaluation
from fasterkd.utils import atomic_path, pick_device, strict_json


def inference_model(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """A checkpoint's model as image -> SegOutput: a search's supernet is seen through its validated
    head at the widest widths (:class:`fasterkd.engine.search.SupernetView`)."""
    if cfg.model.name == "supernet":
        return SupernetView(model).eval()
    return model


def evaluate_checkpoint(checkpoint: str | os.PathLike, device: str | torch.device = "auto",
                        data_root: str | None = None, split: str | None = None,
                        max_images: int | None = None, backend: str = "auto") -> dict[str, Any]:
    """mIoU, per-class IoU (null for a class absent from the split) and pixel accuracy of a checkpoint
    at full resolution on ``split`` (default: its validation split) of its data (or ``data_root``),
    run by the inference ``backend`` (:func:`fasterkd.backends.inference_backend`)."""
    from fasterkd.data.transforms import EvalTransform
    from fasterkd.evaluate import check_max_images

    check_max_images(max_images, "--max-images")  # before the model loads: 0 or -1 is an error, not "all"
    device = pick_device(device)
    model, cfg = load_checkpoint(checkpoint, device)
    if data_root is not None:
        cfg.data.root = data_root
    ds = open_split(cfg.data, split or cfg.data.val_split, EvalTransform(), max_images=max_images)
    runner = checkpoint_runner(model, cfg, backend, device)
    result = run_evaluation(runner, torch.utils.data.DataLoader(ds, batch_size=1, shuffle=False), device)
    result["checkpoint"] = str(checkpoint)
    result["backend"] = runner.backend_name
    return strict_json(result)


def read_image(path: Path) -> Tensor:
    """An image file as a uint8 RGB tensor (3, H, W)."""
    from PIL import Image

    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} not found")
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def predict_images(model: nn.Module, paths: list[Path], out: Path, device: torch.device, alpha: float = 0.5,
                   stems: list[str] | None = None) -> list[Path]:
    """Write ``<stem>_pred.png`` (colour-coded train ids) and ``<stem>_overlay.png`` per image.

    ``stems`` names each image's outputs (default: its file stem; :func:`fasterkd.images.output_stems`
    keeps colliding stems apart)."""
    from PIL import Image

    from fasterkd.data.cityscapes import colorize
    from fasterkd.data.transforms import normalize

    written = []
    model.eval()
    for path, stem in zip(paths, stems or [Path(p).stem for p in paths]):
        rgb = read_image(Path(path))
        x = normalize(rgb.float().div(255.0)).unsqueeze(0).to(device)
        with torch.no_grad():
            logits = model(x).main
        logits = F.interpolate(logits.float(), size=rgb.shape[-2:], mode="bilinear", align_corners=False)
        pred = logits.argmax(1)[0].cpu()
        colour = np.asarray(colorize(pred.numpy()), dtype=np.uint8)
        overlay = (alpha * colour + (1 - alpha) * rgb.permute(1, 2, 0).numpy()).astype(np.uint8)
        for suffix, arr in (("pred", colour), ("overlay", overlay)):
            target = out / f"{stem}_{suffix}.png"
            with atomic_path(target) as tmp:
                Image.fromarray(arr).save(tmp, format="PNG")
            written.append(target)
    return written


def checkpoint_runner(model: nn.Module, cfg: TrainConfig, backend: str, device: torch.device) -> nn.Module:
    """The checkpoint's inference model on ``backend`` (``backend_name`` says which one runs); a
    search's supernet (slimmable, not exportable) runs eagerly as it is."""
    from fasterkd.backends import inference_backend, resolve_backend

    name = resolve_backend(backend, device)
    if cfg.model.name == "supernet":
        if backend != "auto" and name != "torch":
            raise ValueError(f"backend {backend!r}: a search checkpoint (supernet) runs with backend 'torch' only")
        runner, name = inference_model(model, cfg), "eager"
    else:
        runner = inference_backend(inference_model(model, cfg), name, device)
    runner.backend_name = name  # type: ignore[assignment]
    return runner


def predict_checkpoint(checkpoint: str | os.PathLike, images: list[Path], out: Path,
                       device: str | torch.device = "auto", backend: str = "auto") -> list[Path]:
    """:func:`predict_images` with the model of a checkpoint, run by the inference ``backend``.
    ``images`` are files or folders (:func:`fasterkd.images.plan_predictions`): every one is
    checked before the model loads or anything is written; returns exactly the files written."""
    from fasterkd.images import plan_predictions

    plan = plan_predictions(list(images))
    device = pick_device(device)
    model, cfg = load_checkpoint(checkpoint, device)
    runner = checkpoint_runner(model, cfg, backend, device)
    return predict_images(runner, [p for p, _ in plan], Path(out), device, stems=[s for _, s in plan])


class _MainLogits(nn.Module):
    """Export wrapper: image -> main logits (ONNX graphs return tensors, not dataclasses)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tensor:
        return self.model(image).main


#: the export check's tolerance: max |onnxruntime - torch| <= EXPORT_ATOL + EXPORT_RTOL * max |torch logit|
#: (float32 kernels of two runtimes differ by rounding, about 1e-6 of the logits' scale; a wrong
#: graph differs by the logits' own size)
EXPORT_RTOL, EXPORT_ATOL = 1e-3, 1e-4


def supported_opsets() -> tuple[int, int]:
    """The ONNX opsets torch.onnx's TorchScript exporter (``dynamo=False``) writes: (lowest, highest)."""
    from torch.onnx import _constants

    return (int(getattr(_constants, "ONNX_MIN_OPSET", 7)),
            int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", getattr(_constants, "ONNX_MAX_OPSET", 20))))


def check_opset(opset: int, name: str = "--opset") -> int:
    """``opset`` within :func:`supported_opsets`, else a ``ValueError`` naming ``name``."""
    lo, hi = supported_opsets()
    if isinstance(opset, bool) or not isinstance(opset, int) or not lo <= opset <= hi:
        raise ValueError(f"{name} must be an ONNX opset from {lo} to {hi} (torch.onnx {torch.__version__}), "
                         f"got {opset!r}")
    return opset


def export_difference(got: np.ndarray, ref: np.ndarray, path: str | os.PathLike,
                      rtol: float = EXPORT_RTOL, atol: float = EXPORT_ATOL) -> dict[str, float]:
    """Max absolute and relative difference of onnxruntime's logits ``got`` from torch's ``ref``; a
    ``ValueError`` naming ``path`` and both numbers when beyond ``atol + rtol * max|ref|``."""
    if got.shape != ref.shape:
        raise ValueError(f"{path}: onnxruntime output shape {list(got.shape)} != torch {list(ref.shape)}")
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    diff = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()) if ref.size else 0.0
    if not np.isfinite(diff):
        diff = float("inf")
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    allowed = atol + rtol * scale
    if not diff <= allowed:
        raise ValueError(f"{path}: the exported graph disagrees with torch: max abs difference {diff:.3e}, "
                         f"relative {rel:.3e} (allowed {atol:g} + {rtol:g} x max |logit| {scale:.3g} = {allowed:.3e})")
    return {"max_abs_diff": diff, "max_rel_diff": rel, "tolerance": allowed}


def export_onnx(model: nn.Module, out: Path, input_size: tuple[int, int], opset: int = 17,
                check: bool = True) -> dict[str, Any]:
    """Export the eval-mode model to ONNX and compare with onnxruntime on a random input.

    The check fails (:func:`export_difference`: ``ValueError``, ``out`` left as it was) when the
    outputs differ by more than ``EXPORT_ATOL + EXPORT_RTOL * max |logit|``."""
    check_opset(opset, "opset")
    wrapper = _MainLogits(model.eval().cpu()).eval()
    x = torch.randn(1, 3, *input_size, generator=torch.Generator().manual_seed(0))
    with atomic_path(out) as tmp, warnings.catch_warnings():
        # the tracer's notes on shape checks: the graph is fixed to input_size, as the check below uses
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(wrapper, (x,), str(tmp), input_names=["image"], output_names=["logits"],
                          opset_version=opset, dynamo=False)
        info: dict[str, Any] = {"path": str(out), "input": list(input_size)}
        if check:  # before the rename: a graph that fails its check never replaces ``out``
            import onnxruntime as ort

            sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            got = sess.run(None, {"image": x.numpy()})[0]
            with torch.no_grad():
                ref = wrapper(x).numpy()
            info.update(export_difference(got, ref, out))
            info["output_shape"] = list(got.shape)
    return info


def export_checkpoint(checkpoint: str | os.PathLike, out: Path | None, input_size: tuple[int, int],
                      opset: int = 17) -> tuple[Path, dict[str, Any]]:
    """:func:`export_onnx` of a checkpoint's model (default ``out``: the checkpoint's path as ``.onnx``)."""
    from fasterkd.images import check_input_size

    check_opset(opset, "--opset")  # flags first: a bad one fails before the model loads
    check_input_size(input_size, "--input")
    model, cfg = load_checkpoint(checkpoint, "cpu")
    out = Path(out) if out else Path(checkpoint).with_suffix(".onnx")
    return out, export_onnx(inference_model(model, cfg), out, input_size, opset=opset)
