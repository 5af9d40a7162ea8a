"""Bad data: lossy or 16-bit labels, all-ignore splits, evaluation with nothing to score or an
impossible ``max_images``, and ``data synth`` into a folder that holds other data."""

from __future__ import annotations

import io
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fasterkd.data import build_dataset, check_dataset, sample_root
from fasterkd.data.cityscapes import read_label
from fasterkd.data.synthetic import ensure_synthetic, foreign_data, write_synthetic
from fasterkd.evaluate import check_max_images, evaluate

SAMPLE = sample_root()


def _frame(root: Path, split: str, stem: str, label: np.ndarray | None = None, kind: str = "trainIds",
           fmt: str = "PNG", mode: str | None = None) -> Path:
    """Write one image and its label (``label`` as given, saved in ``fmt``/``mode``); return the label path."""
    h, w = (label.shape if label is not None else (8, 12))
    (root / "leftImg8bit" / split / "city").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(root / "leftImg8bit" / split / "city" / f"{stem}_leftImg8bit.png")
    suffix = "_gtFine_labelTrainIds.png" if kind == "trainIds" else "_gtFine_labelIds.png"
    path = root / "gtFine" / split / "city" / f"{stem}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    if label is None:
        label = np.zeros((h, w), np.uint8)
    im = Image.fromarray(label.astype(np.uint16)) if mode == "I;16" else Image.fromarray(label)
    im.save(path, format=fmt)
    return path


def _blocks(values: list[int], h: int = 16, w: int = 32) -> np.ndarray:
    """A label of vertical bands of ``values`` (sharp edges for a JPEG to smear)."""
    label = np.zeros((h, w), np.uint8)
    for i, v in enumerate(values):
        label[:, i * w // len(values):(i + 1) * w // len(values)] = v
    return label


# ---------------------------------------------------------------------------- labels

LABEL_CASES = [
    # (case, label array, kind, file format, 16-bit, error words)
    ("jpeg-trainids", _blocks([0, 13, 2, 10]), "trainIds", "JPEG", False, "is a JPEG image; labels must be lossless PNG"),
    ("jpeg-labelids", _blocks([7, 26, 11, 23]), "labelIds", "JPEG", False, "is a JPEG image"),
    ("bmp-trainids", _blocks([0, 13]), "trainIds", "BMP", False, "is a BMP image"),
    ("16bit-scaled-labelids", _blocks([7, 26]).astype(np.uint16) * 256, "labelIds", "PNG", True, "is a 16-bit image with values 1792..6656"),
    ("16bit-scaled-trainids", _blocks([0, 13]).astype(np.uint16) * 257, "trainIds", "PNG", True, "is a 16-bit image with values 0..3341"),
]


@pytest.mark.parametrize("case,label,kind,fmt,wide,words", LABEL_CASES, ids=[c[0] for c in LABEL_CASES])
def test_lossy_and_scaled_labels_are_refused_naming_the_file(tmp_path, case, label, kind, fmt, wide, words):
    path = _frame(tmp_path, "val", "a_000001", label, kind=kind, fmt=fmt, mode="I;16" if wide else None)
    with pytest.raises(ValueError, match=rf"label file '{path}' {words}"):
        read_label(path, kind)
    with pytest.raises(ValueError, match=str(path)):
        check_dataset(tmp_path, "val")


def test_a_16bit_label_of_plain_ids_is_read_as_ids(tmp_path):
    label = _blocks([7, 26, 11, 0])
    path = _frame(tmp_path, "val", "a_000001", label.astype(np.uint16), kind="labelIds", mode="I;16")
    with Image.open(path) as im:
        assert im.mode.startswith("I;16")
    assert np.unique(read_label(path, "labelIds")).tolist() == [0, 2, 13, 255]


def test_jpeg_artefacts_resaved_as_png_warn_naming_the_file(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_blocks([0, 255, 18, 255], w=30)).save(buf, format="JPEG", quality=60)
    smeared = np.asarray(Image.open(buf))
    assert ((smeared >= 19) & (smeared != 255)).any()  # the JPEG made non-label values at the edges
    path = _frame(tmp_path, "val", "a_000001", smeared)
    with pytest.warns(UserWarning, match=rf"label file '{path}': \d+ pixels hold values .* neither train ids 0..18 nor 255"):
        out = read_label(path, "trainIds")
    assert set(np.unique(out).tolist()) <= set(range(19)) | {255}


def test_labelids_above_33_warn(tmp_path):
    path = _frame(tmp_path, "val", "a_000001", _blocks([7, 26, 100]), kind="labelIds")
    with pytest.warns(UserWarning, match=r"values \[100\] that are neither label ids 0..33 nor 255"):
        read_label(path, "labelIds")


def test_clean_labels_give_no_warning():
    if SAMPLE is None:
        pytest.skip("no shipped Cityscapes sample")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = check_dataset(SAMPLE, "val")
    assert stats["images"] == 1


# ---------------------------------------------------------------------------- all-ignore data


def test_check_dataset_refuses_a_split_whose_labels_are_all_ignore(tmp_path):
    for i in range(3):
        _frame(tmp_path, "val", f"a_00000{i}", np.full((8, 12), 255, np.uint8))
    with pytest.raises(ValueError, match=rf"every label pixel of split 'val' in '{tmp_path}' is ignore \(255\)"):
        check_dataset(tmp_path, "val")


def test_check_dataset_warns_about_single_all_ignore_frames(tmp_path):
    _frame(tmp_path, "val", "a_000001", np.full((8, 12), 255, np.uint8))
    _frame(tmp_path, "val", "a_000002", np.full((8, 12), 3, np.uint8))
    with pytest.warns(UserWarning, match=r"1 of 2 labels of split 'val' .* are all ignore \(255\), e.g. a_000001"):
        stats = check_dataset(tmp_path, "val")
    assert stats["pixels_per_class"][3] == 96 and stats["ignored"] == 96


class _Const(torch.nn.Module):
    def forward(self, x):
        out = torch.zeros(x.shape[0], 19, *x.shape[-2:])
        out[:, 3] = 1
        return out


def _loader(root: Path, split: str = "val"):
    from fasterkd.data.transforms import EvalTransform

    return torch.utils.data.DataLoader(build_dataset(root, split, transform=EvalTransform()), batch_size=1)


def test_evaluate_refuses_all_ignore_labels_naming_the_dataset(tmp_path):
    for i in range(2):
        _frame(tmp_path, "val", f"a_00000{i}", np.full((8, 12), 255, np.uint8))
    with pytest.raises(ValueError, match=rf"nothing to evaluate: CityscapesDataset\(root='{tmp_path}', split='val', images=2\) "
                                         r"gave 2 images whose labels are all ignore \(255\)"):
        evaluate(_Const(), _loader(tmp_path))
    result = evaluate(_Const(), _loader(tmp_path), allow_empty=True)
    assert np.isnan(result["miou"]) and np.isnan(result["pixel_acc"]) and result["images"] == 2


def test_evaluate_refuses_an_empty_loader():
    with pytest.raises(ValueError, match="nothing to evaluate: list gave no image"):
        evaluate(_Const(), [])


@pytest.mark.parametrize("bad", [0, -1, -5, 1.5, True, "3"])
def test_max_images_must_be_none_or_at_least_one(tmp_path, bad):
    _frame(tmp_path, "val", "a_000001", np.full((8, 12), 3, np.uint8))
    with pytest.raises(ValueError, match=rf"^max_images must be None \(every image\) or an integer >= 1, got {bad!r}$"):
        evaluate(_Const(), _loader(tmp_path), max_images=bad)
    with pytest.raises(ValueError, match="--max-images must be"):
        check_max_images(bad, "--max-images")


def test_max_images_counts(tmp_path):
    for i in range(3):
        _frame(tmp_path, "val", f"a_00000{i}", np.full((8, 12), 3, np.uint8))
    assert evaluate(_Const(), _loader(tmp_path), max_images=2)["images"] == 2
    assert evaluate(_Const(), _loader(tmp_path), max_images=None)["images"] == 3
    assert evaluate(_Const(), _loader(tmp_path))["miou"] == 1.0


# ---------------------------------------------------------------------------- data synth into other data


def _cityscapes_tree(root: Path) -> Path:
    if SAMPLE is not None:
        shutil.copytree(SAMPLE, root)
    else:
        _frame(root, "val", "frankfurt_000000_000294", np.full((8, 12), 7, np.uint8), kind="labelIds")
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


SYNTH_CASES = [
    # (case, set-up, error words)
    ("cityscapes-tree", lambda r: _cityscapes_tree(r), "it holds a Cityscapes-layout dataset \\(cities "),
    ("other-size-scenes", lambda r: write_synthetic(r, 1, (16, 32), split="val"), "it holds synthetic scenes of size 16x32"),
    ("other-size-record", lambda r: ensure_synthetic(r, {"val": 0}, (24, 48)), "it holds synthetic scenes of size 24x48"),
    ("run-folder", lambda r: (r.mkdir(), (r / "last.pt").write_bytes(b"ckpt"), (r / "config.json").write_text("{}")),
     "it holds other files \\(config.json, last.pt\\)"),
    ("a-notes-file", lambda r: (r.mkdir(), (r / "README").write_text("mine")), "it holds other files \\(README\\)"),
    ("leftimg-is-file", lambda r: (r.mkdir(), (r / "leftImg8bit").write_text("x")), "leftImg8bit is a file"),
]


@pytest.mark.parametrize("case,setup,words", SYNTH_CASES, ids=[c[0] for c in SYNTH_CASES])
def test_data_synth_refuses_a_folder_holding_other_data(tmp_path, case, setup, words):
    root = tmp_path / "data"
    setup(root)
    before = _snapshot(root)
    with pytest.raises(ValueError, match=rf"out '{root}' already holds other data: {words}"):
        write_synthetic(root, n=1, size=(32, 64), split="train")
    assert _snapshot(root) == before  # nothing written


def test_force_writes_into_a_real_tree_and_same_size_scenes_are_welcome(tmp_path):
    root = _cityscapes_tree(tmp_path / "cs")
    assert write_synthetic(root, n=1, size=(32, 64), split="train", force=True) == 1
    own = tmp_path / "synth"
    assert write_synthetic(own, n=2, size=(32, 64), split="train") == 2
    assert write_synthetic(own, n=1, size=(32, 64), split="val") == 1  # another split, same size
    assert write_synthetic(own, n=1, size=(32, 64), split="train", seed=7) == 1  # another seed, same size
    assert foreign_data(own, (32, 64)) is None and foreign_data(tmp_path / "none", (32, 64)) is None


def test_ensure_synthetic_refuses_a_real_tree(tmp_path):
    root = _cityscapes_tree(tmp_path / "cs")
    with pytest.raises(ValueError, match=r"holds other data \(it holds a Cityscapes-layout dataset"):
        ensure_synthetic(root, {"val": 1}, size=(32, 64))
    assert not (root / "synthetic.json").exists()


@pytest.mark.parametrize("size,words", [("100000x100000", "at most 8192x8192"), ("8193x16", "at most 8192x8192"),
                                        ("4x4", "at least 8x8"), ("0x10", "positive")])
def test_impossible_synthetic_sizes_are_refused_before_rendering(tmp_path, size, words):
    with pytest.raises(ValueError, match=words):
        write_synthetic(tmp_path / "d", n=1, size=size)
    assert not (tmp_path / "d").exists()


def test_cli_data_synth_into_a_real_tree_is_exit_2(tmp_path, capsys):
    from fasterkd.cli import main

    root = _cityscapes_tree(tmp_path / "cs")
    before = _snapshot(root)
    assert main(["data", "synth", "--out", str(root), "--n", "1", "--size", "32x64"]) == 2
    err = capsys.readouterr().err
    assert "already holds other data" in err and err.count("\n") == 1
    assert _snapshot(root) == before


def test_synthetic_record_of_the_wrong_shape_is_an_error(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "synthetic.json").write_text(json.dumps([64, 128]))
    with pytest.raises(ValueError, match="synthetic.json' is not a synthetic-set record"):
        ensure_synthetic(root, {"val": 1}, size=(32, 64))
