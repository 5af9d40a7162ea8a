"""Official FasterSeg weights: the 320 names and shapes of the official student file, strict loading,
export back to the same entries, a forward written from the official names (FasterSeg spec §8),
the teacher's names, and errors that name the key.

The reference file ``shared/reference/fasterseg/official_student_state_dict.tsv`` lists every entry
of ``Network_Multi_Path_Infer.state_dict()`` for the official student (arch_1.pt); the tests build
a random state dict with exactly those names and shapes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from fasterkd.models import build_model
from fasterkd.models.arch_search import import_official_arch
from fasterkd.models.official import (
    fasterseg_state_dict,
    from_official_weights,
    load_fasterseg_weights,
    save_fasterseg_weights,
    official_name,
    official_names,
)
from fasterkd.models.student import FasterSegStudent, StudentConfig

pytestmark = pytest.mark.usefixtures("one_thread")

REF = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "fasterseg"
TSV = REF / "official_student_state_dict.tsv"
needs_ref = pytest.mark.skipif(
    not (TSV.is_file() and (REF / "arch_1.pt").is_file() and (REF / "arch_0.pt").is_file()),
    reason=f"the official reference files (official_student_state_dict.tsv, arch_0.pt, arch_1.pt) are not in {REF}",
)
SHARED_LAYERS = (0, 1, 2)  # spec §8.4: the student's branches share layers 0-2


def read_tsv() -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the official student's state dict, in the file's order."""
    entries: dict[str, tuple[int, ...]] = {}
    for line in TSV.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, shape = line.split("\t")
        entries[name] = () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))
    return entries


def random_official_state_dict(entries: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, Tensor]:
    """Random tensors with the official names and shapes, as the official code would save them:
    int64 BN counters, positive running variances, and the two names of a shared cell holding
    one tensor's values."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    for name, shape in entries.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.randint(1, 10_000, shape, generator=g, dtype=torch.long)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=g) + 0.5
        else:
            state[name] = torch.randn(shape, generator=g) * 0.1
    for name in list(state):
        m = re.match(r"cells\.(\d+)-1\.(.+)$", name)
        if m and int(m.group(1)) in SHARED_LAYERS:
            state[name] = state[f"cells.{m.group(1)}-0.{m.group(2)}"].clone()
    return state


@pytest.fixture(scope="module")
def arch_1():
    return import_official_arch(REF / "arch_1.pt")


@pytest.fixture(scope="module")
def official() -> dict[str, Tensor]:
    return random_official_state_dict(read_tsv())


@needs_ref
def test_tsv_is_the_official_student_file() -> None:
    entries = read_tsv()
    assert len(entries) == 320  # spec §11
    assert sum(n.endswith("num_batches_tracked") for n in entries) == 46 + 6  # 46 BNs, 6 of them twice (shared)


@needs_ref
def test_our_official_names_are_exactly_the_file(arch_1) -> None:
    entries = read_tsv()
    with torch.device("meta"):
        model = FasterSegStudent(StudentConfig(arch_1))
    names = official_names(model)
    assert sorted(names.values()) == sorted(entries)
    ours = model.state_dict()
    for mine, theirs in names.items():
        assert tuple(ours[mine].shape) == entries[theirs], theirs


@needs_ref
def test_random_official_file_loads_strictly_and_exports_back(arch_1, official) -> None:
    model = load_fasterseg_weights(FasterSegStudent(StudentConfig(arch_1)), official)
    ours = model.state_dict()
    # every official entry landed at its place in our network
    for mine, theirs in official_names(model).items():
        assert torch.equal(ours[mine], official[theirs]), theirs
        assert ours[mine].dtype == official[theirs].dtype, theirs
    # spot checks written out by hand, one per naming rule
    by_hand = {
        "stem.0.conv.0.weight": model.stem[0].conv.weight,
        "stem.0.conv.1.running_var": model.stem[0].bn.running_var,
        "stem.2.bn2.num_batches_tracked": model.stem[2].bn2.num_batches_tracked,
        "cells.3-0._op._op.conv1.weight": model.cells["3-0"].conv1.weight,
        "cells.8-1._op._op.bn2.running_mean": model.cells["8-1"].bn2.running_mean,
        "arms32.1.conv.0.weight": model.arms32[1].conv.weight,
        "refines16.conv.1.num_batches_tracked": model.refines16.bn.num_batches_tracked,
        "heads32.conv_3x3.bn.bias": model.heads32.conv_3x3.bn.bias,
        "heads8.conv_1x1.bias": model.predictor.head.conv_1x1.bias,
        "ffm.conv_1x1.bn.weight": model.predictor.ffm.conv_1x1.bn.weight,
        "ffm.channel_attention.1.conv.weight": model.predictor.ffm.channel_attention[1].weight,
        "ffm.channel_attention.2.conv.weight": model.predictor.ffm.channel_attention[3].weight,
    }
    for theirs, tensor in by_hand.items():
        assert torch.equal(tensor, official[theirs]), theirs
    assert model.stem[2].bn2.num_batches_tracked.dtype == torch.long
    # shared cells: one module, both official names
    assert model.cells["1-0"] is model.cells["1-1"]
    exported = fasterseg_state_dict(model)
    assert list(exported) != [] and set(exported) == set(official)
    for name, value in official.items():
        assert exported[name].shape == value.shape and exported[name].dtype == value.dtype, name
        assert torch.equal(exported[name], value), name


def reference_forward(sd: dict[str, Tensor], image: Tensor) -> Tensor:
    """The official student's eval forward (spec §2, §8.3, §8.4), written from the official names only."""

    def bn(x: Tensor, key: str) -> Tensor:
        return F.batch_norm(x, sd[f"{key}.running_mean"], sd[f"{key}.running_var"], sd[f"{key}.weight"],
                            sd[f"{key}.bias"], training=False, eps=1e-5)

    def conv(x: Tensor, key: str, stride: int = 1) -> Tensor:
        w = sd[key]
        return F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2)

    def resize(x: Tensor, size) -> Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)

    def convnorm(x: Tensor, key: str) -> Tensor:  # operations.ConvNorm: conv.0 conv, conv.1 BN
        return F.relu(bn(conv(x, f"{key}.conv.0.weight"), f"{key}.conv.1"))

    def op(x: Tensor, layer: int, branch: int, kind: int, stride: int) -> Tensor:
        p = f"cells.{layer}-{branch}._op._op"
        if kind == 3:  # conv x2
            y = F.relu(bn(conv(x, f"{p}.conv1.weight", stride), f"{p}.bn1"))
            return F.relu(bn(conv(y, f"{p}.conv2.weight"), f"{p}.bn2"))
        h, w = x.shape[-2:]
        y = resize(x, (h // 2, w // 2))
        y = bn(conv(y, f"{p}.conv1.weight"), f"{p}.bn1")
        if kind == 4:  # zoomed conv x2
            y = bn(conv(F.relu(y), f"{p}.conv2.weight"), f"{p}.bn2")
        return F.relu(y if stride == 2 else resize(y, (h, w)))

    x = F.relu(bn(conv(image, "stem.0.conv.0.weight", 2), "stem.0.conv.1"))
    for i in (1, 2):
        x = F.relu(bn(conv(x, f"stem.{i}.conv1.weight", 2), f"stem.{i}.bn1"))
        x = F.relu(bn(conv(x, f"stem.{i}.conv2.weight"), f"stem.{i}.bn2"))
    # spec §8.4: ops (3 conv x2, 2 zoomed conv, 4 zoomed conv x2) and stride-2 layers per branch
    branches = {0: ([3, 3, 4, 2, 4, 4, 4, 4, 4, 4], {3, 7}), 1: ([3, 3, 4, 4, 3, 3, 4, 4, 4], {5})}
    feats = {}
    for b, (ops, downs) in branches.items():
        h, latest = x, {}
        for layer, kind in enumerate(ops):
            owner = 0 if layer in SHARED_LAYERS else b
            h = op(h, layer, owner, kind, 2 if layer in downs else 1)
            latest[x.shape[-1] // h.shape[-1]] = h
        feats[b] = latest
    f32, f16a, f8a = feats[0][4], feats[0][2], feats[0][1]  # keyed by width ratio to the 1/8 stem output
    f16b, f8b = feats[1][2], feats[1][1]
    a = convnorm(f32, "arms32.0")
    t = convnorm(torch.cat([resize(a, f16a.shape[-2:]), f16a], 1), "refines32.0")
    c = convnorm(t, "arms32.1")
    p = convnorm(torch.cat([resize(c, f8a.shape[-2:]), f8a], 1), "refines32.1")
    d = convnorm(f16b, "arms16")
    q = convnorm(torch.cat([resize(d, f8b.shape[-2:]), f8b], 1), "refines16")
    z = torch.cat([p, q], 1)
    fused = F.relu(bn(conv(z, "ffm.conv_1x1.conv.weight"), "ffm.conv_1x1.bn"))
    y = F.relu(bn(conv(fused, "heads8.conv_3x3.conv.weight"), "heads8.conv_3x3.bn"))
    logits = F.conv2d(y, sd["heads8.conv_1x1.weight"], sd["heads8.conv_1x1.bias"])
    return resize(logits, image.shape[-2:])


@needs_ref
def test_loaded_network_computes_the_official_forward(arch_1, official) -> None:
    """BN statistics, cell order, shared cells and the head take part where the official code uses them."""
    model = load_fasterseg_weights(FasterSegStudent(StudentConfig(arch_1)), official).eval()
    image = torch.randn(1, 3, 64, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(image).pred8
        ref = reference_forward(official, image)
    assert ours.shape == ref.shape == (1, 19, 64, 128)
    assert ref.abs().max() > 1e-3  # not a trivially zero output
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-5), (ours - ref).abs().max()
    # the official forward never reads the FFM attention or the aux heads: their values do not matter
    changed = dict(official)
    for name in ("ffm.channel_attention.1.conv.weight", "heads16.conv_1x1.weight", "heads32.conv_3x3.conv.weight"):
        changed[name] = torch.full_like(official[name], float("nan"))
    model = load_fasterseg_weights(model, changed)
    with torch.no_grad():
        assert torch.equal(model(image).pred8, ours)


@needs_ref
def test_official_file_on_disk_picks_the_arch(arch_1, official, tmp_path) -> None:
    path = tmp_path / "weights1.pt"
    torch.save(official, path)  # the official train.py: torch.save(model.state_dict(), path)
    model = from_official_weights(path)  # the shipped official student arch, found by the stem width
    assert model.config.arch.to_dict() == arch_1.to_dict() and model.config.num_classes == 19
    assert torch.equal(model.predictor.head.conv_1x1.bias, official["heads8.conv_1x1.bias"])
    # a DataParallel prefix on every key and a {"state_dict": ...} wrapper are accepted
    torch.save({"state_dict": {"module." + k: v for k, v in official.items()}}, path)
    assert torch.equal(from_official_weights(path, arch=arch_1).stem[0].bn.running_mean,
                       official["stem.0.conv.1.running_mean"])
    # our writer gives a file that loads back to the same entries
    saved = save_fasterseg_weights(model, tmp_path / "out" / "weights_ours.pt")
    reread = torch.load(saved, weights_only=True)
    assert set(reread) == set(official) and all(torch.equal(reread[k], v) for k, v in official.items())
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        from_official_weights(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_text("not a torch file")
    with pytest.raises(ValueError, match="junk.pt"):
        from_official_weights(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="heads8.conv_1x1.bias"):
        from_official_weights({"stem.0.conv.0.weight": torch.zeros(32, 3, 3, 3)})
    bad = dict(official, **{"stem.0.conv.0.weight": torch.zeros(40, 3, 3, 3)})
    with pytest.raises(ValueError, match="40 output channels"):
        from_official_weights(bad)


@needs_ref
@pytest.mark.parametrize("case", ["shape", "missing", "extra", "dtype", "shared"])
def test_the_first_bad_entry_is_named(arch_1, official, case: str) -> None:
    bad = dict(official)
    if case == "shape":
        bad["refines16.conv.0.weight"] = torch.zeros(64, 97, 3, 3)
        match = r"shape mismatch at 'refines16\.conv\.0\.weight': \(64, 97, 3, 3\) given, \(64, 96, 3, 3\) expected"
    elif case == "missing":
        del bad["heads8.conv_1x1.bias"]
        match = r"missing key 'heads8\.conv_1x1\.bias' \(expected shape \(19,\)\)"
    elif case == "extra":
        bad["heads4.conv_1x1.weight"] = torch.zeros(19, 128, 1, 1)
        match = r"unexpected key 'heads4\.conv_1x1\.weight'"
    elif case == "dtype":
        bad["arms16.conv.1.num_batches_tracked"] = torch.tensor(3.0)
        match = r"'arms16\.conv\.1\.num_batches_tracked' has dtype torch\.float32, expected torch\.int64"
    else:
        bad["cells.2-1._op._op.conv2.weight"] = official["cells.2-1._op._op.conv2.weight"] + 1
        match = r"'cells\.2-1\._op\._op\.conv2\.weight' differs from 'cells\.2-0\._op\._op\.conv2\.weight'"
    model = FasterSegStudent(StudentConfig(arch_1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_fasterseg_weights(model, bad)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing loaded


def test_networks_without_official_counterpart_are_refused() -> None:
    with torch.device("meta"):
        ps = build_model("student", head="pixel_shuffle")
        tutor = build_model("tutor")
    with pytest.raises(ValueError, match=r"'predictor\.refine\.conv\.weight' has no counterpart"):
        fasterseg_state_dict(ps)
    with pytest.raises(ValueError, match=r"'quarter\.0\.conv1\.weight' has no counterpart"):
        official_names(tutor)
    with pytest.raises(ValueError, match="must be a mapping"):
        load_fasterseg_weights(build_model("student"), [1, 2])  # type: ignore[arg-type]
    assert official_name("predictor.shuffle.weight") is None


@needs_ref
def test_teacher_names_follow_the_same_rules() -> None:
    """arch_0 (the official teacher): 458 entries (spec §11). No name list of the official teacher
    exists, so each of its names must have a form (cell index aside) that the student file has,
    and the counts must be the measured ones."""
    forms = {re.sub(r"^cells\.\d+-\d+\.", "cells.L-B.", n) for n in read_tsv()}
    arch_0 = import_official_arch(REF / "arch_0.pt")
    with torch.device("meta"):
        teacher = FasterSegStudent(StudentConfig(arch_0))
    names = official_names(teacher)
    assert len(set(names.values())) == len(names) == 458
    assert sum(p.numel() for p in teacher.parameters()) == 23_524_137  # spec §11 (thop)
    for theirs in names.values():
        assert re.sub(r"^cells\.\d+-\d+\.", "cells.L-B.", theirs) in forms, theirs
    assert names["stem.0.conv.weight"] == "stem.0.conv.0.weight"
    assert names["predictor.head.conv_3x3.conv.weight"] == "heads8.conv_3x3.conv.weight"
    # a teacher file round-trips, and its stem width (48) selects the shipped teacher arch
    teacher = FasterSegStudent(StudentConfig(arch_0))
    state = fasterseg_state_dict(teacher)
    loaded = from_official_weights(state)
    assert loaded.config.arch.to_dict() == arch_0.to_dict()
    assert all(torch.equal(v, state[k]) for k, v in fasterseg_state_dict(loaded).items())
