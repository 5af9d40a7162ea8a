"""A discrete FasterSeg architecture as a small, readable, versioned JSON file.

One :class:`ArchSpec` describes a derived network (FasterSeg spec section 7-8): the base channel
count ``fch``, the stem and head widths, and one :class:`BranchSpec` per final rate. Widths are
stored as the integer channel multiplier chi (paper notation): a node at rate s has ``s * chi``
channels, which equals the official ``int(round(s * fch * w))`` with ``w = chi / fch``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ARCH_FORMAT = "fasterkd-arch"
ARCH_VERSION = 1
PRIMITIVES = ("skip", "conv", "conv_downup", "conv_2x", "conv_2x_downup")


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
        if not self.branches:
            raise ValueError("ArchSpec needs at least one branch")
        for b, branch in enumerate(self.branches):
            branch.validate(f"branch {b} (last={branch.last})")
        return self

    @property
    def lasts(self) -> list[int]:
        return [b.last for b in self.branches]

    def summary(self) -> str:
        """A readable layer table per branch: op, rate, channels (s * chi) and stride (spec §8.4 layout)."""
        names = {0: "1/8", 1: "1/16", 2: "1/32"}
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
        if d.get("format") != ARCH_FORMAT:
            raise ValueError(f"{where}: not a fasterkd arch file (format={d.get('format')!r}, expected {ARCH_FORMAT!r})")
        if d.get("version") != ARCH_VERSION:
            raise ValueError(f"{where}: arch format version {d.get('version')!r}; this fasterkd reads version {ARCH_VERSION}")
        try:
            branches = [BranchSpec(**b) for b in d["branches"]]
            spec = cls(
                fch=int(d["fch"]),
                stem_chi=int(d["stem_chi"]),
                head_chi=int(d["head_chi"]),
                branches=branches,
                name=d.get("name", "arch"),
                source=d.get("source", {}),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"{where}: malformed arch JSON ({e})") from e
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
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(d, where=str(path))
