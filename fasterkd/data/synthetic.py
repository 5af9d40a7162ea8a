"""The embedded default dataset on disk: synthetic street scenes (:mod:`fasterkd.data.scenes`)
written in the Cityscapes layout, once per size and seed, completed or grown on demand.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from fasterkd.data.scenes import check_size, render_scene
from fasterkd.utils import atomic_path, atomic_write_json

# default first index of each split, so that train and val scenes of one seed never coincide
SPLIT_OFFSETS = {"train": 0, "val": 100_000, "test": 200_000}


def split_offset(split: str) -> int:
    """Default first scene index of a split (train 0, val 100000, test 200000, others hashed)."""
    if split in SPLIT_OFFSETS:
        return SPLIT_OFFSETS[split]
    return 300_000 + (zlib.crc32(split.encode()) % 6) * 100_000


def scene_paths(root: str | os.PathLike, split: str, seed: int, index: int) -> tuple[Path, Path]:
    """Image and label path of one synthetic scene in the Cityscapes layout (city folder ``synth``)."""
    stem = f"synth_{seed}_{index:06d}"
    root = Path(root)
    return (root / "leftImg8bit" / split / "synth" / f"{stem}_leftImg8bit.png",
            root / "gtFine" / split / "synth" / f"{stem}_gtFine_labelTrainIds.png")


def _save_png(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def foreign_data(out: str | os.PathLike, size: tuple[int, int]) -> str | None:
    """Why ``out`` holds data other than synthetic scenes of ``size`` (None when it holds none).

    Other data: files or folders besides ``leftImg8bit/``, ``gtFine/`` and ``synthetic.json`` (a run
    folder, anything), a city folder other than ``synth`` (a real Cityscapes tree), or synthetic
    scenes of another size (read from ``synthetic.json`` or one image's header).
    """
    out = Path(out)
    if not out.is_dir():
        return None
    h, w = size
    for top in ("leftImg8bit", "gtFine"):
        folder = out / top
        if folder.exists() and not folder.is_dir():
            return f"{top} is a file"
        if not folder.is_dir():
            continue
        cities = sorted({c.name for split in folder.iterdir() if split.is_dir() for c in split.iterdir()} - {"synth"})
        if cities:
            return f"it holds a Cityscapes-layout dataset (cities {', '.join(cities[:5])}{', ...' if len(cities) > 5 else ''})"
    others = sorted(p.name for p in out.iterdir()
                    if p.name not in ("leftImg8bit", "gtFine", "synthetic.json") and not p.name.endswith(".tmp"))
    if others:
        return f"it holds other files ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''})"
    meta = out / "synthetic.json"
    if meta.is_file():
        try:
            recorded = json.loads(meta.read_text()).get("size")
        except (OSError, ValueError, AttributeError):
            return f"{meta} cannot be read"
        if recorded is not None and list(recorded) != [h, w]:
            return f"it holds synthetic scenes of size {recorded[0]}x{recorded[1]}"
    for image in sorted((out / "leftImg8bit").glob("*/synth/*_leftImg8bit.png"))[:1]:
        try:
            with Image.open(image) as im:
                have_w, have_h = im.size
        except OSError:
            return f"{image} cannot be read"
        if (have_h, have_w) != (h, w):
            return f"it holds synthetic scenes of size {have_h}x{have_w}"
    return None


def write_synthetic(out: str | os.PathLike, n: int, size: tuple[int, int] | str = (256, 512), seed: int = 0,
                    split: str = "train", start: int | None = None, only_missing: bool = False,
                    force: bool = False) -> int:
    """Write ``n`` scenes into ``out`` in the Cityscapes layout; returns how many were written.

    Files: ``leftImg8bit/<split>/synth/synth_<seed>_<index:06d>_leftImg8bit.png`` and
    ``gtFine/<split>/synth/synth_<seed>_<index:06d>_gtFine_labelTrainIds.png`` (train ids, 255 =
    ignore; no labelIds file, so :func:`fasterkd.data.cityscapes.find_pairs` reads the train ids).
    Scene indices run from ``start``; by default the split's offset (:func:`split_offset`), so
    that ``--split train`` and ``--split val`` with one seed give different scenes. Each file is
    written atomically (a crash leaves no half-written PNG); the bytes depend only on
    (seed, index, size). ``only_missing`` skips scenes whose two files exist.

    A folder that holds other data (:func:`foreign_data`: a real Cityscapes tree, synthetic scenes
    of another size, other files) is refused with a ``ValueError`` unless ``force``; adding scenes
    of the same size (another split or seed) is allowed.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not split or "/" in split or split.startswith("."):
        raise ValueError(f"split must be a plain folder name, got {split!r}")
    size = check_size(size)
    start = split_offset(split) if start is None else int(start)
    if start < 0 or start + n > 1_000_000:
        raise ValueError(f"scene indices must lie in [0, 1000000), got start={start}, n={n}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {str(out)!r} exists and is not a folder")
    why = None if force else foreign_data(out, size)
    if why is not None:
        raise ValueError(f"out {str(out)!r} already holds other data: {why}; choose an empty folder "
                         "(or force writing into it)")
    written = 0
    for index in range(start, start + n):
        image_path, label_path = scene_paths(out, split, seed, index)
        if only_missing and image_path.is_file() and label_path.is_file():
            continue
        rgb, label = render_scene(seed, index, size)
        _save_png(label, label_path)  # label first: an image is never visible without its label
        _save_png(rgb, image_path)
        written += 1
    return written


def ensure_synthetic(root: str | os.PathLike, splits: dict[str, int], size: tuple[int, int] | str = (256, 512), seed: int = 0) -> Path:
    """Make sure ``root`` holds the synthetic set ``splits`` (e.g. ``{"train": 200, "val": 50}``).

    Writes only the scenes that are missing (so a partial set left by a killed run is completed,
    and growing a split adds scenes). ``root/synthetic.json`` records size and seed; a root made
    with a different size or seed is an error rather than a silent mix.
    """
    root = Path(root)
    size = check_size(size)
    meta_path = root / "synthetic.json"
    meta = {"generator": "fasterkd.data.synthetic", "size": list(size), "seed": int(seed)}
    if meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {str(meta_path)!r}: {e}") from None
        if not isinstance(old, dict):
            raise ValueError(f"{str(meta_path)!r} is not a synthetic-set record (expected a JSON object)")
        if old.get("size") != meta["size"] or old.get("seed") != meta["seed"]:
            raise ValueError(f"{str(root)!r} holds synthetic scenes of size {old.get('size')} seed {old.get('seed')}, "
                             f"expected size {meta['size']} seed {meta['seed']}; use another folder")
    else:
        why = foreign_data(root, size)
        if why is not None:
            raise ValueError(f"{str(root)!r} holds other data ({why}); use another folder")
        atomic_write_json(meta_path, meta)
    for split, n in splits.items():
        write_synthetic(root, n, size, seed=seed, split=split, only_missing=True)
    return root
