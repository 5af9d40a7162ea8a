"""HRNet / HRNet-OCR teachers: official counts, state-dict naming, shapes and the checkpoint loader.

Reference numbers: ``shared/reference/hrnet-fa-kd.md`` section 5 (measured by running the official
HRNet-Semantic-Segmentation code). Large models are built on the meta device (no memory, no
compute); forward passes run on a small model at a small input.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from fasterkd.models.hrnet import (
    HRNET_PRESETS,
    HRNet,
    build_hrnet,
    build_hrnet_from_checkpoint,
    detect_hrnet_preset,
    hrnet_config,
    load_hrnet_checkpoint,
)

# name: (parameters, buffers, state-dict keys, BatchNorm layers)   -- reference section 5 items 1-2
OFFICIAL_COUNTS = {
    "hrnet-w18-small-v1": (1_540_819, 7_304, 435, 72),
    "hrnet-w18-small-v2": (3_939_579, 16_633, 873, 145),
    "hrnet-w18": (9_641_119, 34_782, 1839, 306),
    "hrnet-w48": (65_859_379, 85_842, 1839, 306),
    "hrnet-w48-ocr": (70_372_678, 91_482, 1890, 314),
}
# conv/linear MACs at 1024x2048 in 1e9 (section 5 item 3; OCR: the conv part, 1206.3691 GiB-MACs)
OFFICIAL_GMACS = {
    "hrnet-w18-small-v1": 33.39,
    "hrnet-w18-small-v2": 76.86,
    "hrnet-w18": 147.40,
    "hrnet-w48": 747.51,
    "hrnet-w48-ocr": 1295.33,
}
# README "GFLOPs" = MACs / 1024**3
OFFICIAL_GIB_MACS = {
    "hrnet-w18-small-v1": 31.0977,
    "hrnet-w18-small-v2": 71.5786,
    "hrnet-w18": 137.2779,
    "hrnet-w48": 696.1758,
    "hrnet-w48-ocr": 1206.3691,
}


def meta_model(name: str, **kw) -> HRNet:
    with torch.device("meta"):
        return build_hrnet(name, **kw)


def official_file_dict(model: nn.Module, drop_counters: bool = True) -> dict[str, torch.Tensor]:
    """What the official trainer saves: FullModel(model, loss).state_dict() (section 1.7)."""
    sd = {"model." + k: v.clone() for k, v in model.state_dict().items()
          if not (drop_counters and k.endswith("num_batches_tracked"))}
    sd["loss.criterion.weight"] = torch.rand(19)
    return sd


def randomise_bn(model: nn.Module, seed: int) -> None:
    """Give every BatchNorm non-trivial statistics so that a load that missed them would show."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.weight.data.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))


def small_model(seed: int, **overrides) -> HRNet:
    torch.manual_seed(seed)
    model = HRNet(hrnet_config("hrnet-w18-small-v1", **overrides))
    randomise_bn(model, seed)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Counts and names
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OFFICIAL_COUNTS))
def test_official_counts(name: str) -> None:
    params, buffers, keys, bns = OFFICIAL_COUNTS[name]
    model = meta_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(b.numel() for b in model.buffers()) == buffers
    assert len(model.state_dict()) == keys
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == bns


def test_presets_are_the_five_official_models() -> None:
    assert set(HRNET_PRESETS) == set(OFFICIAL_COUNTS)
    with pytest.raises(ValueError, match="hrnet-w32"):
        build_hrnet("hrnet-w32")


def test_parameter_breakdown() -> None:
    """Section 1.6: W48 backbone 65,325,120 + last_layer 534,259; the OCR parts."""
    w48 = meta_model("hrnet-w48")
    head = sum(p.numel() for p in w48.last_layer.parameters())
    assert head == 534_259
    assert sum(p.numel() for p in w48.parameters()) - head == 65_325_120
    ocr = meta_model("hrnet-w48-ocr")
    part = {n: sum(p.numel() for p in getattr(ocr, n).parameters())
            for n in ("conv3x3_ocr", "ocr_distri_head", "cls_head", "aux_head", "ocr_gather_head")}
    assert part == {"conv3x3_ocr": 3_319_296, "ocr_distri_head": 1_184_256, "cls_head": 9_747,
                    "aux_head": 534_259, "ocr_gather_head": 0}
    assert sum(p.numel() for p in meta_model("hrnet-w18-small-v2").last_layer.parameters()) == 78_859
    assert sum(p.numel() for p in meta_model("hrnet-w18-small-v1").last_layer.parameters()) == 62_899


def test_key_spot_checks() -> None:
    """Section 5 item 5 and section 1.7."""
    v2 = {k: tuple(v.shape) for k, v in meta_model("hrnet-w18-small-v2").state_dict().items()}
    assert v2["transition1.0.0.weight"] == (18, 256, 3, 3)  # existing branch: flat Sequential
    assert v2["transition1.1.0.0.weight"] == (36, 256, 3, 3)  # new branch: one more level
    assert not any(k.startswith(("transition2.0.", "transition2.1.", "transition3.0.", "transition3.1.",
                                 "transition3.2.")) for k in v2)
    assert v2["transition2.2.0.0.weight"] == (72, 36, 3, 3)
    assert v2["transition3.3.0.0.weight"] == (144, 72, 3, 3)
    assert v2["stage4.1.fuse_layers.3.0.2.0.weight"] == (144, 18, 3, 3)
    assert v2["stage3.0.fuse_layers.2.0.0.0.weight"] == (18, 18, 3, 3)
    assert v2["stage3.0.fuse_layers.2.0.1.0.weight"] == (72, 18, 3, 3)
    assert v2["stage3.0.fuse_layers.0.2.0.weight"] == (18, 72, 1, 1)  # upsampling path
    assert not any(k.startswith("stage3.0.fuse_layers.1.1.") for k in v2)  # None hole
    assert v2["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert "layer1.0.downsample.1.num_batches_tracked" in v2

    w48 = {k: tuple(v.shape) for k, v in meta_model("hrnet-w48").state_dict().items()}
    assert w48["layer1.0.conv3.weight"] == (256, 64, 1, 1)
    assert w48["last_layer.0.weight"] == (720, 720, 1, 1)
    assert w48["last_layer.0.bias"] == (720,)
    assert w48["last_layer.3.weight"] == (19, 720, 1, 1)
    assert not any(k.startswith("last_layer.2.") for k in w48)  # the ReLU

    ocr = {k: tuple(v.shape) for k, v in meta_model("hrnet-w48-ocr").state_dict().items()}
    assert ocr["aux_head.0.weight"] == (720, 720, 1, 1)
    assert ocr["aux_head.3.weight"] == (19, 720, 1, 1)
    assert ocr["conv3x3_ocr.0.weight"] == (512, 720, 3, 3)
    assert ocr["conv3x3_ocr.0.bias"] == (512,)
    base = "ocr_distri_head.object_context_block."
    assert ocr[base + "f_pixel.0.weight"] == (256, 512, 1, 1)
    assert ocr[base + "f_pixel.2.weight"] == (256, 256, 1, 1)
    assert ocr[base + "f_pixel.3.0.running_var"] == (256,)
    assert ocr[base + "f_object.1.0.weight"] == (256,)
    assert ocr[base + "f_down.1.0.bias"] == (256,)
    assert ocr[base + "f_up.0.weight"] == (512, 256, 1, 1)
    assert ocr[base + "f_up.1.0.weight"] == (512,)
    assert ocr["ocr_distri_head.conv_bn_dropout.0.weight"] == (512, 1024, 1, 1)
    assert ocr["ocr_distri_head.conv_bn_dropout.1.0.num_batches_tracked"] == ()
    assert ocr["cls_head.weight"] == (19, 512, 1, 1)
    # the OCR model holds every W48 key except the 9 last_layer.* keys
    assert set(w48) - set(ocr) == {k for k in w48 if k.startswith("last_layer.")}
    assert len([k for k in w48 if k.startswith("last_layer.")]) == 9


def conv_macs(model: nn.Module, size: tuple[int, int]) -> int:
    """The official modelsummary rule: weight numel x output H x W per conv, on the meta device."""
    total = 0

    def hook(mod: nn.Module, inputs, out: torch.Tensor) -> None:
        nonlocal total
        total += mod.weight.numel() * out.shape[0] * out.shape[-2] * out.shape[-1]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    model.eval()(torch.empty(1, 3, *size, device="meta"))
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize("name", list(OFFICIAL_COUNTS))
def test_conv_macs_match_official_readme(name: str) -> None:
    macs = conv_macs(meta_model(name), (1024, 2048))
    assert macs / 1e9 == pytest.approx(OFFICIAL_GMACS[name], abs=0.005)
    assert macs / 1024**3 == pytest.approx(OFFICIAL_GIB_MACS[name], abs=1e-4)


@pytest.mark.parametrize("name", list(OFFICIAL_COUNTS))
def test_cost_count_macs_matches_official_readme(name: str) -> None:
    cost = pytest.importorskip("fasterkd.cost", reason="fasterkd.cost (count_macs) is written by the cost issue")
    macs = cost.count_macs(meta_model(name), (1024, 2048))
    assert macs / 1e9 == pytest.approx(OFFICIAL_GMACS[name], abs=0.005)
    assert macs / 1024**3 == pytest.approx(OFFICIAL_GIB_MACS[name], abs=1e-4)
    flops = cost.count_flops(meta_model(name), (1024, 2048))
    if name == "hrnet-w48-ocr":  # section 5 item 3: 1297.88 G MACs with the attention matmuls
        assert flops / 2e9 == pytest.approx(1297.88, abs=0.005)
    else:  # flop_counter counts exactly 2x the conv MACs
        assert flops == 2 * macs


# --------------------------------------------------------------------------------------------
# Forward: shapes, resolution rule, modes
# --------------------------------------------------------------------------------------------


def test_w48_shapes_at_full_resolution() -> None:
    """Section 1.5: 1024x2048 -> logits (1, 19, 256, 512) and the stage-4 branch shapes."""
    for name, widths in (("hrnet-w48", (48, 96, 192, 384)), ("hrnet-w48-ocr", (48, 96, 192, 384)),
                         ("hrnet-w18-small-v2", (18, 36, 72, 144))):
        model = meta_model(name).train()
        out = model(torch.empty(1, 3, 1024, 2048, device="meta"))
        assert out.pred4.shape == (1, 19, 256, 512)
        assert out.features["1/4"].shape == (1, sum(widths), 256, 512)
        assert out.features["1/8"].shape == (1, widths[1], 128, 256)
        assert out.features["1/16"].shape == (1, widths[2], 64, 128)
        assert out.features["1/32"].shape == (1, widths[3], 32, 64)
        if name.endswith("ocr"):
            assert out.aux.shape == (1, 19, 256, 512)
        else:
            assert out.aux is None


@pytest.mark.parametrize("size", [(64, 128), (250, 380), (33, 47)])
def test_logits_at_ceil_quarter_of_any_input(size: tuple[int, int]) -> None:
    model = small_model(0)
    h, w = size
    with torch.no_grad():
        out = model(torch.randn(1, 3, h, w))
    q = (math.ceil(h / 4), math.ceil(w / 4))
    assert out.pred4.shape == (1, 19, *q)
    assert out.main is out.pred4
    assert out.features["1/4"].shape == (1, 240, *q)
    for k, key in enumerate(("1/8", "1/16", "1/32"), start=3):
        assert out.features[key].shape[-2:] == (math.ceil(h / 2**k), math.ceil(w / 2**k))
    assert torch.isfinite(out.pred4).all()


def test_ocr_outputs_in_train_and_eval() -> None:
    model = small_model(1, ocr=True, align_corners=True).train()
    x = torch.randn(2, 3, 250, 380)
    out = model(x)
    assert out.pred4.shape == out.aux.shape == (2, 19, 63, 95)
    assert not torch.equal(out.pred4, out.aux)
    (out.pred4.mean() + 0.4 * out.aux.mean()).backward()  # both heads take part in training
    assert model.cls_head.weight.grad is not None and model.aux_head[3].weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.pred4.shape == (2, 19, 63, 95)
    assert out.aux is None  # SegOutput contract: auxiliary outputs are None in eval mode


def test_ocr_gather_and_attention_identities() -> None:
    """Object regions are softmax-over-pixels weighted means; one-region attention is uniform."""
    model = small_model(2, ocr=True)
    feats = torch.randn(2, 8, 5, 7)
    probs = torch.zeros(2, 3, 5, 7)
    regions = model.ocr_gather_head(feats, probs)  # uniform weights -> the spatial mean
    assert regions.shape == (2, 8, 3, 1)
    torch.testing.assert_close(regions[:, :, 1, 0], feats.mean(dim=(2, 3)))
    probs[:, 2, 4, 6] = 1e4  # all mass on one pixel
    torch.testing.assert_close(model.ocr_gather_head(feats, probs)[:, :, 2, 0], feats[:, :, 4, 6])


def test_align_corners_and_defaults() -> None:
    assert meta_model("hrnet-w48").config.align_corners is False
    assert meta_model("hrnet-w18-small-v1").config.align_corners is False
    assert meta_model("hrnet-w48-ocr").config.align_corners is True
    assert meta_model("hrnet-w48-ocr", align_corners=False).config.align_corners is False
    a, b = small_model(3), small_model(3, align_corners=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert not torch.allclose(a(x).pred4, b(x).pred4)  # the flag reaches every interpolation
    assert all(m.align_corners for m in b.modules() if hasattr(m, "align_corners"))


def test_init_modes() -> None:
    torch.manual_seed(0)
    official = build_hrnet("hrnet-w18-small-v1", init="official")
    assert official.conv1.weight.std().item() == pytest.approx(0.001, rel=0.2)
    kaiming = build_hrnet("hrnet-w18-small-v1")
    assert kaiming.conv1.weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.2)
    with pytest.raises(ValueError, match="init"):
        build_hrnet("hrnet-w18-small-v1", init="xavier")
    with pytest.raises(ValueError, match="num_classes"):
        build_hrnet("hrnet-w18-small-v1", num_classes=0)


def test_bad_input_shape() -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        small_model(0)(torch.randn(1, 1, 32, 32))


# --------------------------------------------------------------------------------------------
# Checkpoint loading
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ocr", [False, True])
def test_round_trip_through_official_naming(tmp_path, ocr: bool) -> None:
    """model. prefix + loss.criterion.weight + no num_batches_tracked -> identical outputs."""
    src = small_model(10, ocr=ocr)
    dst = small_model(11, ocr=ocr)
    x = torch.randn(1, 3, 72, 100)
    with torch.no_grad():
        ref = src(x).pred4
        assert not torch.allclose(dst(x).pred4, ref)
    official = official_file_dict(src)
    assert not any(k.endswith("num_batches_tracked") for k in official)
    path = tmp_path / "hrnet_official.pth"
    torch.save(official, path)
    assert load_hrnet_checkpoint(dst, path) is dst  # strict by default
    with torch.no_grad():
        torch.testing.assert_close(dst(x).pred4, ref, rtol=0, atol=0)
    for key, value in dst.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert value.item() == 0


def test_wrappers_and_in_memory_dicts() -> None:
    src = small_model(20)
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        ref = src(x).pred4
    wrapped = [
        {"state_dict": official_file_dict(src), "epoch": 3, "best_mIoU": 0.5},  # official resume file
        {"model": src.state_dict(), "step": 100},  # fasterkd trainer checkpoint
        {"module." + k: v for k, v in src.state_dict().items()},  # DDP
        OrderedDict(src.state_dict()),
    ]
    for obj in wrapped:
        dst = load_hrnet_checkpoint(small_model(21), obj)
        with torch.no_grad():
            torch.testing.assert_close(dst(x).pred4, ref, rtol=0, atol=0)


def test_counters_inserted_even_with_original_metadata() -> None:
    """Section 1.7 item 4: an OrderedDict that kept version-2 _metadata would fail a plain load."""
    src = small_model(30)
    sd = src.state_dict()
    stripped = OrderedDict((k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    stripped._metadata = sd._metadata
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        small_model(31).load_state_dict(stripped, strict=True)
    load_hrnet_checkpoint(small_model(31), stripped)


def test_w48_ocr_official_names_load_strictly() -> None:
    """The full 1890-key OCR file (1890 model. keys + 1 loss key, 314 counters removed) maps exactly."""
    src = meta_model("hrnet-w48-ocr")
    official = {"model." + k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    official["loss.criterion.weight"] = torch.empty(19, device="meta")
    assert len(official) == 1576 + 1
    load_hrnet_checkpoint(meta_model("hrnet-w48-ocr"), official)
    with pytest.raises(ValueError, match="hrnet-w48-ocr"):  # an OCR file into plain W48: hint names the model
        load_hrnet_checkpoint(meta_model("hrnet-w48"), official)


def test_missing_key_is_named() -> None:
    official = official_file_dict(small_model(40))
    del official["model.stage3.0.fuse_layers.2.0.1.0.weight"]
    with pytest.raises(ValueError, match=r"missing keys 1 \[stage3\.0\.fuse_layers\.2\.0\.1\.0\.weight\]"):
        load_hrnet_checkpoint(small_model(41), official)


def test_unexpected_key_is_named() -> None:
    official = official_file_dict(small_model(40))
    official["model.incre_modules.0.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected keys 1 \[incre_modules\.0\.0\.conv1\.weight\].*ImageNet"):
        load_hrnet_checkpoint(small_model(41), official)


def test_wrong_shape_names_key_and_both_shapes() -> None:
    official = official_file_dict(small_model(42))
    official["model.transition1.1.0.0.weight"] = torch.zeros(36, 128, 3, 3)
    with pytest.raises(ValueError, match=r"'transition1\.1\.0\.0\.weight'.*\(36, 128, 3, 3\).*\(32, 128, 3, 3\)"):
        load_hrnet_checkpoint(small_model(43), official)
    # a file for another number of classes: the first head mismatch is reported
    with pytest.raises(ValueError, match=r"last_layer\.3\.weight.*\(19, 240, 1, 1\).*\(7, 240, 1, 1\)"):
        load_hrnet_checkpoint(small_model(44, num_classes=7), official_file_dict(small_model(42)))


def test_plain_hrnet_file_initialises_ocr_model_non_strictly() -> None:
    """last_layer -> aux_head, as the official OCR init does; strict loading refuses it."""
    plain = small_model(50)
    official = official_file_dict(plain)
    with pytest.raises(ValueError, match="plain HRNet file"):
        load_hrnet_checkpoint(small_model(51, ocr=True), official)
    ocr = small_model(51, ocr=True)
    with pytest.warns(UserWarning, match="missing keys"):
        load_hrnet_checkpoint(ocr, official, strict=False)
    torch.testing.assert_close(ocr.aux_head[3].weight, plain.last_layer[3].weight, rtol=0, atol=0)
    torch.testing.assert_close(ocr.stage4[0].branches[3][1].bn2.running_var,
                               plain.stage4[0].branches[3][1].bn2.running_var, rtol=0, atol=0)


def test_file_errors(tmp_path) -> None:
    model = small_model(60)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_hrnet_checkpoint(model, tmp_path / "nope.pth")
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(ValueError, match="list.pth.*expected a state dict"):
        load_hrnet_checkpoint(model, not_a_dict)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_hrnet_checkpoint(model, garbage)
    with pytest.raises(ValueError, match="'model.conv1.weight'.*expected a tensor"):
        load_hrnet_checkpoint(model, {"model.conv1.weight": [1.0, 2.0]})


def test_detect_preset_and_hint_in_errors() -> None:
    for name in OFFICIAL_COUNTS:
        official = {"model." + k: v for k, v in meta_model(name).state_dict().items()
                    if not k.endswith("num_batches_tracked")}
        official["loss.criterion.weight"] = torch.empty(19, device="meta")
        assert detect_hrnet_preset(official) == name
    assert detect_hrnet_preset(meta_model("hrnet-w18", num_classes=5).state_dict()) == "hrnet-w18"
    assert detect_hrnet_preset({"conv1.weight": torch.zeros(64, 3, 3, 3)}) is None
    # a Small-v1 file given to a Small-v2 model: the error names the right preset
    with pytest.raises(ValueError, match=r"missing keys .*unexpected keys .*matches 'hrnet-w18-small-v1'"):
        load_hrnet_checkpoint(meta_model("hrnet-w18-small-v2"), official_file_dict(small_model(70)))


def test_build_from_checkpoint(tmp_path) -> None:
    src = small_model(80, num_classes=7)
    path = tmp_path / "teacher.pth"
    torch.save({"model": src.state_dict(), "epoch": 1}, path)  # fasterkd trainer layout
    teacher = build_hrnet_from_checkpoint(path).eval()
    assert teacher.config.name == "hrnet-w18-small-v1" and teacher.config.num_classes == 7
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x).pred4, src(x).pred4, rtol=0, atol=0)
    sd = src.state_dict()
    del sd["stage2.0.branches.0.0.conv1.weight"]
    torch.save(sd, path)
    with pytest.raises(ValueError, match="teacher.pth.*none of the HRNet presets"):
        build_hrnet_from_checkpoint(path)
    with pytest.raises(ValueError, match=r"teacher.pth.*missing keys 1 \[stage2\.0\.branches\.0\.0\.conv1\.weight\]"):
        build_hrnet_from_checkpoint(path, name="hrnet-w18-small-v1")
