"""Inference backends against plain eager fp32: BatchNorm folding, channels_last eager, onnxruntime."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fasterkd import backends, cli
from fasterkd.backends import (BACKENDS, OnnxRuntimeBackend, TorchBackend, fold_batchnorm, inference_backend,
                               resolve_backend)
from fasterkd.models import build_model
from fasterkd.models.ops import FactorizedReduce

NETWORKS = [("student", {}), ("student", {"head": "pixel_shuffle"}), ("tutor", {}), ("hrnet-w18-small-v1", {})]


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (a fresh one is an identity)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(0.4 * torch.rand(n, generator=g) - 0.2)
    return model.eval()


def count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.fixture(scope="module")
def image():
    return torch.randn(1, 3, 64, 128, generator=torch.Generator().manual_seed(1))


def assert_close_to_eager(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.shape == ref.shape
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= 1e-4 * scale, "logits differ beyond float rounding"
    assert (got.argmax(1) == ref.argmax(1)).float().mean().item() > 0.999


@pytest.mark.parametrize("name,kw", NETWORKS, ids=["student", "pixel_shuffle", "tutor", "teacher"])
def test_fold_removes_every_batchnorm_and_keeps_the_function(name, kw, image):
    model = trained_like(build_model(name, **kw))
    before = count_bn(model)
    folded = fold_batchnorm(model)
    assert count_bn(model) == before > 0  # the input is untouched
    assert count_bn(folded) == 0 and folded.folded_batchnorms > 0 and not folded.training
    with torch.no_grad():
        assert_close_to_eager(folded(image).main, model(image).main)


def test_fold_is_exact_in_float64(image):
    model = trained_like(build_model("student")).double()
    with torch.no_grad():
        ref = model(image.double()).main
        got = fold_batchnorm(model)(image.double()).main
    assert (got - ref).abs().max().item() < 1e-10 * ref.abs().max().item()


@pytest.mark.parametrize("stride", [1, 2])
def test_fold_of_factorized_reduce_splits_the_batchnorm(stride):
    op = trained_like(FactorizedReduce(6, 7, stride=stride))
    x = torch.randn(2, 6, 8, 10, generator=torch.Generator().manual_seed(2))
    folded = fold_batchnorm(op)
    assert isinstance(folded.bn, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), op(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "auto"])
@pytest.mark.parametrize("name,kw", NETWORKS, ids=["student", "pixel_shuffle", "tutor", "teacher"])
def test_every_backend_matches_plain_eager_fp32(backend, name, kw, image):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    model = trained_like(build_model(name, **kw))
    with torch.no_grad():
        ref = model(image).main
    runner = inference_backend(model, backend, "cpu")
    assert_close_to_eager(runner(image).main, ref)
    assert model.training is False and count_bn(model) > 0


def test_auto_picks_onnxruntime_on_cpu_when_installed(monkeypatch):
    monkeypatch.setattr(backends, "onnxruntime_available", lambda: True)
    assert resolve_backend("auto", "cpu") == "onnxruntime"
    assert resolve_backend("auto", "cuda") == "torch"
    monkeypatch.setattr(backends, "onnxruntime_available", lambda: False)
    assert resolve_backend("auto", "cpu") == "torch"
    assert isinstance(inference_backend(build_model("student"), "auto", "cpu"), TorchBackend)
    with pytest.raises(ValueError, match="onnxruntime package"):
        resolve_backend("onnxruntime", "cpu")


def test_bad_backend_names_the_parameter():
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("tensorrt", "cpu")
    with pytest.raises(ValueError, match="CPU only"):
        resolve_backend("onnxruntime", "cuda")


def test_onnxruntime_keeps_one_session_per_input_size():
    pytest.importorskip("onnxruntime")
    model = trained_like(build_model("student"))
    runner = OnnxRuntimeBackend(model)
    g = torch.Generator().manual_seed(3)
    for shape in [(1, 3, 64, 128), (1, 3, 64, 128), (1, 3, 96, 160)]:
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            assert_close_to_eager(runner(x).main, model(x).main)
    assert sorted(runner.sessions) == [(1, 3, 64, 128), (1, 3, 96, 160)]


def test_cli_offers_the_same_backends():
    assert cli.BACKENDS == BACKENDS
    parser = cli.build_parser()
    for command in (["eval", "x.pt"], ["predict", "x.pt", "y.png", "--out", "o"]):
        assert parser.parse_args(command).backend == "auto"
        assert parser.parse_args(command + ["--backend", "torch"]).backend == "torch"
        with pytest.raises(SystemExit):
            parser.parse_args(command + ["--backend", "tensorrt"])
