"""From architecture parameters to a discrete FasterSeg network, and the official arch files.

- :func:`derive_arch` turns alpha / beta / gamma logits into an :class:`ArchSpec` (spec §7): the
  downsampling positions from beta, the widths from gamma, the ops from alpha with FasterSeg's skip
  handling (skips are removed from the network, never kept as ops).
- :func:`objective` and :func:`select_lasts`: the MnasNet-style reward mIoU * (lat / target)^w
  and the choice between the branch sets [2, 0] and [2, 1] (spec §5.3, §7).
- :func:`load_official_arch` / :func:`import_official_arch`: read an official ``arch_{k}.pt``
  (a legacy pickle holding CUDA tensors and numpy scalars) with ``torch.load(weights_only=True)``
  and an allow-list of the two numpy names it needs, then derive the official student/teacher.

Official quirks (spec §12 items 10 and 11), replicated when ``official_quirks=True`` (the default,
because only then does importing ``arch_1.pt`` / ``arch_0.pt`` give the released networks of spec
§8.4 / §8.5) and fixed otherwise:

- **beta row offset (item 10).** For the 1/16-only path the official rule takes the beta_1 row k
  with the largest "from down" probability and puts the stride-2 cell at layer k; but row k belongs
  to the 1/16 cell of layer k + 2, which is fed by the 1/8 cell of layer k + 1. Fixed: layer k + 1.
  (The 1/32 rule uses the right offsets: layers a + 1 and b + 2.)
- **shared in-place edits (item 11).** The official code derives last = 0, 1, 2 in this order on
  the same tensors: alpha logits set to -inf by one derivation (skip handling) persist into the
  next, and beta is replaced by its softmax in place, so the 1/16 rule ranks softmax(softmax(beta))
  and the 1/32 rule softmax^3(beta) (the 1/32 choice maximises a product, which the repeated
  softmax can reorder). Fixed: every derivation starts from the same logits and one softmax.
- With a single width column (a ``max``-mode arch) the official code uses width 1.0 with
  ``ignore_skip`` and 4/12 without; fixed: 1.0 (the only width that arch was trained at).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fasterkd.models.arch import PRIMITIVES, ArchSpec, BranchSpec

WIDTH_MULT_LIST = (4 / 12, 6 / 12, 8 / 12, 10 / 12, 1.0)
ROLES = {  # arch index in the official files -> role, stem/head width, ignore_skip
    0: ("teacher", (1.0, 1.0), True),
    1: ("student", (8 / 12, 8 / 12), False),
}
TARGET_LATENCY_MS = 8.3
LATENCY_EXPONENT = -0.07


# --------------------------------------------------------------------------------------------
# selection objective (spec §5.3, §7)
# --------------------------------------------------------------------------------------------


def objective(miou: float, latency_ms: float, target: float = TARGET_LATENCY_MS, w: float = LATENCY_EXPONENT) -> float:
    """mIoU * (latency / target)^w: the soft latency reward FasterSeg uses to pick branches (spec §5.3)."""
    if latency_ms <= 0 or target <= 0:
        raise ValueError(f"latency_ms and target must be positive, got {latency_ms} and {target}")
    return float(miou) * (float(latency_ms) / target) ** w


def select_lasts(miou02: float, latency02: float, miou12: float, latency12: float, **kw: float) -> list[int]:
    """[2, 0] if the (1/32 + 1/8) pair has the higher objective, else [2, 1] (official ``train.py``)."""
    return [2, 0] if objective(miou02, latency02, **kw) > objective(miou12, latency12, **kw) else [2, 1]


# --------------------------------------------------------------------------------------------
# derivation (spec §7)
# --------------------------------------------------------------------------------------------


def _downs_to_path(downs: list[int]) -> list[int]:
    path = [0]
    for d in downs[:-1]:
        path.append(path[-1] + d)
    return path


def _path_to_downs(path: list[int]) -> list[int]:
    return [path[i + 1] - path[i] for i in range(len(path) - 1)] + [0]


def _choose_path(betas: list[Tensor], last: int, layers: int, official_quirks: bool) -> list[int]:
    """Downsampling positions from the beta "from down" probabilities (spec §7 step 2)."""
    downs = [0] * layers
    if last == 1:
        if layers >= 5:  # official: rows 1 .. L-4, keeping >= 2 layers at 1/8 and at 1/16
            k = int(torch.argmax(betas[1][1:-1, 0])) + 1
        else:  # small spaces: any row (its stride-2 layer is never the last layer)
            k = int(torch.argmax(betas[1][:, 0]))
        downs[k if official_quirks else k + 1] = 1
    elif last == 2:
        # official: b in 0 .. L-5, a in 1 .. b-2 (>= 3 cells at 1/16, >= 2 at 1/32); spaces with
        # fewer than 8 layers have no such pair and use every pair with a <= b instead
        pairs = [(a, b) for b in range(layers - 4) for a in range(1, b - 1)]
        if not pairs:
            pairs = [(a, b) for b in range(layers - 3) for a in range(0, b + 1)]
        best, best_ab = 0.0, pairs[0]
        for a, b in pairs:
            prob = float(betas[1][a, 0] * betas[2][b, 0])
            if prob > best:
                best, best_ab = prob, (a, b)
        downs[best_ab[0] + 1] = 1
        downs[best_ab[1] + 2] = 1
    return _downs_to_path(downs)


def _path_widths(path: list[int], ratios: list[Tensor], width_mult_list: Sequence[float]) -> list[float]:
    """Output width of layer l - 1 for l = 1 .. len(path) - 1, from the gamma logits of its node (§7 step 3)."""
    widths = []
    for layer in range(1, len(path)):
        s = path[layer]
        row = ratios[0][layer - 1] if s == 0 else ratios[s][layer - s]
        widths.append(float(width_mult_list[int(torch.argmax(row))]) if row.numel() > 1 else float(width_mult_list[0]))
    return widths


def _choose_ops(alphas: list[Tensor], path: list[int], widths: list[float], last: int,
                ignore_skip: bool) -> tuple[list[int], list[int], list[float]]:
    """Ops with FasterSeg's skip handling; edits ``alphas`` in place (spec §7 step 4)."""
    n = len(path)
    row = lambda i: alphas[path[i]][i - path[i]]  # noqa: E731  (alpha row of layer i)
    min_len = min(n, int(round(n / 3)) + 2 * last)  # the official minimum (capped for tiny spaces)
    candidates: list[tuple[int, float]] = []  # (layer, skip probability) of removable skips
    for i in range(n):
        if ignore_skip:
            row(i)[0] = -math.inf
        if int(torch.argmax(row(i))) == 0 and (i == n - 1 or path[i] == path[i + 1]):
            candidates.append((i, float(F.softmax(row(i), -1)[0])))
    skip_pos = [i for i, _ in candidates]
    downs_at = [i for i in range(n - 1) if path[i] < path[i + 1]]
    if downs_at:
        bounds = downs_at + [n]
        for p1, p2 in zip(bounds[:-1], bounds[1:]):
            inside = list(range(p1 + 1, p2))
            # a segment between two downsamplings (or to the end) may not consist of skips only
            if inside and all(i in skip_pos for i in inside):
                lowest = min(reversed(inside), key=lambda i: float(F.softmax(row(i), -1)[0]))
                row(lowest)[0] = -math.inf
    if len(candidates) > n - min_len:
        candidates = sorted(candidates, key=lambda c: c[1], reverse=True)[: n - min_len]
    removable = {i for i, _ in candidates}
    ops, path_c, widths_c = [], [], []
    for i in range(n):
        op = int(torch.argmax(row(i)))
        if op == 0:
            if i in removable:  # the layer disappears; a removed last layer drops the last width
                if i == n - 1:
                    widths_c = widths_c[:-1]
                continue
            row(i)[0] = -math.inf
            op = int(torch.argmax(row(i)))
        path_c.append(path[i])
        if i < len(widths):
            widths_c.append(widths[i])
        ops.append(op)
    if len(path_c) < min_len:
        raise ValueError(f"derivation for last={last} kept {len(path_c)} layers, fewer than min_len={min_len}")
    return ops, path_c, widths_c


def _to_chi(w: float, fch: int, what: str) -> int:
    chi = w * fch
    if abs(chi - round(chi)) > 1e-6:
        raise ValueError(
            f"{what}: width {w} x fch {fch} = {chi} is not an integer channel multiplier; the arch format "
            "stores chi = fch * width, so choose fch and width_mult_list with integral products"
        )
    return int(round(chi))


def derive_arch(
    alphas: Sequence[Tensor],
    betas: Sequence[Tensor],
    ratios: Sequence[Tensor],
    *,
    lasts: Sequence[int],
    fch: int = 12,
    width_mult_list: Sequence[float] = WIDTH_MULT_LIST,
    stem_head_width: tuple[float, float] = (8 / 12, 8 / 12),
    ignore_skip: bool = False,
    official_quirks: bool = True,
    name: str = "arch",
    source: dict[str, Any] | None = None,
) -> ArchSpec:
    """The discrete network for the final rates ``lasts`` (spec §7), as an :class:`ArchSpec`.

    ``alphas`` = [alpha_0 (L, 5), alpha_1 (L-1, 5), alpha_2 (L-2, 5)], ``betas`` = [beta_1 (L-2, 2),
    beta_2 (L-3, 2)], ``ratios`` = [ratio_0 (L-1, W), ratio_1 (L-1, W), ratio_2 (L-2, W)], raw logits.
    ``ignore_skip`` (the teacher's rule) forbids the skip op everywhere. The inputs are not modified.
    See the module docstring for ``official_quirks``.
    """
    alphas = [a.detach().float().cpu().clone() for a in alphas]
    betas_raw = [b.detach().float().cpu().clone() for b in betas]
    ratios = [r.detach().float().cpu() for r in ratios]
    if len(alphas) != 3 or len(betas_raw) != 2 or len(ratios) != 3:
        raise ValueError("derive_arch needs 3 alpha, 2 beta and 3 ratio tensors (spec §4.3)")
    layers = alphas[0].shape[0]
    expect = {"alpha_0": (layers, len(PRIMITIVES)), "alpha_1": (layers - 1, len(PRIMITIVES)),
              "alpha_2": (layers - 2, len(PRIMITIVES)), "beta_1": (layers - 2, 2), "beta_2": (layers - 3, 2)}
    got = {"alpha_0": alphas[0].shape, "alpha_1": alphas[1].shape, "alpha_2": alphas[2].shape,
           "beta_1": betas_raw[0].shape, "beta_2": betas_raw[1].shape}
    for k, shape in expect.items():
        if tuple(got[k]) != shape:
            raise ValueError(f"{k} must have shape {shape} for {layers} layers, got {tuple(got[k])}")
    n_widths = ratios[0].shape[1]
    if n_widths == 1:
        wl: Sequence[float] = [4 / 12] if (official_quirks and not ignore_skip) else [1.0]
    elif n_widths == len(width_mult_list):
        wl = width_mult_list
    else:
        raise ValueError(f"ratio tensors have {n_widths} columns but width_mult_list has {len(width_mult_list)}")
    lasts = [int(x) for x in lasts]
    if not lasts or any(x not in (0, 1, 2) for x in lasts) or len(set(lasts)) != len(lasts):
        raise ValueError(f"lasts must be distinct final rate indices from {{0, 1, 2}}, got {lasts}")

    derived: dict[int, tuple[list[int], list[int], list[float]]] = {}
    if official_quirks:
        betas = [None, betas_raw[0], betas_raw[1]]
        for last in (0, 1, 2):  # always all three, in this order, on shared tensors
            betas = [None, F.softmax(betas[1], -1), F.softmax(betas[2], -1)]
            path = _choose_path(betas, last, layers, True)
            derived[last] = _choose_ops(alphas, path, _path_widths(path, ratios, wl), last, ignore_skip)
    else:
        betas = [None, F.softmax(betas_raw[0], -1), F.softmax(betas_raw[1], -1)]
        for last in lasts:
            path = _choose_path(betas, last, layers, False)
            fresh = [a.clone() for a in alphas]
            derived[last] = _choose_ops(fresh, path, _path_widths(path, ratios, wl), last, ignore_skip)

    branches = []
    for last in lasts:
        ops, path, widths = derived[last]
        branches.append(BranchSpec(
            last=last,
            ops=[PRIMITIVES[o] for o in ops],
            path=path,
            downs=_path_to_downs(path),
            chis=[_to_chi(w, fch, f"branch last={last}") for w in widths],
        ))
    spec = ArchSpec(
        fch=fch,
        stem_chi=_to_chi(stem_head_width[0], fch, "stem width"),
        head_chi=_to_chi(stem_head_width[1], fch, "head width"),
        branches=branches,
        name=name,
        source=dict(source or {}),
    )
    return spec.validate()


# --------------------------------------------------------------------------------------------
# the official arch files (spec §6.4)
# --------------------------------------------------------------------------------------------


def _numpy_safe_globals() -> list[Any]:
    """The numpy names a legacy arch file pickles for its float64 mIoU scalars."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    allowed: list[Any] = [(scalar, "numpy.core.multiarray.scalar"), np.dtype]
    if hasattr(np, "dtypes"):
        allowed.append(np.dtypes.Float64DType)
    return allowed


def load_official_arch(path: str | Path) -> dict[str, Any]:
    """The dict saved in an official ``arch_{k}.pt``: arch tensors (CPU) and the four scalars.

    Loaded with ``torch.load(weights_only=True)``: no pickled code runs; the only extra names
    allowed are numpy's scalar reconstructor and dtype (for the float64 mIoU values).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"arch file {path} does not exist (expected an official FasterSeg arch_*.pt)")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; report them as bad input
        raise ValueError(f"{path}: cannot be read as an official FasterSeg arch file ({type(e).__name__}: {e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict of architecture tensors, got {type(raw).__name__}")
    out: dict[str, Any] = {}
    for k, v in raw.items():
        out[k] = v.detach().clone() if isinstance(v, Tensor) else float(v)
    return out


def _arch_index(d: dict[str, Any], path: Path) -> int:
    found = sorted({int(k.split("_")[1]) for k in d if k.startswith("alpha_") and k.count("_") == 2})
    if len(found) != 1:
        raise ValueError(f"{path}: expected the arch tensors of exactly one architecture (alpha_k_*), found {found}")
    k = found[0]
    needed = [f"alpha_{k}_{j}" for j in range(3)] + [f"beta_{k}_{j}" for j in (1, 2)] + [f"ratio_{k}_{j}" for j in range(3)]
    missing = [n for n in needed if n not in d]
    if missing:
        raise ValueError(f"{path}: missing arch tensors {missing}")
    return k


def parse_lasts(lasts: str | Sequence[int]) -> list[int]:
    """``"2,1"`` or ``[2, 1]`` -> [2, 1]; errors name the parameter."""
    if isinstance(lasts, str):
        try:
            lasts = [int(x) for x in lasts.replace(" ", "").split(",") if x]
        except ValueError:
            raise ValueError(f"lasts must look like '2,1' or 'auto', got {lasts!r}") from None
    out = [int(x) for x in lasts]
    if not out or any(x not in (0, 1, 2) for x in out) or len(set(out)) != len(out):
        raise ValueError(f"lasts must be distinct rate indices from 0, 1, 2 (e.g. '2,1'), got {out}")
    return out


def import_official_arch(
    path: str | Path,
    role: str = "auto",
    lasts: str | Sequence[int] = "auto",
    official_quirks: bool = True,
) -> ArchSpec:
    """Convert an official ``arch_{k}.pt`` into an :class:`ArchSpec` (spec §6.4, §7, §8.4-8.5).

    ``role``: ``"student"`` (stem/head width 8/12, skip handling), ``"teacher"`` (width 1.0,
    ``ignore_skip``) or ``"auto"`` (from the arch index in the file: 0 teacher, 1 student).
    ``lasts``: ``"auto"`` picks [2, 0] or [2, 1] by :func:`objective` on the mIoU/latency stored in
    the file (official ``train.py``), or give e.g. ``"2,1"``.
    """
    path = Path(path)
    d = load_official_arch(path)
    k = _arch_index(d, path)
    if role == "auto":
        if k not in ROLES:
            raise ValueError(f"{path}: arch index {k} has no default role; pass role='student' or 'teacher'")
        role = ROLES[k][0]
    if role not in ("student", "teacher"):
        raise ValueError(f"role must be 'auto', 'student' or 'teacher', got {role!r}")
    _, stem_head, ignore_skip = ROLES[0] if role == "teacher" else ROLES[1]
    source: dict[str, Any] = {
        "file": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "role": role,
        "derivation": "spec §7, official rules" + (" (quirks 10/11 replicated)" if official_quirks else " (quirks 10/11 fixed)"),
    }
    scalars = ("mIoU02", "latency02", "mIoU12", "latency12")
    if all(s in d for s in scalars):
        source.update({s: round(d[s], 6) for s in scalars})
        source["objective02"] = round(objective(d["mIoU02"], d["latency02"]), 6)
        source["objective12"] = round(objective(d["mIoU12"], d["latency12"]), 6)
    if lasts == "auto":
        if not all(s in d for s in scalars):
            raise ValueError(f"{path}: lasts='auto' needs mIoU02/latency02/mIoU12/latency12 in the file; pass lasts='2,1'")
        chosen = select_lasts(d["mIoU02"], d["latency02"], d["mIoU12"], d["latency12"])
        source["lasts_rule"] = "objective (spec §5.3): [2, 0] if objective02 > objective12 else [2, 1]"
    else:
        chosen = parse_lasts(lasts)
        source["lasts_rule"] = "given"
    source["lasts"] = chosen
    return derive_arch(
        [d[f"alpha_{k}_{j}"] for j in range(3)],
        [d[f"beta_{k}_{j}"] for j in (1, 2)],
        [d[f"ratio_{k}_{j}"] for j in range(3)],
        lasts=chosen,
        fch=12,
        width_mult_list=WIDTH_MULT_LIST,
        stem_head_width=stem_head,
        ignore_skip=ignore_skip,
        official_quirks=official_quirks,
        name=f"fasterseg-{role}",
        source=source,
    )
