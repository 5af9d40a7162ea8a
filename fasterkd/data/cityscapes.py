"""Cityscapes: the 19 training classes, their colours, the official label-id table and a loader.

The class table (train ids 0-18, names, RGB colours, label ids) is cityscapesScripts'
``helpers/labels.py`` as summarised in ``hrnet-fa-kd.md`` §2.1; every label id that is not one
of the 19 evaluated classes (0-6, 9, 10, 14-16, 18, 29, 30 and the license plate -1) maps to
``IGNORE_INDEX`` = 255, exactly as cityscapesScripts' ``createTrainIdLabelImgs`` and HRNet's
on-the-fly ``label_mapping`` do.

The loader reads the official layout::

    <root>/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png
    <root>/gtFine/<split>/<city>/<stem>_gtFine_labelIds.png        (preferred)
    <root>/gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png   (used when labelIds is absent)

which is also what :func:`fasterkd.data.synthetic.write_synthetic` writes.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

NUM_CLASSES = 19
IGNORE_INDEX = 255

CLASS_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)

# official cityscapesScripts colours (RGB) of train ids 0..18
PALETTE = np.array(
    [
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
        (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
        (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
        (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
    ],
    dtype=np.uint8,
)
PALETTE.setflags(write=False)

# label id of each train id (hrnet-fa-kd.md §2.1 / §5 item 7)
TRAIN_TO_LABEL_ID: tuple[int, ...] = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
LABEL_TO_TRAIN_ID: dict[int, int] = {label_id: train_id for train_id, label_id in enumerate(TRAIN_TO_LABEL_ID)}

# 256-entry lookup table for uint8 label-id images; every unlisted id (and -1, see below) -> 255
_LUT = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _label_id, _train_id in LABEL_TO_TRAIN_ID.items():
    _LUT[_label_id] = _train_id

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_ID_SUFFIX = "_gtFine_labelIds.png"
TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"


def labelids_to_trainids(label: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Map Cityscapes label ids to train ids with the official table (255 = ignore).

    Works on NumPy arrays and torch tensors of any integer dtype and returns the same kind
    (uint8 for NumPy, int64 for torch). Negative ids (the license plate, -1) and ids above 33
    map to 255.
    """
    if isinstance(label, torch.Tensor):
        lut = torch.from_numpy(_LUT.astype(np.int64)).to(label.device)
        lab = label.long()
        valid = (lab >= 0) & (lab <= 255)
        return torch.where(valid, lut[lab.clamp(0, 255)], torch.full_like(lab, IGNORE_INDEX))
    arr = np.asarray(label)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"label must hold integer label ids, got dtype {arr.dtype}")
    if arr.dtype == np.uint8:
        return _LUT[arr]
    arr = arr.astype(np.int64)
    out = np.full(arr.shape, IGNORE_INDEX, dtype=np.uint8)
    valid = (arr >= 0) & (arr <= 255)
    out[valid] = _LUT[arr[valid]]
    return out


def trainids_to_labelids(label: np.ndarray) -> np.ndarray:
    """Inverse map (for cityscapesScripts-style submissions): train id -> label id, 255 -> 0 (unlabeled)."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[: NUM_CLASSES] = TRAIN_TO_LABEL_ID
    return lut[np.asarray(label).astype(np.uint8)]


def colorize(label: np.ndarray | torch.Tensor) -> np.ndarray:
    """Colour-code a (H, W) train-id map with the official palette: uint8 (H, W, 3); 255 -> black."""
    arr = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    if arr.ndim != 2:
        raise ValueError(f"label must be a (H, W) train-id map, got shape {arr.shape}")
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:NUM_CLASSES] = PALETTE
    idx = arr.astype(np.int64)
    idx = np.where((idx >= 0) & (idx < 256), idx, IGNORE_INDEX)
    return lut[idx]


def find_pairs(root: str | os.PathLike, split: str) -> list[tuple[Path, Path, str]]:
    """All (image, label, kind) triples of one split, sorted by image path.

    ``kind`` is ``"labelIds"`` or ``"trainIds"``. When a frame has both label files the
    ``*_gtFine_labelIds.png`` is used (it is the official annotation; the train-id file is a
    derived product that may be stale or, as in the shipped sample, resampled separately) and
    mapped through :func:`labelids_to_trainids`; otherwise ``*_gtFine_labelTrainIds.png`` is read
    as is.

    Raises ``FileNotFoundError`` naming the path for a missing root, a missing split folder,
    a split without images, or an image without a label file.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {str(root)!r} does not exist (expected a folder with leftImg8bit/ and gtFine/)")
    image_dir = root / "leftImg8bit" / split
    if not image_dir.is_dir():
        have = sorted(p.name for p in (root / "leftImg8bit").iterdir() if p.is_dir()) if (root / "leftImg8bit").is_dir() else []
        raise FileNotFoundError(
            f"split folder {str(image_dir)!r} does not exist (expected <root>/leftImg8bit/{split}/<city>/*{IMAGE_SUFFIX}; "
            f"splits found: {have or 'none'})"
        )
    images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
    if not images:
        raise FileNotFoundError(f"no images matching {str(image_dir / ('*/*' + IMAGE_SUFFIX))!r}")
    label_dir = root / "gtFine" / split
    pairs = []
    for image in images:
        stem = image.name[: -len(IMAGE_SUFFIX)]
        city = image.parent.name
        label_ids = label_dir / city / f"{stem}{LABEL_ID_SUFFIX}"
        train_ids = label_dir / city / f"{stem}{TRAIN_ID_SUFFIX}"
        if label_ids.is_file():
            pairs.append((image, label_ids, "labelIds"))
        elif train_ids.is_file():
            pairs.append((image, train_ids, "trainIds"))
        else:
            raise FileNotFoundError(
                f"image {str(image)!r} has no label: expected {str(label_ids)!r} or {str(train_ids)!r}"
            )
    return pairs


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An RGB image file as uint8 (H, W, 3); ``ValueError`` naming the file when it cannot be decoded."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")).copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {str(path)!r} not found") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises UnidentifiedImageError/OSError on corrupt data
        raise ValueError(f"cannot read image file {str(path)!r} (expected an RGB PNG/JPEG): {e}") from None


LABEL_ID_MAX = 33  # the largest Cityscapes label id (``licence plate`` is -1)


def read_label(path: str | os.PathLike, kind: str) -> np.ndarray:
    """A label file as uint8 train ids (H, W); ``kind`` is ``"labelIds"`` or ``"trainIds"``.

    Refused with a ``ValueError`` naming the file: a label that is not a PNG (a JPEG changes ids
    along every edge: it is never a usable label), a multi-channel image, and a 16/32-bit image
    whose values do not fit in 0..255 (e.g. ids scaled to 16 bits: read as is they would all be
    ignore). A 16-bit image whose values are plain ids is read as is (the ids are intact). Values
    that are no label (a train id in 19..254, a label id in 34..254, as a JPEG-compressed or
    colour-coded image that was re-saved as PNG holds) are mapped to 255 as before, with a warning
    naming the file and the values.
    """
    path = Path(path)
    if kind not in ("labelIds", "trainIds"):
        raise ValueError(f"kind must be 'labelIds' or 'trainIds', got {kind!r}")
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise ValueError(f"label file {str(path)!r} is a {im.format} image; labels must be lossless PNG "
                                 "(JPEG compression changes the ids along every edge)")
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise ValueError(f"label file {str(path)!r} has mode {im.mode}; expected a single-channel id image")
            arr = np.asarray(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"label file {str(path)!r} not found") from None
    except ValueError:
        raise
    except (OSError, SyntaxError) as e:
        raise ValueError(f"cannot read label file {str(path)!r} (expected a single-channel PNG of ids): {e}") from None
    if arr.dtype != np.uint8:
        wide = arr.astype(np.int64)
        low, high = (int(wide.min()), int(wide.max())) if wide.size else (0, 0)
        if high > 255 or (kind == "trainIds" and low < 0):
            raise ValueError(f"label file {str(path)!r} is a {8 * arr.dtype.itemsize}-bit image with values "
                             f"{low}..{high}; expected ids in 0..255 (save labels as 8-bit PNG)")
        if kind == "labelIds":
            return labelids_to_trainids(wide)  # -1 (licence plate) -> 255
        arr = wide.astype(np.uint8)
    if kind == "labelIds":
        _warn_non_label(path, arr, LABEL_ID_MAX + 1, "label ids 0..33")
        return labelids_to_trainids(arr)
    _warn_non_label(path, arr, NUM_CLASSES, "train ids 0..18")
    return np.where(arr < NUM_CLASSES, arr, IGNORE_INDEX).astype(np.uint8)


def _warn_non_label(path: Path, arr: np.ndarray, first_bad: int, expected: str) -> None:
    bad = (arr >= first_bad) & (arr != IGNORE_INDEX)
    if bad.any():
        values = np.unique(arr[bad])
        warnings.warn(f"label file {str(path)!r}: {int(bad.sum())} pixels hold values {values[:6].tolist()} that are "
                      f"neither {expected} nor 255 (a JPEG-compressed or colour-coded label?); read as ignore (255)",
                      stacklevel=3)


#: decoded frames a process keeps in memory (bytes; ``FASTERKD_DECODE_CACHE_MB``): a split that fits
#: is decoded once and re-read by every epoch and every run of the process (decoding one 256x512
#: synthetic PNG costs about 6 ms, a tenth of a quick student step); a split that does not fit
#: (Cityscapes) is read from disk every time and holds no memory.
DECODE_CACHE_BYTES = int(float(os.environ.get("FASTERKD_DECODE_CACHE_MB", "512")) * 2**20)


class _DecodedFrames:
    """Decoded (image, label) arrays keyed by both files' paths, sizes and modification times."""

    def __init__(self) -> None:
        self.items: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self.bytes = 0

    @staticmethod
    def key(image_path: Path, label_path: Path, kind: str) -> tuple | None:
        try:
            si, sl = image_path.stat(), label_path.stat()  # a rewritten file gets a new key
        except OSError:
            return None  # not cached: reading it gives the error that names the file
        return (str(image_path), si.st_size, si.st_mtime_ns, str(label_path), sl.st_size, sl.st_mtime_ns, kind)

    def room_for(self, nbytes: int) -> bool:
        return self.bytes + nbytes <= DECODE_CACHE_BYTES

    def put(self, key: tuple, image: np.ndarray, label: np.ndarray) -> None:
        if key not in self.items and self.room_for(image.nbytes + label.nbytes):
            self.items[key] = (image, label)
            self.bytes += image.nbytes + label.nbytes


DECODED = _DecodedFrames()


class CityscapesDataset(torch.utils.data.Dataset):
    """Cityscapes-layout dataset (real Cityscapes or the synthetic scenes).

    Item ``i`` is ``{"image", "label", "name"}``. Without a transform the image is the raw
    uint8 RGB tensor (3, H, W) and the label int64 train ids (H, W) (255 = ignore), so a
    training transform can rescale and crop before normalising (spec §9.4). With a transform,
    ``transform(image, label)`` returns the pair stored in the item (e.g. :class:`EvalTransform`
    gives the float32 ImageNet-normalised image of DESIGN.md's tensor contract). ``name`` is the
    frame stem, e.g. ``frankfurt_000000_000294``.
    """

    def __init__(self, root: str | os.PathLike, split: str, transform: Callable | None = None) -> None:
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.pairs = find_pairs(self.root, split)
        self._cached: bool | None = None  # decided at the first item: does the whole split fit DECODED?

    def __len__(self) -> int:
        return len(self.pairs)

    def name(self, index: int) -> str:
        return self.pairs[index][0].name[: -len(IMAGE_SUFFIX)]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image uint8 (H, W, 3) and train ids uint8 (H, W) of item ``index``, sizes checked.

        From :data:`DECODED` when the split fits it (the arrays returned are copies either way)."""
        image_path, label_path, kind = self.pairs[index]
        key = DECODED.key(image_path, label_path, kind) if self._cached is not False else None
        if key in DECODED.items:
            image, label = DECODED.items[key]
            return image.copy(), label.copy()
        image, label = self._decode(image_path, label_path, kind)
        if key is not None:
            if self._cached is None:  # the first frame's size times the split's length
                self._cached = DECODED.room_for((image.nbytes + label.nbytes) * len(self))
            if self._cached:
                DECODED.put(key, image.copy(), label.copy())
        return image, label

    @staticmethod
    def _decode(image_path: Path, label_path: Path, kind: str) -> tuple[np.ndarray, np.ndarray]:
        image = read_image(image_path)
        label = read_label(label_path, kind)
        if image.shape[:2] != label.shape:
            raise ValueError(
                f"image {str(image_path)!r} is {image.shape[0]}x{image.shape[1]} but its label {str(label_path)!r} is "
                f"{label.shape[0]}x{label.shape[1]}; expected the same HxW"
            )
        return image, label

    def __getitem__(self, index: int) -> dict:
        image, label = self.load(index)
        image_t = torch.from_numpy(image).permute(2, 0, 1).contiguous()
        label_t = torch.from_numpy(label.astype(np.int64))
        if self.transform is not None:
            image_t, label_t = self.transform(image_t, label_t)
        return {"image": image_t, "label": label_t, "name": self.name(index)}

    def __repr__(self) -> str:
        return f"CityscapesDataset(root={str(self.root)!r}, split={self.split!r}, images={len(self)})"
