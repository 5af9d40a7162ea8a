"""The image inputs of ``fasterkd predict`` (and the input size of ``export``), checked before
anything is written.

- :func:`collect_images` turns the command's arguments (files and folders) into the list of
  images: a folder contributes every image file under it, recursively, in sorted path order
  (hidden files and folders left out); a folder without one is an error.
- :func:`check_image` opens each one as an image (its header, then a full decode, so a truncated
  or renamed file is caught) and checks its size (:func:`check_input_size`).
- :func:`output_stems` names the outputs so that no two inputs share a name: an image's stem
  when no other input has it, otherwise its path relative to the colliding inputs' common folder
  with ``/`` as ``__`` and its suffix kept (``a/frame.png`` -> ``a__frame_png``, ``odd.jpg`` ->
  ``odd_jpg``); any name still taken gets ``_2``, ``_3`` in input order. Deterministic for a
  given command line.
"""

from __future__ import annotations

import os
from pathlib import Path

#: suffixes read as images inside a folder argument (a file given by name is opened whatever its suffix)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
#: the student's 1/32 branch needs a 2x2 feature map (zoomed convolutions); the networks pad their
#: input to a multiple of 32, so 33 pixels (padded to 64) is the smallest side that works
MIN_SIDE = 33
#: the largest side accepted (as the synthetic renderer's cap); larger inputs exhaust memory
MAX_SIDE = 8192


def check_input_size(size: tuple[int, int], name: str) -> tuple[int, int]:
    """``size`` (H, W) within [MIN_SIDE, MAX_SIDE] per side, else a ``ValueError`` naming ``name``."""
    h, w = (int(v) for v in size)
    if h < MIN_SIDE or w < MIN_SIDE:
        raise ValueError(f"{name} must be at least {MIN_SIDE}x{MIN_SIDE} (padded to a multiple of 32, "
                         f"the network's 1/32 branch needs 2x2 pixels), got {h}x{w}")
    if h > MAX_SIDE or w > MAX_SIDE:
        raise ValueError(f"{name} must be at most {MAX_SIDE}x{MAX_SIDE}, got {h}x{w}")
    return h, w


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def collect_images(inputs: list[str | os.PathLike]) -> list[Path]:
    """The image files of ``inputs`` (files as given, folders expanded recursively, sorted), each once."""
    if not inputs:
        raise ValueError("no input image given")
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*")
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and _visible(p, path))
            if not inside:
                raise FileNotFoundError(f"input folder {str(path)!r} holds no image ({', '.join(IMAGE_SUFFIXES)})")
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        elif path.exists():
            raise ValueError(f"input {str(path)!r} is neither a file nor a folder")
        else:
            raise FileNotFoundError(f"image {str(path)!r} not found")
    unique, seen = [], set()
    for p in found:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def check_image(path: Path) -> tuple[int, int]:
    """Open ``path`` as an image, decode it fully and check its size; returns (H, W)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            check_input_size((h, w), f"image {str(path)!r}")
            im.load()  # a truncated or corrupt file fails here, before anything is written
    except UnidentifiedImageError as e:
        raise ValueError(f"image {str(path)!r} is not an image file PIL can read") from e
    except Image.DecompressionBombError as e:
        raise ValueError(f"image {str(path)!r} is too large to decode safely ({e})") from e
    except (OSError, SyntaxError) as e:  # PIL reports broken data as OSError or SyntaxError
        if isinstance(e, OSError) and e.filename is not None:
            raise
        raise ValueError(f"image {str(path)!r} cannot be decoded ({type(e).__name__}: {e})") from e
    return h, w


def _group_name(path: Path, common: Path) -> str:
    rel = path.resolve().relative_to(common)
    parts = list(rel.parts[:-1]) + [rel.stem + (("_" + rel.suffix[1:]) if rel.suffix else "")]
    return "__".join(parts)


def output_stems(paths: list[Path]) -> list[str]:
    """One distinct output stem per input path (see the module docstring)."""
    by_stem: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        by_stem.setdefault(p.stem, []).append(i)
    names = [p.stem for p in paths]
    for idx in by_stem.values():
        if len(idx) > 1:
            resolved = [paths[i].resolve() for i in idx]
            common = Path(os.path.commonpath([str(r.parent) for r in resolved]))
            for i, r in zip(idx, resolved):
                names[i] = _group_name(r, common)
    taken: dict[str, int] = {}
    out = []
    for name in names:
        n = taken.get(name, 0) + 1
        taken[name] = n
        out.append(name if n == 1 else f"{name}_{n}")
    # a suffixed name may equal another input's name: count again until every name is distinct
    while len(set(out)) != len(out):
        seen: set[str] = set()
        for i, name in enumerate(out):
            while name in seen:
                name += "_"
            seen.add(name)
            out[i] = name
    return out


def plan_predictions(inputs: list[str | os.PathLike]) -> list[tuple[Path, str]]:
    """(image, output stem) for every input image, each checked; raises before any output exists."""
    paths = collect_images(inputs)
    for p in paths:
        check_image(p)
    return list(zip(paths, output_stems(paths)))
