"""Datasets: the Cityscapes class table and loader, the real sample frame, the synthetic scenes,
``fasterkd data synth/check``, bad-input errors, and the data notebook."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fasterkd import cli
from fasterkd.data import (
    CLASS_NAMES,
    IGNORE_INDEX,
    NUM_CLASSES,
    PALETTE,
    build_dataset,
    check_dataset,
    colorize,
    find_pairs,
    labelids_to_trainids,
    sample_root,
)
from fasterkd.data.synthetic import render_scene, write_synthetic

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = sample_root()
needs_sample = pytest.mark.skipif(SAMPLE is None, reason="../shared/data/cityscapes-sample is not beside the repo")

# cityscapesScripts helpers/labels.py, written out independently of the package: label id -> train id
OFFICIAL_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                     26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
ROAD, SKY = 0, 10
OBJECTS = (5, 6, 7, 11, 12, 13, 14, 15, 16, 17, 18)  # pole .. bicycle: the "things" and thin stuff


# ------------------------------------------------------------------------------ class table


def test_class_table_names_and_official_palette():
    assert NUM_CLASSES == 19 and IGNORE_INDEX == 255
    assert len(CLASS_NAMES) == 19 and len(set(CLASS_NAMES)) == 19
    assert CLASS_NAMES[0] == "road" and CLASS_NAMES[10] == "sky" and CLASS_NAMES[13] == "car" and CLASS_NAMES[18] == "bicycle"
    assert PALETTE.shape == (19, 3) and PALETTE.dtype == np.uint8
    assert len({tuple(c) for c in PALETTE}) == 19
    assert tuple(PALETTE[0]) == (128, 64, 128) and tuple(PALETTE[10]) == (70, 130, 180)
    assert tuple(PALETTE[11]) == (220, 20, 60) and tuple(PALETTE[18]) == (119, 11, 32)


def test_labelids_to_trainids_matches_the_official_table_for_every_id():
    ids = np.arange(-1, 256)
    expected = np.array([OFFICIAL_TRAIN_ID.get(int(i), 255) for i in ids], dtype=np.uint8)
    assert np.array_equal(labelids_to_trainids(ids.astype(np.int32)), expected)
    assert np.array_equal(labelids_to_trainids(ids[1:].astype(np.uint8)), expected[1:])
    t = labelids_to_trainids(torch.from_numpy(ids))
    assert t.dtype == torch.int64 and np.array_equal(t.numpy(), expected.astype(np.int64))
    assert int((expected != 255).sum()) == 19  # exactly the 19 evaluated classes survive
    with pytest.raises(ValueError, match="integer label ids"):
        labelids_to_trainids(np.zeros(3, dtype=np.float32))


def test_colorize_uses_the_palette_and_paints_ignore_black():
    label = np.array([[0, 1, 255], [18, 13, 7]], dtype=np.uint8)
    rgb = colorize(label)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == tuple(PALETTE[0]) and tuple(rgb[1, 0]) == tuple(PALETTE[18])
    assert tuple(rgb[0, 2]) == (0, 0, 0)
    assert np.array_equal(colorize(torch.from_numpy(label.astype(np.int64))), rgb)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        colorize(np.zeros((2, 2, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------ the real sample frame


@needs_sample
def test_real_frame_labelids_reproduce_the_official_trainids_on_32691_pixels():
    base = SAMPLE / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000294"
    label_ids = np.asarray(Image.open(f"{base}_gtFine_labelIds.png"))
    official = np.asarray(Image.open(f"{base}_gtFine_labelTrainIds.png"))
    assert label_ids.shape == official.shape == (128, 256)
    mapped = labelids_to_trainids(label_ids)
    agree = mapped == official
    assert int(agree.sum()) == 32691 and agree.size == 32768
    # the 77 disagreements are resampling artefacts on class borders: each has a differing 8-neighbour
    ys, xs = np.nonzero(~agree)
    pad = np.pad(official, 1, mode="edge")
    for y, x in zip(ys, xs):
        window = pad[y : y + 3, x : x + 3]
        assert (window != official[y, x]).any()


@needs_sample
def test_real_frame_through_the_loader():
    pairs = find_pairs(SAMPLE, "val")
    assert len(pairs) == 1 and pairs[0][2] == "labelIds"  # labelIds preferred over the derived train-id file
    ds = build_dataset(SAMPLE, "val")
    item = ds[0]
    assert item["name"] == "frankfurt_000000_000294"
    assert item["image"].shape == (3, 128, 256) and item["image"].dtype == torch.uint8
    assert item["label"].shape == (128, 256) and item["label"].dtype == torch.int64
    ids = set(np.unique(item["label"].numpy()).tolist())
    assert ids <= set(range(19)) | {255} and {0, 2, 8, 13} <= ids  # road, building, vegetation, car
    stats = check_dataset(SAMPLE, "val")
    assert stats["images"] == 1 and sum(stats["pixels_per_class"]) + stats["ignored"] == 128 * 256


def _write_pair(root: Path, split: str, stem: str, rgb: np.ndarray, label: np.ndarray | None, kind: str = "trainIds") -> None:
    img_dir = root / "leftImg8bit" / split / "city"
    img_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(img_dir / f"{stem}_leftImg8bit.png")
    if label is not None:
        lab_dir = root / "gtFine" / split / "city"
        lab_dir.mkdir(parents=True, exist_ok=True)
        suffix = "_gtFine_labelTrainIds.png" if kind == "trainIds" else "_gtFine_labelIds.png"
        Image.fromarray(label).save(lab_dir / f"{stem}{suffix}")


def test_loader_reads_trainids_prefers_labelids_and_maps_out_of_range_trainids_to_ignore(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    train_ids = np.array([[0, 18, 19, 254, 255] * 2] * 6, dtype=np.uint8)
    _write_pair(tmp_path, "train", "a_000001", rgb, train_ids)
    label_ids = np.full((6, 10), 26, dtype=np.uint8)  # car
    _write_pair(tmp_path, "train", "b_000002", rgb, label_ids, kind="labelIds")
    _write_pair(tmp_path, "train", "b_000002", rgb, np.zeros((6, 10), np.uint8))  # a stale train-id file beside it
    ds = build_dataset(tmp_path, "train")
    assert len(ds) == 2 and [p[2] for p in ds.pairs] == ["trainIds", "labelIds"]
    a, b = ds[0], ds[1]
    assert a["name"] == "a_000001" and np.array_equal(a["image"].permute(1, 2, 0).numpy(), rgb)
    assert a["label"][0, :5].tolist() == [0, 18, 255, 255, 255]
    assert (b["label"] == 13).all()
    stats = check_dataset(tmp_path, "train")
    assert stats["images"] == 2 and stats["pixels_per_class"][13] == 60 and stats["ignored"] == 36
    assert stats["pixels_per_class"][0] == 12 and stats["pixels_per_class"][18] == 12


def test_a_split_that_fits_is_decoded_once_and_a_rewritten_file_is_read_again(tmp_path, monkeypatch):
    from fasterkd.data import cityscapes

    monkeypatch.setattr(cityscapes, "DECODED", cityscapes._DecodedFrames())
    rng = np.random.default_rng(1)
    for stem in ("a_000001", "a_000002"):
        _write_pair(tmp_path, "train", stem, rng.integers(0, 256, (6, 10, 3), dtype=np.uint8),
                    np.ones((6, 10), np.uint8))
    decoded = []
    real = cityscapes.read_image
    monkeypatch.setattr(cityscapes, "read_image", lambda path: decoded.append(Path(path).name) or real(path))
    first = [build_dataset(tmp_path, "train")[i]["image"] for i in range(2)]
    image, label = build_dataset(tmp_path, "train").load(0)  # another dataset of the split: no decoding
    assert len(decoded) == 2 and np.array_equal(image, first[0].permute(1, 2, 0).numpy())
    image[:] = 0
    label[:] = 7  # the caller's copy: the cached frame is untouched
    again = build_dataset(tmp_path, "train")[0]
    assert torch.equal(again["image"], first[0]) and (again["label"] == 1).all() and len(decoded) == 2
    rewritten = np.full((6, 10, 3), 9, np.uint8)
    target = next((tmp_path / "leftImg8bit" / "train").rglob("a_000001_leftImg8bit.png"))
    Image.fromarray(rewritten).save(target)
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    assert np.array_equal(build_dataset(tmp_path, "train").load(0)[0], rewritten) and len(decoded) == 3


def test_a_split_larger_than_the_decode_budget_is_read_from_disk_every_time(tmp_path, monkeypatch):
    from fasterkd.data import cityscapes

    monkeypatch.setattr(cityscapes, "DECODED", cityscapes._DecodedFrames())
    monkeypatch.setattr(cityscapes, "DECODE_CACHE_BYTES", 300)  # one 6x10 frame (240 bytes), not two
    for stem in ("a_000001", "a_000002"):
        _write_pair(tmp_path, "train", stem, np.zeros((6, 10, 3), np.uint8), np.ones((6, 10), np.uint8))
    ds = build_dataset(tmp_path, "train")
    ds.load(0), ds.load(1), ds.load(0)
    assert cityscapes.DECODED.items == {} and ds._cached is False


# ------------------------------------------------------------------------------ bad input


def test_missing_root_and_split_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(f"dataset root '{missing}' does not exist")):
        build_dataset(missing, "val")
    _write_pair(tmp_path, "train", "a_000001", np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"split folder '.*leftImg8bit/val' does not exist.*splits found: \['train'\]"):
        build_dataset(tmp_path, "val")


def test_image_without_label_names_both_files(tmp_path):
    _write_pair(tmp_path, "val", "a_000001", np.zeros((4, 4, 3), np.uint8), None)
    with pytest.raises(FileNotFoundError, match=r"a_000001_leftImg8bit.png' has no label: expected .*a_000001_gtFine_labelIds.png"):
        find_pairs(tmp_path, "val")


def test_size_mismatch_names_image_and_label(tmp_path):
    _write_pair(tmp_path, "val", "a_000001", np.zeros((4, 6, 3), np.uint8), np.zeros((4, 5), np.uint8))
    ds = build_dataset(tmp_path, "val")
    with pytest.raises(ValueError, match=r"a_000001_leftImg8bit.png' is 4x6 but its label .*a_000001_gtFine_labelTrainIds.png' is 4x5"):
        ds[0]
    with pytest.raises(ValueError, match="is 4x6 but its label"):
        check_dataset(tmp_path, "val")


def test_corrupt_image_and_label_files_are_named(tmp_path):
    _write_pair(tmp_path, "val", "a_000001", np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8))
    image = tmp_path / "leftImg8bit/val/city/a_000001_leftImg8bit.png"
    label = tmp_path / "gtFine/val/city/a_000001_gtFine_labelTrainIds.png"
    good = image.read_bytes()
    image.write_bytes(good[: len(good) // 2])  # truncated PNG
    with pytest.raises(ValueError, match=re.escape(f"cannot read image file '{image}'")):
        check_dataset(tmp_path, "val")
    image.write_bytes(good)
    label.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=re.escape(f"cannot read label file '{label}'")):
        build_dataset(tmp_path, "val")[0]
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(label, format="PNG")  # RGB where ids are expected
    with pytest.raises(ValueError, match=re.escape(f"label file '{label}' has mode RGB")):
        build_dataset(tmp_path, "val")[0]


def test_cli_data_check_bad_root_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["data", "check", str(tmp_path / "nope"), "--split", "val", "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "nope") in err and err.startswith("fasterkd data: error:")


# ------------------------------------------------------------------------------ synthetic scenes


def _components(label: np.ndarray, classes=OBJECTS) -> np.ndarray:
    """4-connected components of same-class pixels among ``classes`` (0 = background), by min-label propagation."""
    mask = np.isin(label, classes)
    h, w = label.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    same_v = label[1:] == label[:-1]
    same_h = label[:, 1:] == label[:, :-1]
    while True:
        new = lab.copy()
        new[1:] = np.where(same_v, np.minimum(new[1:], lab[:-1]), new[1:])
        new[:-1] = np.where(same_v, np.minimum(new[:-1], lab[1:]), new[:-1])
        new[:, 1:] = np.where(same_h, np.minimum(new[:, 1:], lab[:, :-1]), new[:, 1:])
        new[:, :-1] = np.where(same_h, np.minimum(new[:, :-1], lab[:, 1:]), new[:, :-1])
        new = np.where(mask, new, big)
        if np.array_equal(new, lab):
            return np.where(mask, lab, 0)
        lab = new


@pytest.fixture(scope="module")
def scenes():
    """The first 20 scenes of seed 0 at the default 256x512."""
    return [render_scene(0, i, (256, 512)) for i in range(20)]


def test_scene_is_a_function_of_seed_and_index(scenes):
    rgb, label = render_scene(0, 3, (256, 512))
    assert np.array_equal(rgb, scenes[3][0]) and np.array_equal(label, scenes[3][1])
    other_seed, other_index = render_scene(1, 3, (256, 512)), scenes[4]
    assert not np.array_equal(other_seed[1], label) and not np.array_equal(other_index[1], label)
    assert rgb.dtype == np.uint8 and rgb.shape == (256, 512, 3) and label.dtype == np.uint8 and label.shape == (256, 512)


@pytest.mark.parametrize("size", [(8, 8), (37, 91), (100, 60), (512, 1024)])
def test_scene_at_any_resolution(size):
    rgb, label = render_scene(0, 7, size)
    assert rgb.shape == (*size, 3) and label.shape == size
    assert set(np.unique(label).tolist()) <= set(range(19))
    if size[0] >= 37:
        assert {ROAD, SKY} <= set(np.unique(label).tolist())



def test_scene_rejects_bad_size_and_seed():
    with pytest.raises(ValueError, match="size must be at least 8x8, got 4x100"):
        render_scene(0, 0, (4, 100))
    with pytest.raises(ValueError, match="size must look like HxW"):
        render_scene(0, 0, "256by512")
    with pytest.raises(ValueError, match="seed and index must be non-negative"):
        render_scene(-1, 0)


def test_all_19_classes_within_the_first_20_scenes(scenes):
    present = set()
    for _, label in scenes:
        present |= set(np.unique(label).tolist())
    assert present == set(range(19))
    # and of the validation split's first 20 (the writer starts val at index 100000)
    present = set()
    for i in range(100_000, 100_020):
        present |= set(np.unique(render_scene(0, i, (128, 256))[1]).tolist())
    assert present == set(range(19))


def test_thin_and_small_objects_are_common(scenes):
    small_per_image, thin_images = [], 0
    for _, label in scenes:
        comps = _components(label)
        ids, areas = np.unique(comps[comps > 0], return_counts=True)
        small, thin = 0, False
        for i, area in zip(ids, areas):
            ys, xs = np.nonzero(comps == i)
            hh, ww = int(np.ptp(ys)) + 1, int(np.ptp(xs)) + 1
            small += area <= 128  # smaller than an 11x11 patch: about one cell at 1/32
            thin |= min(hh, ww) <= 3 and max(hh, ww) >= 10  # a pole or post: at most 3 px wide, at least 10 long
        small_per_image.append(small)
        thin_images += thin
    assert np.median(small_per_image) >= 10 and sum(s >= 5 for s in small_per_image) >= 18, small_per_image
    assert thin_images >= 15, thin_images


def test_no_class_is_separable_by_colour_alone(scenes):
    rgb = np.concatenate([r.reshape(-1, 3) for r, _ in scenes]).astype(np.int64)
    label = np.concatenate([lab.ravel() for _, lab in scenes]).astype(np.int64)
    for c in range(19):
        px = rgb[label == c]
        assert px.std(0).mean() > 25, (CLASS_NAMES[c], px.std(0))
    # the best colour-only classifier, fitted on these very pixels: majority class per 16^3 colour bin
    key = (rgb[:, 0] // 16) * 256 + (rgb[:, 1] // 16) * 16 + rgb[:, 2] // 16
    counts = np.zeros((4096, 19), dtype=np.int64)
    np.add.at(counts, (key, label), 1)
    pred = counts.argmax(1)[key]
    ious = []
    for c in range(19):
        tp, union = np.sum((pred == c) & (label == c)), np.sum((pred == c) | (label == c))
        ious.append(tp / union)
    assert max(ious) < 0.85 and np.mean(ious) < 0.4, dict(zip(CLASS_NAMES, np.round(ious, 3)))


def test_write_synthetic_is_byte_identical_for_the_same_seed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert write_synthetic(a, n=3, size=(32, 64), seed=5) == 3
    write_synthetic(b, n=3, size=(32, 64), seed=5)
    write_synthetic(c, n=3, size=(32, 64), seed=6)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 6
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert sorted(p.relative_to(c) for p in c.rglob("*.png")) != files  # the seed is in the file name
    assert (a / files[0]).read_bytes() != next(iter(sorted(c.rglob("*.png")))).read_bytes()
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporaries
    with pytest.raises(ValueError, match="n must be >= 0"):
        write_synthetic(a, n=-1)
    with pytest.raises(ValueError, match="size must look like HxW"):
        write_synthetic(a, n=1, size="32")


def test_ensure_synthetic_completes_a_partial_set_and_refuses_another_recipe(tmp_path):
    from fasterkd.data.synthetic import ensure_synthetic

    root = tmp_path / "synth"
    ensure_synthetic(root, {"train": 2, "val": 1}, size=(24, 48), seed=3)
    files = sorted(root.rglob("*.png"))
    assert len(files) == 6 and json.loads((root / "synthetic.json").read_text())["size"] == [24, 48]
    before = {f: f.read_bytes() for f in files}
    files[0].unlink()  # as a killed run would leave it
    ensure_synthetic(root, {"train": 3, "val": 1}, size=(24, 48), seed=3)
    assert all(f.read_bytes() == b for f, b in before.items())
    assert len(build_dataset(root, "train")) == 3 and len(build_dataset(root, "val")) == 1
    with pytest.raises(ValueError, match=r"holds synthetic scenes of size \[24, 48\] seed 3, expected size \[32, 64\] seed 3"):
        ensure_synthetic(root, {"train": 1}, size=(32, 64), seed=3)


def test_cli_synth_then_check_reads_the_cityscapes_layout(tmp_path, capsys):
    out = tmp_path / "synth"
    assert cli.main(["data", "synth", "--out", str(out), "--n", "5", "--size", "48x80", "--split", "val", "--seed", "2"]) == 0
    assert "wrote 5 synthetic scenes" in capsys.readouterr().out
    images = sorted((out / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png"))
    labels = sorted((out / "gtFine" / "val").glob("*/*_gtFine_labelTrainIds.png"))
    assert len(images) == len(labels) == 5
    ds = build_dataset(out, "val")
    assert len(ds) == 5 and ds[0]["image"].shape == (3, 48, 80) and ds[0]["label"].shape == (48, 80)
    # the loader returns exactly what the renderer drew (val starts at scene 100000)
    rgb, label = render_scene(2, 100_000, (48, 80))
    assert np.array_equal(ds[0]["image"].permute(1, 2, 0).numpy(), rgb) and np.array_equal(ds[0]["label"].numpy(), label)

    assert cli.main(["data", "check", str(out), "--split", "val", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert set(stats) == {"images", "pixels_per_class", "ignored"}
    assert stats["images"] == 5 and len(stats["pixels_per_class"]) == 19
    assert sum(stats["pixels_per_class"]) + stats["ignored"] == 5 * 48 * 80
    expected = np.zeros(256, dtype=np.int64)
    for i in range(5):
        expected += np.bincount(render_scene(2, 100_000 + i, (48, 80))[1].ravel(), minlength=256)
    assert stats["pixels_per_class"] == expected[:19].tolist() and stats["ignored"] == 0


def test_cli_synth_bad_size_names_the_flag(tmp_path, capsys):
    assert cli.main(["data", "synth", "--out", str(tmp_path), "--n", "1", "--size", "48"]) == 2
    err = capsys.readouterr().err
    assert "--size must look like HxW" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------ the data notebook


@pytest.mark.slow
def test_data_notebook_runs_with_the_smoke_profile(tmp_path):
    nb = json.loads((ROOT / "notebooks" / "00_data.ipynb").read_text())
    params = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1
    assert "".join(params[0]["source"]).split("\n") == [
        'profile = "quick"', 'run_dir = "../runs/book-quick"', 'data_root = ""', 'device = "auto"']
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb["cells"] if c["cell_type"] == "code")
    out = tmp_path / "out.ipynb"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTERKD_CACHE": str(tmp_path / "cache")}
    env.pop("MPLBACKEND", None)  # the kernel's inline backend must draw the figures
    proc = subprocess.run([sys.executable, "-m", "papermill", "notebooks/00_data.ipynb", str(out), "-p", "profile", "smoke",
                           "-p", "run_dir", str(tmp_path / "run"), "--cwd", "notebooks", "-k", "python3"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = json.loads(out.read_text())
    images = sum("image/png" in o.get("data", {}) for c in done["cells"] for o in c.get("outputs", []))
    assert images >= 4  # gallery, class frequencies, legend, augmentation (and the real frame when present)
    stats = json.loads((tmp_path / "run" / "00_data" / "class_stats.json").read_text())
    assert stats["train"]["images"] >= 1 and len(stats["train"]["pixels_per_class"]) == 19
