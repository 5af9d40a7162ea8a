"""Bad input and failing reads/writes for every command: one line naming the file or flag and the
cause, exit 2, no traceback, nothing written before the error (table-driven where the cases share a
shape). Faults root cannot be kept from (a read-only folder) are injected: a file where a folder is
expected, or an ``OSError``/``MemoryError`` raised where the OS would raise it."""

from __future__ import annotations

import errno
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fasterkd import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained smoke baseline checkpoint (the loaders and writers do not care about training)."""
    from fasterkd.engine.checkpoint import build_network, checkpoint_header, model_identity
    from fasterkd.train import preset
    from fasterkd.utils import atomic_torch_save

    base = tmp_path_factory.mktemp("ckpt")
    cfg = preset("baseline", "smoke", out_dir=str(base / "run"), device="cpu", progress=False, kd_weight=0.0)
    torch.manual_seed(0)
    model = build_network(cfg)
    path = base / "best.pt"
    atomic_torch_save(checkpoint_header(cfg, model_identity(model, cfg), model), path)
    return path


def _image(path: Path, h: int = 70, w: int = 90, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG whose header claims ``w`` x ``h`` (an impossible size) with no pixel data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code: int, err: str, *names: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], (name, lines[0])


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ------------------------------------------------------------------------------ the one error path


def _raise_on(monkeypatch, target: str, attr: str, exc: BaseException, when=lambda *a, **k: True) -> None:
    import importlib

    owner = importlib.import_module(target)
    original = getattr(owner, attr)

    def fake(*a, **k):
        if when(*a, **k):
            raise exc
        return original(*a, **k)

    monkeypatch.setattr(owner, attr, fake)


def test_train_into_a_file_valued_out_is_one_line(tmp_path, capsys):
    """Before: NotADirectoryError traceback from the trainer's mkdir."""
    (tmp_path / "afile").write_text("keep me")
    code, out, err = run(capsys, ["train", "baseline", "--profile", "smoke", "--device", "cpu", "--no-progress",
                                  "--set", "kd_weight=0", "--out", tmp_path / "afile" / "run"])
    one_line_error(code, err, "not a directory", str(tmp_path / "afile"))
    assert (tmp_path / "afile").read_text() == "keep me"


def test_train_into_a_read_only_folder_is_one_line(tmp_path, capsys, monkeypatch):
    """EROFS from the trainer's mkdir (root ignores chmod, so the OS error is injected). Before: traceback."""
    target = tmp_path / "ro" / "run"
    original = Path.mkdir

    def mkdir(self, *a, **k):
        if Path(self) == target:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return original(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code, out, err = run(capsys, ["train", "baseline", "--profile", "smoke", "--device", "cpu", "--no-progress",
                                  "--set", "kd_weight=0", "--out", target])
    one_line_error(code, err, "read-only file system", str(target))


@pytest.mark.parametrize("exc, expected", [
    (MemoryError(), "out of memory"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/scene.png"), "no space left on device: /data/scene.png"),
    (PermissionError(errno.EACCES, "Permission denied", "/data"), "permission denied: /data"),
], ids=["MemoryError", "ENOSPC", "EACCES"])
def test_data_synth_os_errors_and_memory_are_one_line(tmp_path, capsys, monkeypatch, exc, expected):
    """Raised by the scene renderer (outside any atomic writer). Before: a traceback."""
    import fasterkd.data.synthetic as synthetic

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(synthetic, "render_scene", boom)
    code, out, err = run(capsys, ["data", "synth", "--out", tmp_path / "ds", "--n", "2", "--size", "64x128"])
    one_line_error(code, err, expected)


@pytest.mark.parametrize("size", ["100000x100000", "4x4"])
def test_data_synth_impossible_size_is_refused_before_any_memory(tmp_path, capsys, size):
    """(Passed before too: the renderer's size cap came with the data-robustness merge.)"""
    code, out, err = run(capsys, ["data", "synth", "--out", tmp_path / "ds", "--n", "1", "--size", size])
    one_line_error(code, err, "size must be", size.split("x")[0])
    assert not (tmp_path / "ds").exists()


def test_data_synth_into_a_file_valued_out(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, out, err = run(capsys, ["data", "synth", "--out", tmp_path / "afile" / "ds", "--n", "1", "--size", "64x128"])
    one_line_error(code, err, str(tmp_path / "afile"))
    assert (tmp_path / "afile").read_text() == "x"


def test_data_synth_force_writes_into_a_folder_holding_other_data(tmp_path, capsys):
    """Without --force the foreign folder is refused; with it the scenes are written and the other
    file stays. Before: --force was an unknown flag (argparse exit 2)."""
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "notes.txt").write_text("mine")
    code, out, err = run(capsys, ["data", "synth", "--out", ds, "--n", "1", "--size", "64x128"])
    one_line_error(code, err, str(ds))
    assert _files(ds) == ["notes.txt"]
    code, out, err = run(capsys, ["data", "synth", "--out", ds, "--n", "1", "--size", "64x128", "--force"])
    assert code == 0, err
    assert "wrote 1 synthetic scenes" in out and (ds / "notes.txt").read_text() == "mine"
    assert len(list((ds / "leftImg8bit").rglob("*.png"))) == 1


def test_export_into_a_file_valued_out(checkpoint, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, out, err = run(capsys, ["export", checkpoint, "--out", tmp_path / "afile" / "m.onnx", "--input", "64x64"])
    one_line_error(code, err, "not a directory", str(tmp_path / "afile"))


def test_export_full_disk_leaves_the_previous_file(checkpoint, tmp_path, capsys, monkeypatch):
    """ENOSPC inside the ONNX writer: one line naming the file; the earlier export is untouched."""
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous export")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.onnx, "export", full)
    code, out, err = run(capsys, ["export", checkpoint, "--out", target, "--input", "64x64"])
    one_line_error(code, err, "no space left on device", str(target))
    assert target.read_bytes() == b"previous export"


# ------------------------------------------------------------------------------ predict


def test_predict_keeps_colliding_stems_apart_and_reports_exactly_what_it_wrote(checkpoint, tmp_path, capsys):
    """Before: 'wrote 8 files' while a/frame and b/frame, odd.jpg and odd.png overwrote each other (4 files)."""
    imgs = [_image(tmp_path / "in" / "a" / "frame.png", seed=1), _image(tmp_path / "in" / "b" / "frame.png", seed=2),
            _image(tmp_path / "in" / "odd.jpg", seed=3), _image(tmp_path / "in" / "odd.png", seed=4)]
    out_dir = tmp_path / "pred"
    code, out, err = run(capsys, ["predict", checkpoint, *imgs, "--out", out_dir, "--device", "cpu"])
    assert code == 0, err
    expected = sorted(f"{stem}_{kind}.png" for stem in ("a__frame_png", "b__frame_png", "odd_jpg", "odd_png")
                      for kind in ("pred", "overlay"))
    assert _files(out_dir) == expected
    assert "wrote 8 files" in out
    listed = sorted(Path(line.strip()).name for line in out.splitlines()[1:])
    assert listed == expected
    # each overlay comes from its own input (the two frames differ)
    a, b = (np.asarray(Image.open(out_dir / f"{s}_overlay.png")) for s in ("a__frame_png", "b__frame_png"))
    assert not np.array_equal(a, b)


def test_predict_unique_stems_keep_their_plain_names(checkpoint, tmp_path, capsys):
    img = _image(tmp_path / "x.png")
    code, out, err = run(capsys, ["predict", checkpoint, img, img, "--out", tmp_path / "p", "--device", "cpu"])
    assert code == 0, err
    assert _files(tmp_path / "p") == ["x_overlay.png", "x_pred.png"]  # the same file twice is one input


def test_predict_accepts_a_folder_recursively_in_sorted_order(checkpoint, tmp_path, capsys):
    """Before: 'image ... not found' for a folder argument."""
    d = tmp_path / "frames"
    for rel in ("b.png", "sub/a.jpg", ".hidden/c.png"):
        _image(d / rel)
    (d / "notes.txt").write_text("not an image")
    code, out, err = run(capsys, ["predict", checkpoint, d, "--out", tmp_path / "p", "--device", "cpu"])
    assert code == 0, err
    assert _files(tmp_path / "p") == ["a_overlay.png", "a_pred.png", "b_overlay.png", "b_pred.png"]
    assert [Path(line.strip()).name for line in out.splitlines()[1:]] == \
        ["b_pred.png", "b_overlay.png", "a_pred.png", "a_overlay.png"]  # frames/b.png < frames/sub/a.jpg
    empty = tmp_path / "empty"
    (empty / "x").mkdir(parents=True)
    code, out, err = run(capsys, ["predict", checkpoint, empty, "--out", tmp_path / "q", "--device", "cpu"])
    one_line_error(code, err, str(empty), "holds no image")


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    text = tmp / "notes.png"
    text.write_text("hello, not a picture")
    trunc = tmp / "trunc.png"
    trunc.write_bytes(_image(tmp / "whole.png").read_bytes()[:200])
    return {
        "text-named-png": (text, "not an image file"),
        "truncated": (trunc, "cannot be decoded"),
        "too-small": (_image(tmp / "small.png", 20, 30), "at least 33x33"),
        "impossible-size": (_png_header_only(tmp / "huge.png", 100_000, 100_000), "too large"),
        "oversize": (_png_header_only(tmp / "big.png", 9000, 9000), "at most 8192x8192"),
        "missing": (tmp / "nope.png", "not found"),
    }


@pytest.mark.parametrize("case", ["text-named-png", "truncated", "too-small", "impossible-size", "oversize", "missing"])
def test_predict_checks_every_input_before_writing_anything(checkpoint, tmp_path, capsys, case):
    """A bad input after a good one: one line naming it, exit 2, no output at all. Before: the good
    image's outputs were written, then a traceback (PIL's UnidentifiedImageError, OSError, the
    DecompressionBombError) or a message that did not name the image (too small)."""
    good = _image(tmp_path / "good.png")
    bad, why = _bad_inputs(tmp_path)[case]
    out_dir = tmp_path / "pred"
    code, out, err = run(capsys, ["predict", checkpoint, good, bad, "--out", out_dir, "--device", "cpu"])
    one_line_error(code, err, bad.name, why)
    assert _files(out_dir) == [] and out == ""


def test_predict_unreadable_image_names_it(checkpoint, tmp_path, capsys, monkeypatch):
    """EACCES opening an input (root reads everything, so it is injected). Before: a traceback."""
    import PIL.Image

    good, secret = _image(tmp_path / "good.png"), _image(tmp_path / "secret.png")
    original = PIL.Image.open

    def guarded(fp, *a, **k):
        if Path(str(fp)) == secret:
            raise PermissionError(errno.EACCES, "Permission denied", str(secret))
        return original(fp, *a, **k)

    monkeypatch.setattr(PIL.Image, "open", guarded)
    code, out, err = run(capsys, ["predict", checkpoint, good, secret, "--out", tmp_path / "p", "--device", "cpu"])
    one_line_error(code, err, "permission denied", str(secret))
    assert _files(tmp_path / "p") == []


def test_predict_into_a_file_valued_out_and_out_of_memory(checkpoint, tmp_path, capsys, monkeypatch):
    """A file where --out's folder should be; then MemoryError inside the model (before: a traceback)."""
    img = _image(tmp_path / "x.png")
    (tmp_path / "afile").write_text("x")
    code, out, err = run(capsys, ["predict", checkpoint, img, "--out", tmp_path / "afile" / "p", "--device", "cpu"])
    one_line_error(code, err, "not a directory", str(tmp_path / "afile"))
    import fasterkd.inference as inference

    def no_memory(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(inference, "normalize", no_memory, raising=False)
    monkeypatch.setattr("fasterkd.data.transforms.normalize", no_memory)
    code, out, err = run(capsys, ["predict", checkpoint, img, "--out", tmp_path / "p", "--device", "cpu"])
    one_line_error(code, err, "out of memory")
    assert _files(tmp_path / "p") == []


# ------------------------------------------------------------------------------ eval


@pytest.mark.parametrize("value", ["0", "-1"])
def test_eval_max_images_must_be_at_least_one(checkpoint, capsys, value):
    """Before: 0 evaluated every image (exit 0); -1 failed with 'gave no image', not naming the flag."""
    code, out, err = run(capsys, ["eval", checkpoint, "--device", "cpu", "--max-images", value])
    one_line_error(code, err, "--max-images", value)


def test_eval_of_a_dataset_whose_labels_are_all_ignore(checkpoint, tmp_path, capsys):
    """eval names the dataset, exit 2, writes no JSON. (Passed on the merged main already: evaluate()
    refuses it since the evaluation-robustness merge; a traceback on the issue's tree.)"""
    ds = tmp_path / "ds"
    assert cli.main(["data", "synth", "--out", str(ds), "--n", "2", "--size", "64x128", "--split", "val"]) == 0
    for label in (ds / "gtFine").rglob("*.png"):
        Image.fromarray(np.full((64, 128), 255, np.uint8)).save(label)
    capsys.readouterr()
    code, out, err = run(capsys, ["eval", checkpoint, "--device", "cpu", "--data-root", ds, "--split", "val",
                                  "--json", tmp_path / "val.json"])
    one_line_error(code, err, str(ds), "all ignore")
    assert not (tmp_path / "val.json").exists()


# ------------------------------------------------------------------------------ export


@pytest.mark.parametrize("opset", ["99", "6", "0", "-3"])
def test_export_opset_outside_what_torch_onnx_writes(checkpoint, tmp_path, capsys, opset):
    """Before: exit 2 with torch's 'Unsupported onnx_opset_version' after a TorchScript graph dump of
    ~120 kB on stdout; now the flag is named and nothing is printed or written."""
    code, out, err = run(capsys, ["export", checkpoint, "--opset", opset, "--out", tmp_path / "m.onnx"])
    one_line_error(code, err, "--opset", opset, "from 7 to 20")
    assert out == "" and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("size", ["100000x100000", "16x16"])
def test_export_impossible_input_size_names_input(checkpoint, tmp_path, capsys, size):
    code, out, err = run(capsys, ["export", checkpoint, "--input", size, "--out", tmp_path / "m.onnx"])
    one_line_error(code, err, "--input", size)


def test_export_check_passes_and_fails_beyond_its_tolerance(checkpoint, tmp_path, capsys, monkeypatch):
    """The check reports abs and relative difference; a graph off by more than atol + rtol*max|logit|
    fails with exit 2 and does not replace the earlier export. Before: exit 0, abs difference only."""
    ort = pytest.importorskip("onnxruntime")
    target = tmp_path / "m.onnx"
    code, out, err = run(capsys, ["export", checkpoint, "--input", "64x64", "--out", target])
    assert code == 0, err
    diff, rel = float(out.split("max abs difference ")[1].split()[0]), float(out.split("relative ")[1].split()[0])
    assert 0 <= diff < 1e-4 and 0 <= rel < 1e-3
    good = target.read_bytes()

    class Skewed(ort.InferenceSession):
        def run(self, *a, **k):
            return [o + np.float32(0.5) for o in super().run(*a, **k)]

    monkeypatch.setattr(ort, "InferenceSession", Skewed)
    code, out, err = run(capsys, ["export", checkpoint, "--input", "64x64", "--out", target])
    one_line_error(code, err, str(target), "max abs difference 5.000e-01", "relative")
    assert target.read_bytes() == good


def test_export_difference_tolerance_scales_with_the_logits():
    from fasterkd.inference import EXPORT_ATOL, EXPORT_RTOL, export_difference

    ref = np.array([[100.0, -50.0]], np.float32)
    ok = export_difference(ref + np.float32(0.05), ref, "m.onnx")  # 0.05 <= 1e-4 + 1e-3 * 100
    assert ok["max_abs_diff"] == pytest.approx(0.05, rel=1e-3) and ok["max_rel_diff"] == pytest.approx(5e-4, rel=1e-3)
    assert ok["tolerance"] == pytest.approx(EXPORT_ATOL + EXPORT_RTOL * 100)
    with pytest.raises(ValueError, match=r"m.onnx: .*max abs difference 2.000e-01, relative 2.000e-03"):
        export_difference(ref + np.float32(0.2), ref, "m.onnx")
    with pytest.raises(ValueError, match="output shape"):
        export_difference(ref[:, :1], ref, "m.onnx")
    with pytest.raises(ValueError, match="max abs difference inf"):
        export_difference(ref * np.float32("nan"), ref, "m.onnx")
