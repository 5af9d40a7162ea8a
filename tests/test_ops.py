"""The five FasterSeg operations (spec §2) and the slimmable widths (spec §3)."""

import pytest
import torch

from fasterkd.models.ops import (
    PRIMITIVES,
    WIDTH_MULT_LIST,
    FactorizedReduce,
    USBatchNorm2d,
    USConv2d,
    make_divisible,
    make_op,
    scaled_channels,
)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def bn(c: int) -> int:
    return 2 * c


@pytest.mark.parametrize("name", PRIMITIVES)
@pytest.mark.parametrize("stride", [1, 2])
def test_shapes_and_strides(name: str, stride: int) -> None:
    x = torch.randn(2, 6, 16, 24)
    y = make_op(name, 6, 10, stride).eval()(x)
    assert y.shape == (2, 10, 16 // stride, 24 // stride)


@pytest.mark.parametrize("name", ["conv", "conv_2x", "skip"])
def test_odd_channels_and_sizes(name: str) -> None:
    # odd channel counts are allowed for every op; odd spatial sizes for the non-zoomed ones
    x = torch.randn(1, 5, 15, 9)
    assert make_op(name, 5, 7, 1)(x).shape == (1, 7, 15, 9)
    assert make_op(name, 5, 7, 2)(x).shape == (1, 7, 8, 5)


def test_zoomed_ops_odd_size_stride1_keeps_size() -> None:
    x = torch.randn(1, 3, 15, 10)
    assert make_op("conv_downup", 3, 5, 1)(x).shape == (1, 5, 15, 10)
    assert make_op("conv_2x_downup", 3, 5, 2)(x).shape == (1, 5, 7, 5)


def test_parameter_counts_by_hand() -> None:
    ci, co = 5, 7
    conv3 = lambda a, b: 9 * a * b  # noqa: E731  (3x3, no bias)
    assert n_params(make_op("conv", ci, co, 1)) == conv3(ci, co) + bn(co)
    assert n_params(make_op("conv_downup", ci, co, 2)) == conv3(ci, co) + bn(co)
    two = conv3(ci, co) + bn(co) + conv3(co, co) + bn(co)
    assert n_params(make_op("conv_2x", ci, co, 2)) == two
    assert n_params(make_op("conv_2x_downup", ci, co, 1)) == two
    # skip stride 2: two 1x1 convs to co//2 and co - co//2, one BN over co
    assert n_params(make_op("skip", ci, co, 2)) == ci * (co // 2) + ci * (co - co // 2) + bn(co)
    assert n_params(make_op("skip", ci, co, 1)) == ci * co + bn(co)  # projection (width change)
    assert n_params(make_op("skip", 7, 7, 1)) == 0  # identity in a derived net
    # official student layer 0 (conv x2 64 -> 32): 9*64*32 + 64 + 9*32*32 + 64
    assert n_params(make_op("conv_2x", 64, 32, 1)) == 27776


def test_module_names_are_the_official_ones() -> None:
    keys = set(make_op("conv_2x_downup", 4, 4, 1).state_dict())
    assert {"conv1.weight", "bn1.weight", "bn1.running_mean", "conv2.weight", "bn2.bias"} <= keys
    assert set(make_op("conv", 4, 4, 2).state_dict()) >= {"conv1.weight", "bn1.weight"}
    assert set(make_op("skip", 4, 4, 2).state_dict()) >= {"conv1.weight", "conv2.weight", "bn.weight"}
    assert "bn1.bn.4.weight" in make_op("conv", 4, 4, 1, slimmable=True).state_dict()


def test_identity_skip_returns_input() -> None:
    x = torch.randn(1, 3, 4, 4)
    assert make_op("skip", 3, 3, 1)(x) is x


def test_factorized_reduce_uses_shifted_input() -> None:
    op = FactorizedReduce(1, 2, 2).eval()
    with torch.no_grad():
        op.conv1.weight.fill_(1.0)
        op.conv2.weight.fill_(1.0)
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y = torch.cat([op.conv1(x), op.conv2(torch.nn.functional.pad(x[:, :, 1:, 1:], (0, 1, 0, 1)))], 1)
    assert torch.equal(y[0, 0], x[0, 0, ::2, ::2])  # even pixels
    assert torch.equal(y[0, 1], x[0, 0, 1::2, 1::2])  # odd pixels (the shifted half)


def test_zoomed_conv_is_conv_at_half_resolution() -> None:
    op = make_op("conv_downup", 3, 4, 2).eval()
    x = torch.randn(1, 3, 16, 16)
    small = torch.nn.functional.interpolate(x, size=(8, 8), mode="bilinear", align_corners=True)
    ref = torch.relu(op.bn1(op.conv1(small)))
    assert torch.allclose(op(x), ref)
    op1 = make_op("conv_downup", 3, 4, 1).eval()
    op1.load_state_dict(op.state_dict())
    up = torch.nn.functional.interpolate(op.bn1(op.conv1(small)), size=(16, 16), mode="bilinear", align_corners=True)
    assert torch.allclose(op1(x), torch.relu(up))


def test_make_divisible_equals_round_in_official_space() -> None:
    for s in (8, 16, 32):
        for w in WIDTH_MULT_LIST + (8 / 12,):
            c = 12 * s
            assert make_divisible(c * w) == scaled_channels(c, w)
            assert make_divisible(2 * c * w / 2) == scaled_channels(c, w)


def test_usconv_slices_top_left_weight() -> None:
    conv = USConv2d(8, 6, 3, padding=1)
    conv.set_channels(4, 3)
    x = torch.randn(1, 4, 5, 5)
    ref = torch.nn.functional.conv2d(x, conv.weight[:3, :4], padding=1)
    assert torch.equal(conv(x), ref)
    with pytest.raises(ValueError, match="input channels"):
        conv(torch.randn(1, 5, 5, 5))
    with pytest.raises(ValueError, match="outside"):
        conv.set_channels(9, 3)


def test_usbatchnorm_private_bn_per_width() -> None:
    m = USBatchNorm2d(96)
    assert [b.num_features for b in m.bn] == [32, 48, 64, 80, 96]
    m.set_ratio(8 / 12)
    x = torch.randn(2, 64, 3, 3)
    m.train()(x)
    assert m.bn[2].num_batches_tracked.item() == 1
    assert all(m.bn[k].num_batches_tracked.item() == 0 for k in (0, 1, 3, 4))
    with pytest.raises(ValueError, match="width_mult_list"):
        m.set_ratio(0.9)


@pytest.mark.parametrize("name", PRIMITIVES)
def test_slimmable_op_equals_plain_op_on_the_slice(name: str) -> None:
    torch.manual_seed(0)
    stride = 2
    sl = make_op(name, 96, 96, stride, slimmable=True).eval()
    sl.set_ratio((8 / 12, 4 / 12))  # 64 in, 32 out
    plain = make_op(name, 64, 32, stride).eval()
    sd = {}
    for k, v in plain.state_dict().items():
        if k.startswith("conv"):
            src = sl.state_dict()[k]
            c_in = 64 if k.startswith("conv1") or name == "skip" else 32
            sd[k] = src[: v.shape[0], :c_in]
        else:  # bn1.weight -> bn1.bn.0.weight (the private BN of width 4/12)
            mod, param = k.split(".", 1)
            sd[k] = sl.state_dict()[f"{mod}.bn.0.{param}"]
    plain.load_state_dict(sd)
    x = torch.randn(1, 64, 16, 16)
    assert torch.allclose(sl(x), plain(x), atol=1e-5)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown op"):
        make_op("sep_conv", 3, 3, 1)
    with pytest.raises(ValueError, match="stride"):
        make_op("conv", 3, 3, 3)
    with pytest.raises(ValueError, match="slimmable"):
        make_op("conv", 3, 3, 1).set_ratio((1.0, 1.0))
