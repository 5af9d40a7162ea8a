"""Architecture diagram of a derived FasterSeg network, drawn from its arch JSON (matplotlib).

Rows are the resolutions (1/8 on top, then 1/16, 1/32), columns the layers. Each cell is a box
coloured by its operation and labelled with its channels; a stride-2 cell sits on the row of its
input and points down to the next rate. Layers shared by both branches (spec §8.2) are drawn once,
with a dashed outline. The aggregation (ARMs/refines, FFM, Head, final upsampling; spec §8.3) is
the box on the right. Paper Fig. 6 of FasterSeg shows the same network.
"""

from __future__ import annotations

from typing import Any

from fasterkd.models.arch import ArchSpec
from fasterkd.models.student import cell_table

OP_COLOURS = {
    "skip": "#bdbdbd",
    "conv": "#9ecae1",
    "conv_downup": "#a1d99b",
    "conv_2x": "#3182bd",
    "conv_2x_downup": "#31a354",
}
OP_LABELS = {
    "skip": "skip",
    "conv": "3x3 conv",
    "conv_downup": "zoomed conv",
    "conv_2x": "3x3 conv x2",
    "conv_2x_downup": "zoomed conv x2",
}
RATE_NAMES = ("1/8", "1/16", "1/32")


def draw_arch(arch: ArchSpec, ax: Any = None, head: str = "bilinear", title: str | None = None) -> Any:
    """Draw ``arch`` on ``ax`` (a new figure when None) and return the matplotlib Figure."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    table = cell_table(arch)
    n_layers = max(len(rows) for rows in table)
    n_br = len(table)
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.25 * n_layers + 5, 2.2 + 1.6 * 3))
    else:
        fig = ax.figure
    row_gap, lane = 2.4, 0.85  # vertical distance between rates, and between branches within a rate

    def centre(layer: int, rate: int, owner: int) -> tuple[float, float]:
        return float(layer), -rate * row_gap - owner * lane

    def box(x: float, y: float, text: str, colour: str, dashed: bool = False, w: float = 0.82) -> None:
        ax.add_patch(FancyBboxPatch((x - w / 2, y - 0.3), w, 0.6, boxstyle="round,pad=0.02", fc=colour,
                                    ec="black", lw=1.0, ls="--" if dashed else "-", zorder=2))
        ax.text(x, y, text, ha="center", va="center", fontsize=7, color="black", zorder=3)

    def arrow(p: tuple[float, float], q: tuple[float, float], colour: str = "0.3") -> None:
        ax.add_patch(FancyArrowPatch(p, q, arrowstyle="-|>", mutation_scale=8, color=colour, lw=0.9,
                                     shrinkA=0, shrinkB=0, zorder=1))

    # stem
    stem_c = 8 * arch.stem_chi
    box(-1.3, 0.0, f"stem\n3→{stem_c}", "#fdd0a2", w=1.0)
    branch_colours = ["#d62728", "#9467bd", "#8c564b"]
    drawn: set[str] = set()
    ends: list[tuple[float, float]] = []
    for b, rows in enumerate(table):
        prev = (-1.3, 0.0)
        for r in rows:
            p = centre(r.layer, r.rate, r.owner)
            key = f"{r.layer}-{r.owner}"
            if key not in drawn:
                drawn.add(key)
                shared = any(len(t) > r.layer and t[r.layer].owner == r.owner and t[r.layer].branch != r.owner for t in table)
                label = f"{r.c_in}→{r.c_out}" + (" s2" if r.stride == 2 else "")
                box(p[0], p[1], label, OP_COLOURS[r.op], dashed=shared)
            arrow(prev, p, branch_colours[b % 3])
            prev = p
        ends.append(prev)
    # aggregation box
    agg_x = n_layers + 0.8
    lasts = arch.lasts
    pred = "FFM → Head → ×8" if head == "bilinear" else "FFM/2 → refine 5x5 → PS×2 → Head → ×4"
    box(agg_x, -row_gap * 0.5, "ARM/refine\n" + pred.replace(" → ", "\n", 1), "#fee391", w=1.6)
    for b, e in enumerate(ends):
        arrow(e, (agg_x, -row_gap * 0.5), branch_colours[b % 3])
    for layer in range(n_layers):
        ax.text(layer, 0.55, f"L{layer}", ha="center", va="bottom", fontsize=7, color="0.4")
    for rate in range(3):
        ax.text(-2.3, -rate * row_gap - lane * (n_br - 1) / 2, RATE_NAMES[rate], ha="right", va="center", fontsize=10, weight="bold")
    ax.set_xlim(-3.2, agg_x + 1.2)
    ax.set_ylim(-2 * row_gap - n_br * lane - 0.3, 0.9)
    ax.set_axis_off()
    handles = [FancyBboxPatch((0, 0), 1, 1, fc=c, ec="black", label=OP_LABELS[o]) for o, c in OP_COLOURS.items() if o != "skip"]
    handles += [Line2D([], [], color=branch_colours[b % 3], label=f"branch to {RATE_NAMES[last]}") for b, last in enumerate(lasts)]
    handles.append(FancyBboxPatch((0, 0), 1, 1, fc="white", ec="black", ls="--", label="shared layer"))
    ax.legend(handles=handles, loc="lower right", fontsize=7, ncol=2, frameon=False)
    ax.set_title(title or f"{arch.name}: branches ending at {', '.join(RATE_NAMES[l] for l in lasts)}")
    return fig


__all__ = ["draw_arch", "OP_COLOURS", "OP_LABELS"]
