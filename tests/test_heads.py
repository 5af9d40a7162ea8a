"""Prediction modules: the paper's §5 cost formulas for both heads, shapes, and the Head width rule.

The paper counts convolution weights only. Each test adds back, by name, the terms it leaves out:
the classifier bias (N), the BatchNorm affine parameters (2 per channel), and the FFM's channel
attention (built but never run, spec §8.3 step 6). MACs are convolution multiply-accumulates of a
forward pass, counted by hooks here and by ``fasterkd.cost.count_macs`` through the full student.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fasterkd.models.heads import (
    BilinearPredictor,
    ConvNorm,
    FeatureFusion,
    Head,
    PixelShufflePredictor,
    head_mid_channels,
    make_predictor,
)

N = 19


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv_macs(module: nn.Module, x: torch.Tensor, size: tuple[int, int]) -> int:
    """Multiply-accumulates of every Conv2d that runs (bias adds not counted, as in the paper)."""
    total = 0

    def hook(m: nn.Conv2d, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        total += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    hooks = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        module.eval()(x, size)
    for h in hooks:
        h.remove()
    return total


@pytest.mark.parametrize("c", [32, 64, 128, 256])
def test_bilinear_predictor_matches_paper_formula(c: int) -> None:
    module = BilinearPredictor(c, N)
    bias = N  # the Head's 1x1 classifier bias
    batchnorm = 2 * c + 2 * c  # FFM ConvNorm BN + Head 3x3 ConvNorm BN (weight and bias each)
    unused_attention = 2 * c * c  # FFM channel attention: two 1x1 convs C -> C, no bias
    assert n_params(module) == 10 * c * c + N * c + bias + batchnorm + unused_attention
    assert n_params(module.ffm.channel_attention) == unused_attention
    h, w = 8, 16
    assert conv_macs(module, torch.randn(1, c, h, w), (64, 128)) == 10 * c * c * h * w + N * c * h * w


@pytest.mark.parametrize("c", [32, 64, 128, 256])
def test_pixel_shuffle_predictor_matches_paper_formula(c: int) -> None:
    module = PixelShufflePredictor(c, N)
    bias = N
    batchnorm = 2 * (c // 2) + 2 * (2 * c) + 2 * (c // 2)  # FFM (C/2), refine (2C), Head 3x3 (C/2)
    unused_attention = 2 * (c // 2) ** 2  # the FFM is reduced to C/2, so is its unused attention
    formula_params = 11 * c * c / 4 + N * c / 2 + 50 * c
    assert n_params(module) == formula_params + bias + batchnorm + unused_attention
    assert n_params(module.refine.conv) == 50 * c  # grouped 5x5: 2C outputs, one input channel each
    h, w = 8, 16
    formula_macs = 9.5 * c * c * h * w + 2 * c * N * h * w + 50 * c * h * w
    assert conv_macs(module, torch.randn(1, c, h, w), (64, 128)) == formula_macs


def test_pixel_shuffle_cost_crossover() -> None:
    """Paper: "If C is large enough, our proposed structure has fewer parameters and operations".

    From the formulas: fewer parameters when (29/4) C^2 > N C/2 + 50 C (C >= 10 for N = 19), fewer
    MACs per 1/8 pixel when C^2/2 > N C + 50 C, i.e. C > 2 (N + 50) = 138. The official student has
    C = 128: 113,344 fewer parameters but 0.4 % more MACs in the prediction module (Table 3: 27 G both).
    """
    x = lambda c: torch.randn(1, c, 4, 4)  # noqa: E731
    for c, fewer_macs in ((128, False), (136, False), (140, True), (256, True)):
        ps, bl = PixelShufflePredictor(c, N), BilinearPredictor(c, N)
        assert n_params(ps) < n_params(bl)
        assert (conv_macs(ps, x(c), (32, 32)) < conv_macs(bl, x(c), (32, 32))) == fewer_macs, c
    assert conv_macs(PixelShufflePredictor(128, N), x(128), (32, 32)) / conv_macs(BilinearPredictor(128, N), x(128), (32, 32)) == pytest.approx(1.00385, abs=1e-5)


def test_pixel_shuffle_shapes() -> None:
    c, h, w = 128, 6, 10
    module = PixelShufflePredictor(c, N).eval()
    z = torch.randn(2, c, h, w)
    fused = module.fuse(z)
    assert fused.shape == (2, c // 2, h, w) and module.fused_channels == c // 2
    refined = module.refine(fused)
    assert refined.shape == (2, 2 * c, h, w)
    assert module.refine.conv.groups == c // 2 and module.refine.conv.weight.shape == (2 * c, 1, 5, 5)
    shuffled = module.shuffle(refined)
    assert shuffled.shape == (2, c // 2, 2 * h, 2 * w)
    # PixelShuffle: output (c, 2i + a, 2j + b) = input channel 4c + 2a + b at (i, j)
    assert torch.equal(shuffled[:, 3, 2 * 4 + 1, 2 * 7 + 0], refined[:, 4 * 3 + 2 * 1 + 0, 4, 7])
    logits_2x = module.head(shuffled)
    assert logits_2x.shape == (2, N, 2 * h, 2 * w)
    with torch.no_grad():
        logits, fused2 = module(z, (8 * h, 8 * w))
    assert logits.shape == (2, N, 8 * h, 8 * w) and torch.equal(fused2, fused)
    # the final x4 is bilinear with align_corners=True: corners are kept exactly
    assert torch.allclose(logits[..., 0, 0], logits_2x[..., 0, 0].detach(), atol=1e-6)
    assert torch.allclose(logits[..., -1, -1], logits_2x[..., -1, -1].detach(), atol=1e-6)


def test_bilinear_predictor_shapes_and_upsampling() -> None:
    module = BilinearPredictor(64, N).eval()
    z = torch.randn(1, 64, 5, 7)
    with torch.no_grad():
        logits, fused = module(z, (40, 56))
        low = module.head(fused)
    assert fused.shape == (1, 64, 5, 7) and logits.shape == (1, N, 40, 56)
    expected = nn.functional.interpolate(low, size=(40, 56), mode="bilinear", align_corners=True)
    assert torch.allclose(logits, expected)


def test_building_blocks() -> None:
    assert [head_mid_channels(c) for c in (64, 256, 257, 384, 512)] == [64, 256, 128, 192, 256]
    head = Head(384, N)
    assert head.conv_3x3.conv.weight.shape == (192, 384, 3, 3) and head.conv_1x1.bias is not None
    assert head.conv_3x3.conv.bias is None
    cn = ConvNorm(8, 16, 3, stride=2)
    assert cn(torch.randn(2, 8, 9, 9)).shape == (2, 16, 5, 5)
    assert min(cn(torch.randn(2, 8, 9, 9)).flatten().tolist()) >= 0  # ReLU last
    ffm = FeatureFusion(32, 32)
    calls = []
    ffm.channel_attention.register_forward_hook(lambda *a: calls.append(1))
    ffm(torch.randn(2, 32, 4, 4))
    assert calls == []  # the attention is dead code, as in the official FFM
    assert isinstance(make_predictor("bilinear", 64, N), BilinearPredictor)
    assert isinstance(make_predictor("pixel_shuffle", 64, N), PixelShufflePredictor)
    with pytest.raises(ValueError, match="head must be one of"):
        make_predictor("deconv", 64, N)
    with pytest.raises(ValueError, match="channels must be even"):
        PixelShufflePredictor(63, N)
