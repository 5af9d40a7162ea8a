"""A discrete FasterSeg architecture as a small, readable, versioned JSON file.

One :class:`ArchSpec` describes a derived network (FasterSeg spec section 7-8): the base channel
count ``fch``, the stem and head widths, and one :class:`BranchSpec` per final rate. Widths are
stored as the integer channel multiplier chi (paper notation): a node at rate s has ``s * chi``
channels, which equals the official ``int(round(s * fch * w))`` with ``w = chi / fch``.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ARCH_FORMAT = "fasterkd-arch"
ARCH_VERSION = 1
PRIMITIVES = ("skip", "conv", "conv_downup", "conv_2x", "conv_2x_downup")
RATE_NAMES = {0: "1/8", 1: "1/16", 2: "1/32"}


def _is_int(value: Any) -> bool:
    """A whole number stored as one (not a bool, not a float such as 4.0 or 4.5, not a string "4")."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_ints(where: str, field_name: str, values: Any, low: int, high: int | None = None) -> None:
    """``values`` must be a list of integers in [low, high]; the error names the field and the bad item."""
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{where}: {field_name} must be a list of integers, got {type(values).__name__}")
    for i, v in enumerate(values):
        if not _is_int(v):
            raise ValueError(f"{where}: {field_name}[{i}] must be an integer, got {v!r} ({type(v).__name__})")
        if v < low or (high is not None and v > high):
            bound = f"in {low}..{high}" if high is not None else f">= {low}"
            raise ValueError(f"{where}: {field_name}[{i}] must be {bound}, got {v}")


@dataclass
class BranchSpec:
    """One branch of a derived network.

    last: final rate index (0 = 1/8, 1 = 1/16, 2 = 1/32).
    ops: operation name per layer (from PRIMITIVES).
    path: rate index each layer works at (number of downsamplings before it).
    downs: 1 where the layer's op has stride 2.
    chis: output width (chi) of every layer but the last; the last outputs the head width.
    """

    last: int
    ops: list[str]
    path: list[int]
    downs: list[int]
    chis: list[int]

    def validate(self, where: str = "branch") -> None:
        if not _is_int(self.last) or self.last not in RATE_NAMES:
            raise ValueError(f"{where}: last must be 0, 1 or 2 (1/8, 1/16, 1/32), got {self.last!r}")
        if not isinstance(self.ops, (list, tuple)) or not self.ops or not all(isinstance(op, str) for op in self.ops):
            raise ValueError(f"{where}: ops must be a non-empty list of op names from {PRIMITIVES}, got {self.ops!r}")
        _check_ints(where, "path", self.path, 0, 2)
        _check_ints(where, "downs", self.downs, 0, 1)
        _check_ints(where, "chis", self.chis, 1)
        n = len(self.ops)
        if not (len(self.path) == len(self.downs) == n and len(self.chis) == n - 1):
            raise ValueError(
                f"{where}: expected len(path) == len(downs) == len(ops) and len(chis) == len(ops) - 1, "
                f"got ops={n}, path={len(self.path)}, downs={len(self.downs)}, chis={len(self.chis)}"
            )
        bad = [op for op in self.ops if op not in PRIMITIVES]
        if bad:
            raise ValueError(f"{where}: unknown ops {bad}; expected one of {PRIMITIVES}")
        if self.path[0] != 0:
            raise ValueError(f"{where}: the first layer must work at 1/8 (path[0] == 0), got {self.path[0]}")
        for i in range(1, n):
            if self.path[i] != self.path[i - 1] + self.downs[i - 1]:
                raise ValueError(f"{where}: path[{i}] must equal path[{i-1}] + downs[{i-1}]")
        if self.path[-1] + self.downs[-1] != self.last or self.downs[-1] != 0:
            raise ValueError(f"{where}: the branch must end at rate index last={self.last} without downsampling")


@dataclass
class ArchSpec:
    fch: int = 12
    stem_chi: int = 8
    head_chi: int = 8
    branches: list[BranchSpec] = field(default_factory=list)
    name: str = "arch"
    source: dict[str, Any] = field(default_factory=dict)  # provenance (file, derivation rule, ...)

    def validate(self) -> "ArchSpec":
        for name in ("fch", "stem_chi", "head_chi"):
            value = getattr(self, name)
            if not _is_int(value):
                raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
            if value <= 0:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not isinstance(self.name, str):
            raise ValueError(f"name must be a string, got {self.name!r}")
        if not isinstance(self.source, dict):
            raise ValueError(f"source must be a mapping, got {type(self.source).__name__}")
        if not isinstance(self.branches, (list, tuple)) or not self.branches:
            raise ValueError("ArchSpec needs at least one branch")
        for b, branch in enumerate(self.branches):
            if not isinstance(branch, BranchSpec):
                raise ValueError(f"branches[{b}] must be a branch, got {type(branch).__name__}")
            branch.validate(f"branch {b} (last={branch.last!r})")
        lasts = [b.last for b in self.branches]
        if len(set(lasts)) != len(lasts):
            raise ValueError(f"branches must end at distinct rates, got lasts {lasts}")
        return self

    @property
    def lasts(self) -> list[int]:
        return [b.last for b in self.branches]

    def summary(self) -> str:
        """A readable layer table per branch: op, rate, channels (s * chi) and stride (spec §8.4 layout)."""
        names = RATE_NAMES
        lines = [f"{self.name}: fch {self.fch}, stem {8 * self.stem_chi} ch, head chi {self.head_chi}, branches {self.lasts}"]
        for branch in self.branches:
            lines.append(f"branch ending at {names[branch.last]} ({len(branch.ops)} layers)")
            n = len(branch.ops)
            for l, (op, p, d) in enumerate(zip(branch.ops, branch.path, branch.downs)):
                s = 8 * 2**p
                c_in = s * (self.stem_chi if l == 0 else branch.chis[l - 1])
                c_out = s * self.head_chi if l == n - 1 else s * (1 + d) * branch.chis[l]
                lines.append(f"  {l:2d} {op:15s} {names[p]:>4s} {c_in:4d} -> {c_out:4d}  stride {1 + d}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"format": ARCH_FORMAT, "version": ARCH_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "arch") -> "ArchSpec":
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object (a fasterkd arch), got {type(d).__name__}")
        if d.get("format") != ARCH_FORMAT:
            raise ValueError(f"{where}: not a fasterkd arch file (format={d.get('format')!r}, expected {ARCH_FORMAT!r})")
        if d.get("version") != ARCH_VERSION:
            raise ValueError(f"{where}: arch format version {d.get('version')!r}; this fasterkd reads version {ARCH_VERSION}")
        missing = [k for k in ("fch", "stem_chi", "head_chi", "branches") if k not in d]
        if missing:
            raise ValueError(f"{where}: malformed arch JSON (missing {missing})")
        if not isinstance(d["branches"], list):
            raise ValueError(f"{where}: branches must be a list, got {type(d['branches']).__name__}")
        branches = []
        for b, item in enumerate(d["branches"]):
            keys = {"last", "ops", "path", "downs", "chis"}
            if not isinstance(item, dict) or set(item) != keys:
                got = sorted(item) if isinstance(item, dict) else type(item).__name__
                raise ValueError(f"{where}: branches[{b}] must be an object with keys {sorted(keys)}, got {got}")
            branches.append(BranchSpec(**item))
        # no int(): a chi of "4" or 4.5 is a broken file, not a 4 (validate() names the field)
        spec = cls(fch=d["fch"], stem_chi=d["stem_chi"], head_chi=d["head_chi"], branches=branches,
                   name=d.get("name", "arch"), source=d.get("source", {}))
        try:
            return spec.validate()
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e

    def save(self, path: str | Path) -> None:
        from fasterkd.utils import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ArchSpec":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"arch file {path} does not exist (expected a fasterkd arch JSON)")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, where=str(path))
