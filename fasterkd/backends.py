"""Inference backends: a trained network as image -> logits on the fastest exact path available.

- ``fold_batchnorm``: an eval copy of a network with every BatchNorm that directly follows a
  convolution folded into that convolution's weight and bias (same function, fewer passes).
- ``"torch"``: the folded network, eager, in channels_last memory format.
- ``"onnxruntime"``: the folded network exported to ONNX and run by onnxruntime on the CPU; one
  session per (network, input size), kept for later calls.
- ``"auto"``: onnxruntime on a CPU device when it is installed, else ``"torch"``.

Every backend is an ``nn.Module`` whose forward returns a :class:`SegOutput` with the main logits
(``pred4``), so the evaluator and ``predict`` use them like the network itself.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from fasterkd.models.hrnet import BasicBlock, Bottleneck, HRNet
from fasterkd.models.ops import Conv, Conv2x, FactorizedReduce, ZoomedConv, ZoomedConv2x
from fasterkd.models.outputs import SegOutput

BACKENDS = ("auto", "torch", "onnxruntime")

# modules whose forward applies bn<i> directly to the output of conv<i> (read from their forward)
_PAIRED = (Conv, Conv2x, ZoomedConv, ZoomedConv2x, BasicBlock, Bottleneck, HRNet)
_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


def _plain(module: nn.Module | None, kind: type) -> bool:
    # exact types only: the slimmable USConv2d / USBatchNorm2d of a supernet change width at run time
    return type(module) is kind


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d, lo: int = 0) -> None:
    """conv <- BN(conv) for the BN channels lo .. lo + conv.out_channels (in float64, then cast)."""
    hi = lo + conv.out_channels
    w, dtype = conv.weight.detach().double(), conv.weight.dtype
    mean, var = bn.running_mean[lo:hi].double(), bn.running_var[lo:hi].double()
    gamma = bn.weight[lo:hi].detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias[lo:hi].detach().double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(mean)
    conv.weight = nn.Parameter((w * scale.view(-1, 1, 1, 1)).to(dtype), requires_grad=False)
    conv.bias = nn.Parameter(((bias - mean) * scale + beta).to(dtype), requires_grad=False)


def _foldable(conv: Any, bn: Any) -> bool:
    return (_plain(conv, nn.Conv2d) and _plain(bn, nn.BatchNorm2d) and bn.track_running_stats
            and bn.running_mean is not None)


def _fold_module(module: nn.Module) -> int:
    folded = 0
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = module._modules[first], module._modules[second]
            if _foldable(conv, bn) and bn.num_features == conv.out_channels:
                _fold_pair(conv, bn)
                module._modules[second] = nn.Identity()
                folded += 1
    elif isinstance(module, _PAIRED):
        for conv_name, bn_name in _PAIRS:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if _foldable(conv, bn):
                _fold_pair(conv, bn)
                setattr(module, bn_name, nn.Identity())
                folded += 1
    elif isinstance(module, FactorizedReduce) and not module.identity:
        # stride 2: BN(cat(conv1(x), conv2(shifted))) splits into one BN slice per conv
        convs = [module.conv1] + ([module.conv2] if module.stride == 2 else [])
        if all(_foldable(c, module.bn) for c in convs):
            lo = 0
            for conv in convs:
                _fold_pair(conv, module.bn, lo)
                lo += conv.out_channels
            module.bn = nn.Identity()
            folded += 1
    return folded


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with each conv -> BatchNorm pair folded into the conv.

    Folds the pairs of ``nn.Sequential`` containers (ConvNorm, HRNet branches) and of the ops and
    blocks whose forward is ``bn_i(conv_i(x))``; the input model is left untouched. Exact up to
    float rounding (the fold is computed in float64).
    """
    folded = copy.deepcopy(model).eval()
    count = sum(_fold_module(m) for m in list(folded.modules()))
    folded.folded_batchnorms = count  # type: ignore[assignment]
    return folded


def onnxruntime_available() -> bool:
    """True when the onnxruntime package can be imported."""
    return importlib.util.find_spec("onnxruntime") is not None


def resolve_backend(backend: str, device: str | torch.device) -> str:
    """The backend ``backend`` names on ``device`` (``"auto"``: onnxruntime on CPU when installed)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "onnxruntime":
        if device.type != "cpu":
            raise ValueError(f"backend 'onnxruntime' runs on the CPU only, got device {str(device)!r}")
        if not onnxruntime_available():
            raise ValueError("backend 'onnxruntime' needs the onnxruntime package (pip install onnxruntime)")
        return backend
    if backend == "auto":
        return "onnxruntime" if device.type == "cpu" and onnxruntime_available() else "torch"
    return backend


def _main(model: nn.Module, image: Tensor) -> Tensor:
    out = model(image)
    return out.main if hasattr(out, "main") else out


class TorchBackend(nn.Module):
    """The BN-folded network, eager, channels_last (``channels_last=False``: contiguous)."""

    def __init__(self, model: nn.Module, channels_last: bool = True) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.model = fold_batchnorm(model)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def forward(self, image: Tensor) -> SegOutput:
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            return SegOutput(pred4=_main(self.model, image).contiguous())


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tensor:
        return _main(self.model, image)


class OnnxRuntimeBackend(nn.Module):
    """The BN-folded network run by onnxruntime (CPU); one session per input size (B, C, H, W)."""

    def __init__(self, model: nn.Module, opset: int = 17, threads: int | None = None) -> None:
        super().__init__()
        if not onnxruntime_available():
            raise ValueError("backend 'onnxruntime' needs the onnxruntime package (pip install onnxruntime)")
        self.logits = _Logits(fold_batchnorm(model).cpu()).eval()
        self.opset, self.threads = opset, threads
        self.sessions: dict[tuple[int, ...], Any] = {}

    def session(self, shape: tuple[int, ...]) -> Any:
        """The onnxruntime session for inputs of ``shape`` (exported on first use)."""
        if shape not in self.sessions:
            import onnxruntime as ort

            buf = io.BytesIO()
            x = torch.zeros(shape)
            with warnings.catch_warnings():
                # the tracer fixes the graph to this input size: hence one session per size
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(self.logits, (x,), buf, input_names=["image"], output_names=["logits"],
                                  opset_version=self.opset, dynamo=False)
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if self.threads:
                opts.intra_op_num_threads = self.threads
            self.sessions[shape] = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
        return self.sessions[shape]

    def forward(self, image: Tensor) -> SegOutput:
        if image.device.type != "cpu":
            raise ValueError(f"backend 'onnxruntime' runs on CPU tensors, got one on {image.device}")
        x = image.detach().float().contiguous()
        got = self.session(tuple(x.shape)).run(None, {"image": x.numpy()})[0]
        return SegOutput(pred4=torch.from_numpy(got))


def inference_backend(model: nn.Module, backend: str = "auto",
                      device: str | torch.device = "cpu") -> nn.Module:
    """``model`` (eval) as the module of ``backend`` on ``device`` (see the module docstring)."""
    name = resolve_backend(backend, device)
    model = model.eval()
    if name == "onnxruntime":
        return OnnxRuntimeBackend(model).eval()
    return TorchBackend(model).to(device).eval()
