"""Latency lookup tables and FasterSeg's latency model (spec §5).

- Reading the official table (``latency_lookup_table.npy``, a pickled ``{str: float}`` dict of 667
  entries, ms at 1024x2048 on a 1080Ti/TensorRT 5) **without running pickled code**:
  :func:`load_official_lut` parses the .npy header and unpickles with a restricted unpickler
  that only resolves the four names a numpy object array of a plain dict needs, and maps them to
  inert stand-ins (no numpy object is ever constructed from the file).
- Key builders for every op (spec §5.1): :func:`op_key`, :func:`conv_norm_key`, :func:`ff_key`,
  :func:`head_key`, :func:`stem_keys`.
- The differentiable supernet latency (spec §5.2): :func:`supernet_latency` and the decoupled
  regulariser of ``architect.py``, :func:`decoupled_latency`.
- The LUT latency of a derived network (spec §5.4): :func:`network_latency`.
- Measuring a table on the current device and input size: :func:`measure_latency_table`, which
  writes a JSON table that :func:`load_lut` reads like the official one.

Official quirks fixed in :func:`supernet_latency` (``official_quirks=True`` reproduces them; spec
§12 items 8 and 9):

1. **Zoomed conv x2 key.** The official op looks its latency up under the plain ``BasicResidual2x``
   key, charging the zoomed conv x2 the latency of a full-resolution conv x2 (about 2x its own:
   0.711 vs 0.364 ms at 96->96, 128x256), both in the search and in the derived-network latency
   (the stored 6.414 ms of the shipped student is reproduced only with this quirk; its own keys
   give 5.702 ms). The search therefore steers away from the op that is really cheap. We read its
   own ``BasicResidual_downup_2x`` entry, which the table holds but the official code never reads.
   Also fixed in :func:`network_latency` unless ``official_quirks``.
2. **beta index.** The official accumulation indexes beta with a stale loop variable: for every
   layer >= 2 the 1/32 row ``beta_2[i - 3]`` (wrapping to the last row at i = 2) weighs the 1/16
   accumulation too, so the 1/16 betas never receive a latency gradient. We use each cell's own
   row (``beta_j[i - j - 1]``, the row its forward pass uses).
3. **Accumulation order.** The official loop updates the latency of a rate in place and the next
   rate (and the down branch of the same rate) then reads the already-advanced value, so a cell's
   input latency includes the latency of cells of the same layer that run in parallel with it. We
   read every input from the previous layer, as the forward pass does (same fix as item 2, both
   are "which value of the previous layer does this cell read").

Reproduction check (tests/test_arch_search.py, test_latency_*): with ``official_quirks=True``, at
initialisation (uniform alpha/beta, max widths) the supernet latency is 35.44 ms with the teacher's
stem/head widths and 27.88 ms with the student's; the spec (§5.2) reports 35.3 / 27.7 ms measured.
The 0.5% gap is not explained by the accumulation rules (every other ordering variant was tried).
The final value is the plain sum over the three rates (spec §5.2); the official repository's last
version weighs the rates 3/12, 4/12, 5/12 instead, available as ``scale_weights``.
"""

from __future__ import annotations

import codecs
import json
import math
import pickle
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fasterkd.models.arch import PRIMITIVES
from fasterkd.models.ops import OP_CLASS_NAMES, make_op, scaled_channels

if TYPE_CHECKING:
    from fasterkd.models.arch import ArchSpec
    from fasterkd.models.supernet import Supernet, Width

TABLE_FORMAT = "fasterkd-latency-table"
TABLE_VERSION = 1
OFFICIAL_INPUT_SIZE = (1024, 2048)
_REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "fasterseg" / "latency_lookup_table.npy"


# --------------------------------------------------------------------------------------------
# reading tables safely
# --------------------------------------------------------------------------------------------


class _Stub:
    """Inert stand-in for numpy's array / dtype reconstruction: it only records its pickled state."""

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _reconstruct(*args: Any) -> _Stub:
    return _Stub(*args)


class _LutUnpickler(pickle.Unpickler):
    """Resolves only what a 0-d numpy object array holding a dict needs; anything else is refused."""

    ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): _Stub,
        ("numpy", "dtype"): _Stub,
        ("_codecs", "encode"): codecs.encode,  # numpy pickles raw bytes as latin-1 text
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a latency table") from None


def _read_npy_dict(path: Path) -> dict[str, float]:
    from numpy.lib import format as npy_format  # header parsing only (a literal dict, no pickle)

    with open(path, "rb") as f:
        major, _ = npy_format.read_magic(f)
        read_header = npy_format.read_array_header_1_0 if major == 1 else npy_format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        if dtype.kind != "O" or shape != ():
            raise ValueError(f"{path}: expected a pickled dict (0-d object array), got dtype {dtype} shape {shape}")
        try:
            obj = _LutUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as e:
            raise ValueError(f"{path}: not a FasterSeg latency table ({e})") from e
    try:  # ndarray state: (version, shape, dtype, is_fortran, [objects])
        table = obj.state[4][0]
    except (AttributeError, IndexError, TypeError) as e:
        raise ValueError(f"{path}: unexpected array layout in the latency table") from e
    return _check_table(table, path)


def _check_table(table: Any, where: Any) -> dict[str, float]:
    if not isinstance(table, dict) or not all(isinstance(k, str) for k in table):
        raise ValueError(f"{where}: a latency table must map str keys to milliseconds")
    try:
        out = {k: float(v) for k, v in table.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: latency values must be numbers ({e})") from e
    bad = [k for k, v in out.items() if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise ValueError(f"{where}: latencies must be finite and >= 0, bad keys {bad[:3]}")
    return out


def load_official_lut(path: str | Path | None = None) -> dict[str, float]:
    """The official ``latency_lookup_table.npy`` as ``{key: ms}`` (spec §5.1), read without pickled code.

    ``path`` defaults to ``../shared/reference/fasterseg/latency_lookup_table.npy`` of this checkout.
    """
    path = Path(path) if path is not None else _REFERENCE
    if not path.is_file():
        raise FileNotFoundError(f"latency table {path} does not exist (expected FasterSeg's latency_lookup_table.npy)")
    return _read_npy_dict(path)


def load_lut(path: str | Path) -> dict[str, float]:
    """Read a latency table: the official ``.npy`` or a JSON table from :func:`measure_latency_table`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latency table {path} does not exist (expected a .npy or .json table)")
    if path.suffix == ".npy":
        return load_official_lut(path)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(d, dict) or d.get("format") != TABLE_FORMAT:
        raise ValueError(f"{path}: not a fasterkd latency table (expected format {TABLE_FORMAT!r})")
    return _check_table(d.get("entries"), path)


def lookup(lut: dict[str, float], key: str) -> float:
    """``lut[key]`` with an error that says how to get the missing entry."""
    try:
        return lut[key]
    except KeyError:
        raise ValueError(
            f"latency table has no entry {key!r} ({len(lut)} entries); measure a table for this search "
            "space and input size with `fasterkd latency-table` (measure_latency_table)"
        ) from None


# --------------------------------------------------------------------------------------------
# keys (spec §5.1); h, w = the feature size the layer sees
# --------------------------------------------------------------------------------------------


def op_key(name: str, h: int, w: int, c_in: int, c_out: int, stride: int) -> str:
    """Key of one of the five ops, e.g. ``BasicResidual2x_H128_W256_Cin96_Cout96_stride1_dilation1``."""
    if name not in OP_CLASS_NAMES:
        raise ValueError(f"unknown op {name!r}; expected one of {PRIMITIVES}")
    key = f"{OP_CLASS_NAMES[name]}_H{h}_W{w}_Cin{c_in}_Cout{c_out}_stride{stride}"
    return key if name == "skip" else key + "_dilation1"


def conv_norm_key(h: int, w: int, c_in: int, c_out: int, kernel: int, stride: int = 1) -> str:
    return f"ConvNorm_H{h}_W{w}_Cin{c_in}_Cout{c_out}_kernel{kernel}_stride{stride}"


def ff_key(h: int, w: int, c: int) -> str:
    return f"ff_H{h}_W{w}_C{c}"


def head_key(h: int, w: int, c_in: int, num_classes: int = 19) -> str:
    return f"head_H{h}_W{w}_Cin{c_in}_Cout{num_classes}"


def stem_channels(fch: int, stem_ratio: float) -> tuple[int, int, int]:
    """Stem widths 2*nf(2), 2*nf(4), nf(8) (spec §4.1)."""
    return 2 * scaled_channels(2 * fch, stem_ratio), 2 * scaled_channels(4 * fch, stem_ratio), scaled_channels(8 * fch, stem_ratio)


def stem_keys(input_size: tuple[int, int], fch: int, stem_ratio: float) -> list[str]:
    """ConvNorm 3x3 s2, conv x2 s2, conv x2 s2 at the input, 1/2 and 1/4 sizes."""
    h, w = input_size
    c2, c4, c8 = stem_channels(fch, stem_ratio)
    return [
        conv_norm_key(h, w, 3, c2, 3, 2),
        op_key("conv_2x", h // 2, w // 2, c2, c4, 2),
        op_key("conv_2x", h // 4, w // 4, c4, c8, 2),
    ]


def parse_ratios(text: str, name: str = "widths") -> list[float]:
    """``"4/12,6/12,1"`` -> [0.333.., 0.5, 1.0]; each ratio in (0, 1]; errors name the parameter."""
    from fractions import Fraction

    try:
        out = [float(Fraction(x.strip())) for x in text.split(",") if x.strip()]
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{name} must be a comma list of ratios such as 4/12,8/12,1, got {text!r}") from None
    if not out or any(not 0 < r <= 1 for r in out):
        raise ValueError(f"{name} must hold ratios in (0, 1], got {text!r}")
    return out


def _check_size(input_size: Sequence[int]) -> tuple[int, int]:
    h, w = (int(v) for v in input_size)
    if h % 32 or w % 32 or h <= 0 or w <= 0:
        raise ValueError(f"input_size must be positive multiples of 32, got {h}x{w}")
    return h, w


# --------------------------------------------------------------------------------------------
# differentiable supernet latency (spec §5.2)
# --------------------------------------------------------------------------------------------


def supernet_latency(
    net: "Supernet",
    arch: int,
    lut: dict[str, float],
    *,
    alpha: str = "soft",
    beta: str = "soft",
    widths: str = "max",
    input_size: tuple[int, int] = OFFICIAL_INPUT_SIZE,
    official_quirks: bool = False,
    scale_weights: Sequence[float] = (1.0, 1.0, 1.0),
) -> Tensor:
    """LUT latency (ms) of the arch's stem and cell grid, differentiable in alpha, beta and gamma.

    ``alpha``/``beta``: ``"soft"`` (softmax of the logits) or ``"uniform"``; ``widths``: a width mode
    (``"max"``, ``"min"``, ``"random"``, ``"arch_ratio"``/``"gumbel"``: Gumbel sample with the
    straight-through scalars). Mixed-op latency = sum_k p_k s_in s_out LUT(op_k); the grid is
    accumulated as "latency to reach a node" and the three final nodes are summed (spec §5.2).
    See the module docstring for the quirks fixed unless ``official_quirks``.
    """
    cfg = net.cfg
    arch = net._check_arch(arch)
    h, w = _check_size(input_size)
    for name, value in (("alpha", alpha), ("beta", beta)):
        if value not in ("soft", "uniform"):
            raise ValueError(f"{name} must be 'soft' or 'uniform', got {value!r}")
    mode = "arch_ratio" if widths == "gumbel" else widths
    n_ops = len(PRIMITIVES)

    alpha_logits = net._logits(arch, "alpha")
    beta_logits = net._logits(arch, "beta")
    alphas = [F.softmax(a, -1) if alpha == "soft" else torch.full_like(a, 1.0 / n_ops) for a in alpha_logits]
    betas = [None] + [F.softmax(b, -1) if beta == "soft" else torch.full_like(b, 0.5) for b in beta_logits]
    nodes = net.sample_widths(arch, mode)
    stem_w, _ = cfg.stem_head_widths[arch]
    zoom2x_key_op = "conv_2x" if official_quirks else "conv_2x_downup"

    def mixed(j: int, a: Tensor, w_in: "Width", w_out: "Width", stride: int) -> Tensor:
        c = cfg.fch * 8 * 2**j
        c_in, c_out = scaled_channels(c, w_in.ratio), scaled_channels(c * stride, w_out.ratio)
        hj, wj = h // 8 >> j, w // 8 >> j
        lat = 0.0
        for k, name in enumerate(PRIMITIVES):
            key_op = zoom2x_key_op if name == "conv_2x_downup" else name
            lat = lat + a[k] * lookup(lut, op_key(key_op, hj, wj, c_in, c_out, stride))
        return lat * w_in.score * w_out.score

    stem = sum(lookup(lut, k) for k in stem_keys((h, w), cfg.fch, stem_w))
    zero = alphas[0].new_zeros(())
    T: list[Tensor] = [zero + stem, zero, zero]  # latency to reach the latest `out` of each rate
    D: list[Tensor] = [zero, zero, zero]  # ... and the latest `down` (which feeds rate + 1)
    for i, j, has_down in net.grid:
        if j == 0:
            prev_T, prev_D = list(T), list(D)
        w_in, w_out, w_down = net.cell_widths(arch, nodes, i, j)
        a = alphas[j][i - j]
        lat_o = mixed(j, a, w_in, w_out, 1)
        lat_d = mixed(j, a, w_in, w_down, 2) if has_down else None
        if official_quirks:
            # in place: later cells of the layer read values already advanced to this layer
            if j == 0:
                T[0] = T[0] + lat_o
                if has_down:
                    D[0] = T[0] + lat_d
            elif i == j:
                T[j] = D[j - 1] + lat_o
                if has_down:
                    D[j] = D[j - 1] + lat_d
            else:
                b = betas[2][i - 3]  # the stale index: the 1/32 row for 1/16 too (wraps at i = 2)
                T[j] = b[1] * T[j] + b[0] * D[j - 1] + lat_o
                if has_down:
                    D[j] = b[1] * T[j] + b[0] * D[j - 1] + lat_d
        else:
            if j == 0:
                inp = prev_T[0]
            elif i == j:
                inp = prev_D[j - 1]
            else:
                b = betas[j][i - j - 1]
                inp = b[1] * prev_T[j] + b[0] * prev_D[j - 1]
            T[j] = inp + lat_o
            if has_down:
                D[j] = inp + lat_d
    if len(scale_weights) != 3:
        raise ValueError(f"scale_weights needs one weight per rate (3), got {scale_weights}")
    return T[0] * scale_weights[0] + T[1] * scale_weights[1] + T[2] * scale_weights[2]


def decoupled_latency(
    net: "Supernet",
    arch: int,
    lut: dict[str, float],
    *,
    input_size: tuple[int, int] = OFFICIAL_INPUT_SIZE,
    official_quirks: bool = False,
) -> Tensor:
    """The fine-grained latency regulariser of ``architect.py`` (spec §5.2; paper: lambda_1..3 terms).

    Lat = 1/500 Lat(alpha soft, beta uniform, max widths) + 497/500 Lat(alpha uniform, beta soft, max)
    + 2/500 Lat(alpha uniform, beta uniform, Gumbel widths); with one width choice the last term is
    dropped and the weights are 1/500 and 499/500. Each term carries gradient to one group only.
    """
    kw = dict(input_size=input_size, official_quirks=official_quirks)
    lat_op = supernet_latency(net, arch, lut, alpha="soft", beta="uniform", widths="max", **kw)
    if net.cfg.num_widths(arch) > 1:
        lat_path = supernet_latency(net, arch, lut, alpha="uniform", beta="soft", widths="max", **kw)
        lat_width = supernet_latency(net, arch, lut, alpha="uniform", beta="uniform", widths="arch_ratio", **kw)
        return lat_op / 500 + lat_path * 497 / 500 + lat_width * 2 / 500
    lat_path = supernet_latency(net, arch, lut, alpha="uniform", beta="soft", widths="max", **kw)
    return lat_op / 500 + lat_path * 499 / 500


# --------------------------------------------------------------------------------------------
# derived network (spec §5.4)
# --------------------------------------------------------------------------------------------


def network_keys(
    spec: "ArchSpec", input_size: tuple[int, int] = OFFICIAL_INPUT_SIZE, num_classes: int = 19,
    official_quirks: bool = False,
) -> list[str]:
    """Every LUT key a derived network is charged for: stem, distinct cells, ARMs/refines, FFM, Head.

    ``official_quirks``: zoomed conv x2 layers read the conv x2 key (module docstring, item 1).
    """
    from fasterkd.models.student import cell_table

    h, w = _check_size(input_size)
    table = cell_table(spec)
    keys = stem_keys((h, w), spec.fch, spec.stem_chi / spec.fch)
    for b, rows in enumerate(table):
        for r in rows:
            if r.owner == b:  # shared cells are counted once
                op = "conv_2x" if official_quirks and r.op == "conv_2x_downup" else r.op
                keys.append(op_key(op, h // 8 >> r.rate, w // 8 >> r.rate, r.c_in, r.c_out, r.stride))
    f8, f16, f32 = 8 * spec.head_chi, 16 * spec.head_chi, 32 * spec.head_chi
    h8, w8 = h // 8, w // 8
    for b, branch in enumerate(spec.branches):
        latest = {0: 8 * spec.stem_chi}  # channels of the branch's latest feature per rate
        for r in table[b]:
            latest[r.rate + (r.stride == 2)] = r.c_out
        if branch.last == 2:
            keys += [
                conv_norm_key(h8 // 4, w8 // 4, f32, f16, 1),
                conv_norm_key(h8 // 2, w8 // 2, f16 + latest[1], f16, 3),
                conv_norm_key(h8 // 2, w8 // 2, f16, f8, 1),
                conv_norm_key(h8, w8, f8 + latest[0], f8, 3),
            ]
        elif branch.last == 1:
            keys += [conv_norm_key(h8 // 2, w8 // 2, f16, f8, 1), conv_norm_key(h8, w8, f8 + latest[0], f8, 3)]
    c = f8 * len(spec.branches)
    keys += [ff_key(h8, w8, c), head_key(h8, w8, c, num_classes)]
    return keys


def network_latency(
    spec: "ArchSpec", lut: dict[str, float], input_size: tuple[int, int] = OFFICIAL_INPUT_SIZE,
    num_classes: int = 19, official_quirks: bool = False,
) -> float:
    """LUT latency (ms) of a derived network (spec §5.4; the final x8 upsampling is not counted).

    On the official table the shipped student gives 6.414 ms ([2, 1]) and 6.261 ms ([2, 0]) and the
    teacher 25.23 ms ([2, 1]) with ``official_quirks=True`` (the values stored in arch_*.pt); with
    the zoomed conv x2 charged its own latency the student [2, 1] is 5.702 ms.
    """
    keys = network_keys(spec, input_size, num_classes, official_quirks=official_quirks)
    return float(sum(lookup(lut, k) for k in keys))


# --------------------------------------------------------------------------------------------
# measuring a table on this device
# --------------------------------------------------------------------------------------------


class _OnFeature(nn.Module):
    """Runs ``layer`` on a fixed feature of the size it sees in the network, ignoring the image.

    ``cost.measure_latency`` feeds a (1, 3, h, w) image; the tiny image is the only overhead.
    """

    def __init__(self, layer: nn.Module, c: int, h: int, w: int) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("feature", torch.randn(1, c, h, w), persistent=False)

    def forward(self, image: Tensor) -> Tensor:
        return self.layer(self.feature)


class _FFM(nn.Sequential):
    def __init__(self, c: int) -> None:
        from fasterkd.models.heads import ConvNorm

        super().__init__(ConvNorm(c, c, 1))


def table_layers(
    input_size: tuple[int, int],
    fch: int = 12,
    width_mult_list: Sequence[float] = (4 / 12, 6 / 12, 8 / 12, 10 / 12, 1.0),
    stem_head_widths: Sequence[tuple[float, float]] = ((1.0, 1.0), (8 / 12, 8 / 12)),
    num_classes: int = 19,
) -> dict[str, tuple[Callable[[], nn.Module], int, int, int]]:
    """``{key: (build, c_in, h, w)}`` for every table entry the search space and derivation need."""
    from fasterkd.models.heads import ConvNorm, Head

    h, w = _check_size(input_size)
    wl = sorted(set(float(x) for x in width_mult_list) | {float(s) for s, _ in stem_head_widths})
    layers: dict[str, tuple[Callable[[], nn.Module], int, int, int]] = {}

    def add(key: str, build: Callable[[], nn.Module], c_in: int, hh: int, ww: int) -> None:
        layers.setdefault(key, (build, c_in, hh, ww))

    for stem_w, _ in stem_head_widths:  # stems
        c2, c4, c8 = stem_channels(fch, stem_w)
        k = stem_keys((h, w), fch, stem_w)
        add(k[0], lambda c2=c2: ConvNorm(3, c2, 3, 2), 3, h, w)
        add(k[1], lambda c2=c2, c4=c4: make_op("conv_2x", c2, c4, 2), c2, h // 2, w // 2)
        add(k[2], lambda c4=c4, c8=c8: make_op("conv_2x", c4, c8, 2), c4, h // 4, w // 4)
    for j in range(3):  # cells: every op, width pair and stride
        c = fch * 8 * 2**j
        hj, wj = h // 8 >> j, w // 8 >> j
        for r_in in wl:
            for r_out in wl:
                for stride in (1, 2) if j < 2 else (1,):
                    ci, co = scaled_channels(c, r_in), scaled_channels(c * stride, r_out)
                    for name in PRIMITIVES:
                        add(op_key(name, hj, wj, ci, co, stride),
                            lambda n=name, ci=ci, co=co, s=stride: make_op(n, ci, co, s), ci, hj, wj)
    h8, w8 = h // 8, w // 8
    for _, head_w in stem_head_widths:  # ARMs, refines, FFM and Head for 1..3 branches
        f8, f16, f32 = (scaled_channels(s * fch, head_w) for s in (8, 16, 32))
        add(conv_norm_key(h8 // 4, w8 // 4, f32, f16, 1), lambda a=f32, b=f16: ConvNorm(a, b, 1), f32, h8 // 4, w8 // 4)
        add(conv_norm_key(h8 // 2, w8 // 2, f16, f8, 1), lambda a=f16, b=f8: ConvNorm(a, b, 1), f16, h8 // 2, w8 // 2)
        for r in wl:
            c16, c8 = scaled_channels(16 * fch, r), scaled_channels(8 * fch, r)
            add(conv_norm_key(h8 // 2, w8 // 2, f16 + c16, f16, 3), lambda a=f16 + c16, b=f16: ConvNorm(a, b, 3), f16 + c16, h8 // 2, w8 // 2)
            add(conv_norm_key(h8, w8, f8 + c8, f8, 3), lambda a=f8 + c8, b=f8: ConvNorm(a, b, 3), f8 + c8, h8, w8)
        for n in (1, 2, 3):
            add(ff_key(h8, w8, n * f8), lambda c=n * f8: _FFM(c), n * f8, h8, w8)
            add(head_key(h8, w8, n * f8, num_classes), lambda c=n * f8: Head(c, num_classes), n * f8, h8, w8)
    return layers


@torch.no_grad()
def _measure_latency(model: nn.Module, input_size: tuple[int, int], device: torch.device,
                     warmup: int = 10, repeats: int = 50) -> dict[str, float]:
    """Median wall time (ms) of ``repeats`` synchronised eval forwards of a (1, 3, H, W) input."""
    model = model.to(device).eval()
    x = torch.randn(1, 3, *input_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(x)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        sync()
        times.append((time.perf_counter() - t0) * 1000.0)
    times.sort()
    return {"median_ms": times[len(times) // 2]}


def measure_latency_table(
    out: str | Path,
    input_size: tuple[int, int] = OFFICIAL_INPUT_SIZE,
    device: str | torch.device = "auto",
    repeats: int = 20,
    *,
    fch: int = 12,
    width_mult_list: Sequence[float] = (4 / 12, 6 / 12, 8 / 12, 10 / 12, 1.0),
    stem_head_widths: Sequence[tuple[float, float]] = ((1.0, 1.0), (8 / 12, 8 / 12)),
    num_classes: int = 19,
    warmup: int = 3,
    keys: Iterable[str] | None = None,
) -> dict[str, float]:
    """Time every op configuration of the search space on ``device`` and write a JSON table.

    Each entry is one layer built plain (non-slimmable) at its exact widths, in eval mode, timed
    alone with :func:`fasterkd.cost.measure_latency` (median ms) at the feature size it sees for an
    ``input_size`` image, as the official table was (spec §5.1; PyTorch eager instead of TensorRT).
    ``keys`` restricts the table to some entries (e.g. :func:`network_keys` of one arch). The file
    is written atomically and read back by :func:`load_lut`.
    """
    from fasterkd.utils import atomic_write_json, pick_device

    try:
        from fasterkd.cost import measure_latency
    except ImportError:  # cost.py not present (yet): same protocol, median of synchronised runs
        measure_latency = _measure_latency

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    dev = pick_device(device)
    layers = table_layers(input_size, fch, width_mult_list, stem_head_widths, num_classes)
    if keys is not None:
        wanted = list(dict.fromkeys(keys))
        unknown = [k for k in wanted if k not in layers]
        if unknown:
            raise ValueError(f"keys not in this search space's table: {unknown[:3]}")
        layers = {k: layers[k] for k in wanted}
    entries: dict[str, float] = {}
    start = time.perf_counter()
    for key, (build, c_in, hh, ww) in layers.items():
        model = _OnFeature(build(), c_in, hh, ww).eval()
        result = measure_latency(model, (hh, ww), dev, warmup=warmup, repeats=repeats)
        entries[key] = float(result["median_ms"])
    h, w = _check_size(input_size)
    atomic_write_json(out, {
        "format": TABLE_FORMAT,
        "version": TABLE_VERSION,
        "input_size": [h, w],
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "repeats": repeats,
        "fch": fch,
        "width_mult_list": list(width_mult_list),
        "stem_head_widths": [list(x) for x in stem_head_widths],
        "seconds": round(time.perf_counter() - start, 2),
        "entries": entries,
    })
    return entries
