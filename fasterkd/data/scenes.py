"""Synthetic street scenes: the renderer of the embedded default dataset (no download needed).

Each scene is a perspective street seen from a car: a pin-hole camera 1.5 m above a flat ground,
looking down a road with lane markings, sidewalks, building facades with windows, walls, fences,
trees and grass, the sky, and a Z-sorted set of objects (poles, traffic lights and signs, people,
riders on bicycles and motorcycles, cars, trucks, buses and now and then a tram, i.e. "train").
Everything is placed in metres and projected, so far objects are small and thin ones (poles, sign
posts, distant people) are common: the multi-resolution paths of the paper have something to do.

Appearance is built so that no class is separable by colour alone: every object draws its colour
from class-specific ranges that overlap other classes' (grey road, grey walls, grey cars,
overcast grey sky; green cars, green fences, green grass and trees ...) and, with probability
0.25, from one pool shared by all classes; then a smooth random illumination field, cast shadows,
per-class surface texture and Gaussian pixel noise are applied.

The scene is a deterministic function of ``(seed, index)`` (NumPy's ``default_rng([seed,
index])``), drawn in continuous coordinates scaled to the requested size, so any resolution works.
:mod:`fasterkd.data.synthetic` writes the scenes to disk in the Cityscapes layout.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from fasterkd.utils import parse_size

# train ids (fasterkd.data.cityscapes.CLASS_NAMES)
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY = range(11)
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = range(11, 19)

CAMERA_HEIGHT = 1.5  # metres

# colour ranges (RGB low, high) per class; overlapping on purpose
_GREY = ((60, 60, 60), (200, 200, 200))
_RANGES: dict[int, list[tuple[tuple[int, int, int], tuple[int, int, int]]]] = {
    ROAD: [((60, 60, 65), (135, 130, 140)), ((110, 80, 80), (150, 110, 100))],
    SIDEWALK: [((110, 105, 105), (195, 190, 190)), ((140, 95, 85), (190, 140, 120))],
    BUILDING: [_GREY, ((170, 150, 120), (220, 200, 170)), ((120, 60, 45), (170, 100, 80)), ((150, 160, 170), (215, 220, 230))],
    WALL: [_GREY, ((150, 130, 110), (210, 190, 160)), ((100, 100, 130), (150, 150, 180))],
    FENCE: [_GREY, ((110, 80, 50), (170, 130, 90)), ((40, 80, 50), (90, 130, 90))],
    POLE: [((70, 70, 70), (170, 170, 170)), ((30, 60, 40), (70, 100, 70)), ((20, 20, 20), (60, 60, 60))],
    LIGHT: [((15, 15, 15), (60, 60, 60)), ((180, 150, 20), (230, 200, 60))],
    SIGN: [((180, 20, 20), (235, 70, 60)), ((20, 60, 160), (60, 110, 210)), ((200, 180, 20), (240, 220, 80)), ((200, 200, 200), (245, 245, 245))],
    VEGETATION: [((30, 70, 20), (100, 150, 70)), ((110, 100, 30), (160, 140, 60)), ((25, 40, 25), (60, 80, 50))],
    TERRAIN: [((80, 110, 40), (150, 170, 90)), ((110, 95, 60), (160, 140, 100))],
    SKY: [((90, 140, 190), (160, 200, 250)), ((170, 175, 180), (235, 235, 240))],
    PERSON: [((10, 10, 10), (240, 240, 240))],
    RIDER: [((10, 10, 10), (240, 240, 240))],
    CAR: [((10, 10, 10), (60, 60, 70)), ((150, 150, 155), (235, 235, 240)), ((120, 10, 10), (200, 50, 40)), ((10, 30, 90), (60, 80, 160)), ((30, 80, 40), (90, 130, 80))],
    TRUCK: [((170, 170, 170), (240, 240, 240)), ((140, 20, 20), (210, 60, 50)), ((20, 50, 120), (70, 100, 180)), ((190, 160, 20), (230, 200, 70))],
    BUS: [((170, 170, 170), (240, 240, 240)), ((180, 150, 20), (230, 200, 70)), ((140, 20, 20), (210, 60, 50)), ((20, 90, 50), (70, 150, 90))],
    TRAIN: [((170, 170, 170), (240, 240, 240)), ((180, 30, 30), (220, 80, 60)), ((200, 170, 30), (240, 210, 80))],
    MOTORCYCLE: [((10, 10, 10), (60, 60, 60)), ((140, 10, 10), (210, 50, 40)), ((20, 40, 140), (70, 90, 200)), ((150, 150, 150), (210, 210, 210))],
    BICYCLE: [((10, 10, 10), (70, 70, 70)), ((140, 10, 10), (210, 50, 40)), ((20, 40, 140), (70, 90, 200)), ((120, 120, 120), (200, 200, 200))],
}
# the pool every class may draw from (p = 0.25): breaks any colour-to-class shortcut
_SHARED = [((40, 40, 40), (220, 220, 220)), ((90, 110, 60), (150, 160, 110)), ((120, 90, 70), (190, 160, 130))]


class _Scene:
    """Painter's-algorithm canvas: a label image, a colour image and a shade image drawn together."""

    def __init__(self, rng: np.random.Generator, size: tuple[int, int]) -> None:
        self.rng = rng
        self.h, self.w = size
        self.horizon = rng.uniform(0.36, 0.47)
        self.vx = rng.uniform(0.42, 0.58)
        self.fv = rng.uniform(0.9, 1.15)
        self.fu = self.fv * 0.5  # 2:1 nominal aspect (Cityscapes); other sizes stretch the scene
        self.label = Image.new("L", (self.w, self.h), SKY)
        self.rgb = Image.fromarray(self._sky())
        self.shade = Image.new("L", (self.w, self.h), 255)
        self.dl = ImageDraw.Draw(self.label)
        self.dc = ImageDraw.Draw(self.rgb)
        self.ds = ImageDraw.Draw(self.shade)

    # ---- colours and projection -------------------------------------------------------------

    def colour(self, cls: int, shared: float = 0.25) -> np.ndarray:
        ranges = _SHARED if self.rng.random() < shared else _RANGES[cls]
        lo, hi = ranges[self.rng.integers(len(ranges))]
        return self.rng.uniform(lo, hi)

    def jitter(self, base: np.ndarray, amount: float = 12.0) -> tuple[int, int, int]:
        c = np.clip(base + self.rng.normal(0.0, amount, 3), 0, 255)
        return int(c[0]), int(c[1]), int(c[2])

    def px(self, x: float, y: float, z: float) -> tuple[float, float]:
        """Metres (lateral x, height y, depth z) -> pixel coordinates."""
        u = self.vx + self.fu * x / z
        v = self.horizon + self.fv * (CAMERA_HEIGHT - y) / z
        return u * self.w, v * self.h

    def m2px(self, z: float) -> float:
        """Pixels per metre at depth z (vertical)."""
        return self.fv * self.h / z

    # ---- primitives -------------------------------------------------------------------------

    def poly(self, pts, cls: int, rgb) -> None:
        pts = [(float(a), float(b)) for a, b in pts]
        self.dl.polygon(pts, fill=cls)
        self.dc.polygon(pts, fill=tuple(int(c) for c in rgb))

    def rect(self, x0: float, y0: float, x1: float, y1: float, cls: int, rgb) -> None:
        """Axis-aligned pixel rectangle, at least one pixel wide and tall (thin objects stay visible)."""
        if x1 - x0 < 1.0:
            c = 0.5 * (x0 + x1)
            x0, x1 = c - 0.5, c + 0.5
        if y1 - y0 < 1.0:
            c = 0.5 * (y0 + y1)
            y0, y1 = c - 0.5, c + 0.5
        box = [round(x0), round(y0), max(round(x0), round(x1) - 1), max(round(y0), round(y1) - 1)]
        self.dl.rectangle(box, fill=cls)
        self.dc.rectangle(box, fill=tuple(int(c) for c in rgb))

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, cls: int, rgb, width: int = 0) -> None:
        rx, ry = max(rx, 0.6), max(ry, 0.6)
        box = [cx - rx, cy - ry, cx + rx, cy + ry]
        if width:
            self.dl.ellipse(box, outline=cls, width=width)
            self.dc.ellipse(box, outline=tuple(int(c) for c in rgb), width=width)
        else:
            self.dl.ellipse(box, fill=cls)
            self.dc.ellipse(box, fill=tuple(int(c) for c in rgb))

    def line(self, pts, width: float, cls: int, rgb) -> None:
        wd = max(1, int(round(width)))
        pts = [(float(a), float(b)) for a, b in pts]
        self.dl.line(pts, fill=cls, width=wd)
        self.dc.line(pts, fill=tuple(int(c) for c in rgb), width=wd)

    def shadow(self, pts, strength: float) -> None:
        self.ds.polygon([(float(a), float(b)) for a, b in pts], fill=int(255 * (1 - strength)))

    def plane_x(self, x: float, z0: float, z1: float, y0: float, y1: float, cls: int, rgb) -> None:
        """A vertical plane at lateral position x spanning depth z0..z1 and height y0..y1."""
        self.poly([self.px(x, y0, z0), self.px(x, y1, z0), self.px(x, y1, z1), self.px(x, y0, z1)], cls, rgb)

    def plane_z(self, z: float, x0: float, x1: float, y0: float, y1: float, cls: int, rgb) -> None:
        """A vertical plane facing the camera at depth z."""
        (a, b), (c, d) = self.px(x0, y1, z), self.px(x1, y0, z)
        self.rect(min(a, c), min(b, d), max(a, c), max(b, d), cls, rgb)

    # ---- background ---------------------------------------------------------------------------

    def _sky(self) -> np.ndarray:
        top, bottom = self.colour(SKY, shared=0.0), self.colour(SKY, shared=0.0)
        t = np.linspace(0.0, 1.0, self.h, dtype=np.float32)[:, None, None]
        col = (1 - t) * top[None, None, :] * 0.85 + t * bottom[None, None, :]
        return np.broadcast_to(np.clip(col, 0, 255), (self.h, self.w, 3)).astype(np.uint8)


def _draw_ground(s: _Scene, layout: dict) -> None:
    rng = s.rng
    rl, rr, swl, swr = layout["rl"], layout["rr"], layout["swl"], layout["swr"]
    zn, zf = 0.6, 400.0
    hpx = s.horizon * s.h
    # everything below the horizon starts as terrain (grass verges beyond the sidewalks)
    s.poly([(-s.w, hpx), (2 * s.w, hpx), (2 * s.w, 2 * s.h), (-s.w, 2 * s.h)], TERRAIN, s.jitter(s.colour(TERRAIN)))
    for sign, edge, width in ((-1, rl, swl), (1, rr, swr)):
        col = s.colour(SIDEWALK)
        xa, xb = sign * edge, sign * (edge + width)
        s.poly([s.px(xa, 0, zn), s.px(xb, 0, zn), s.px(xb, 0, zf), s.px(xa, 0, zf)], SIDEWALK, s.jitter(col, 6))
        # paving slabs: transverse joints in a slightly different tone (still sidewalk)
        joint = s.jitter(col * 0.85, 4)
        for z in np.arange(1.0, 60.0, rng.uniform(1.0, 2.0)):
            (x0, y0), (x1, y1) = s.px(xa, 0, z), s.px(xb, 0, z)
            if abs(y1 - s.horizon * s.h) > 2:
                s.line([(x0, y0), (x1, y1)], 1, SIDEWALK, joint)
        # curb: a light strip at the road edge
        xc = sign * (edge + 0.25)
        s.poly([s.px(xa, 0, zn), s.px(xc, 0, zn), s.px(xc, 0, zf), s.px(xa, 0, zf)], SIDEWALK, s.jitter(col + 25, 5))
    road = s.colour(ROAD)
    s.poly([s.px(-rl, 0, zn), s.px(rr, 0, zn), s.px(rr, 0, zf), s.px(-rl, 0, zf)], ROAD, s.jitter(road, 4))
    # patches of repaired asphalt
    for _ in range(rng.integers(0, 4)):
        x, z, lw, ll = rng.uniform(-rl, rr), rng.uniform(3, 40), rng.uniform(0.5, 3), rng.uniform(1, 6)
        s.poly([s.px(x, 0, z), s.px(x + lw, 0, z), s.px(x + lw, 0, z + ll), s.px(x, 0, z + ll)], ROAD, s.jitter(road * rng.uniform(0.8, 1.15), 4))
    # lane markings: dashed centre lines and solid edge lines (road class, white/yellow paint)
    paint = np.array((235, 235, 225)) if rng.random() < 0.8 else np.array((220, 190, 60))
    lane_w = rng.uniform(2.8, 3.6)
    lines = [x for x in np.arange(-rl + lane_w, rr - 1.0, lane_w)]
    dash, gap, phase = rng.uniform(2, 4), rng.uniform(3, 8), rng.uniform(0, 6)
    for x in lines:
        z = 1.0 + phase
        while z < 150:
            s.poly([s.px(x - 0.07, 0, z), s.px(x + 0.07, 0, z), s.px(x + 0.07, 0, z + dash), s.px(x - 0.07, 0, z + dash)], ROAD, s.jitter(paint, 8))
            z += dash + gap
    for x in (-rl + 0.35, rr - 0.35):
        s.poly([s.px(x - 0.06, 0, zn), s.px(x + 0.06, 0, zn), s.px(x + 0.06, 0, zf), s.px(x - 0.06, 0, zf)], ROAD, s.jitter(paint, 8))
    if rng.random() < 0.5:  # a zebra crossing
        z0 = rng.uniform(8, 25)
        for x in np.arange(-rl + 0.5, rr - 0.5, 1.0):
            s.poly([s.px(x, 0, z0), s.px(x + 0.5, 0, z0), s.px(x + 0.5, 0, z0 + 3), s.px(x, 0, z0 + 3)], ROAD, s.jitter(paint, 8))


def _draw_skyline(s: _Scene) -> None:
    """Distant buildings and tree lines on the horizon (small, low-contrast)."""
    rng = s.rng
    hpx = s.horizon * s.h
    x = -0.05 * s.w
    while x < 1.05 * s.w:
        wd = rng.uniform(0.02, 0.09) * s.w
        ht = rng.uniform(0.01, 0.12) * s.h
        if rng.random() < 0.65:
            s.rect(x, hpx - ht, x + wd, hpx + 1, BUILDING, s.jitter(s.colour(BUILDING) * 0.9))
        else:
            for _ in range(3):
                s.ellipse(x + rng.uniform(0, wd), hpx - ht * rng.uniform(0.3, 0.8), wd * 0.35, ht * 0.6, VEGETATION, s.jitter(s.colour(VEGETATION)))
        x += wd * rng.uniform(0.6, 1.1)


def _building(s: _Scene, sign: int, xb: float, z0: float, z1: float) -> None:
    rng = s.rng
    h = rng.uniform(6, 25)
    base = s.colour(BUILDING)
    # the end face toward the camera, then the facade along the street
    s.poly([s.px(sign * xb, 0, z0), s.px(sign * xb, h, z0), s.px(sign * (xb + 12), h, z0), s.px(sign * (xb + 12), 0, z0)], BUILDING, s.jitter(base * 0.75))
    s.plane_x(sign * xb, z0, z1, 0, h, BUILDING, s.jitter(base))
    # windows (building class): dark or reflective panes, skipped when below a pixel wide
    wcol = s.colour(BUILDING) * rng.uniform(0.3, 0.7) if rng.random() < 0.7 else np.array((170, 190, 210.0))
    floor_h, col_w = rng.uniform(2.8, 3.5), rng.uniform(2.0, 3.5)
    win_w, win_h = col_w * rng.uniform(0.35, 0.6), floor_h * rng.uniform(0.35, 0.55)
    for y in np.arange(1.2, h - 1.0, floor_h):
        for z in np.arange(z0 + 0.8, z1 - win_w, col_w):
            (xa, _), (xc, _) = s.px(sign * xb, y, z), s.px(sign * xb, y, z + win_w)
            if abs(xc - xa) < 1.0:
                break
            s.plane_x(sign * xb, z, z + win_w, y, y + win_h, BUILDING, s.jitter(wcol, 10))
    if rng.random() < 0.5:  # a shop sign or awning band (still building)
        y = rng.uniform(2.5, 3.5)
        s.plane_x(sign * xb, z0 + 0.5, z1 - 0.5, y, y + 0.6, BUILDING, s.jitter(s.colour(BUILDING, shared=0.6)))
    # the building's shadow on the ground toward the street
    if sign * s.rng.choice([-1, 1]) > 0:
        d = rng.uniform(1, 4)
        s.shadow([s.px(sign * xb, 0, z0), s.px(sign * (xb - d), 0, z0 + 2), s.px(sign * (xb - d), 0, z1), s.px(sign * xb, 0, z1)], 0.35)


def _wall(s: _Scene, sign: int, xb: float, z0: float, z1: float) -> None:
    h = s.rng.uniform(0.8, 2.8)
    s.plane_x(sign * xb, z0, z1, 0, h, WALL, s.jitter(s.colour(WALL)))
    s.plane_x(sign * xb, z0, z1, h - 0.15, h, WALL, s.jitter(s.colour(WALL) * 0.8))  # coping


def _fence(s: _Scene, sign: int, xb: float, z0: float, z1: float) -> None:
    """A lattice: posts, rails and pickets of fence class with the background showing through."""
    rng = s.rng
    h = rng.uniform(1.0, 2.2)
    col = s.colour(FENCE)
    width = s.m2px(max(z0, 1.0)) * 0.05
    for y in (0.15, h * 0.5, h):
        a, b = s.px(sign * xb, y, z0), s.px(sign * xb, y, z1)
        s.line([a, b], width, FENCE, s.jitter(col))
    step = rng.uniform(0.15, 0.5)
    for z in np.arange(z0, z1, step):
        (xa, ya), (_, yb) = s.px(sign * xb, 0, z), s.px(sign * xb, h, z)
        if z > z0 and abs(s.px(sign * xb, 0, z - step)[0] - xa) < 1.5:
            break
        s.line([(xa, ya), (xa, yb)], max(1.0, s.m2px(z) * 0.04), FENCE, s.jitter(col, 6))


def _hedge_and_trees(s: _Scene, sign: int, xb: float, z0: float, z1: float) -> None:
    rng = s.rng
    if rng.random() < 0.6:
        s.plane_x(sign * xb, z0, z1, 0, rng.uniform(0.6, 1.5), VEGETATION, s.jitter(s.colour(VEGETATION)))
    for z in np.sort(rng.uniform(z0, z1, rng.integers(1, 4)))[::-1]:
        _tree(s, sign * (xb + rng.uniform(0, 4)), z, size=rng.uniform(3, 7))


def _tree(s: _Scene, x: float, z: float, size: float) -> None:
    rng = s.rng
    m = s.m2px(z) * s.fu * s.w / (s.fv * s.h)  # horizontal pixels per metre
    bx, by = s.px(x, 0, z)
    trunk_h = size * rng.uniform(0.35, 0.5)
    s.rect(bx - 0.15 * m, by - trunk_h * s.m2px(z), bx + 0.15 * m, by, VEGETATION, s.jitter(np.array((90, 75, 60.0)), 15))
    cx, cy = bx, by - (trunk_h + size * 0.3) * s.m2px(z)
    base = s.colour(VEGETATION)
    for _ in range(rng.integers(4, 9)):
        r = size * rng.uniform(0.2, 0.4)
        s.ellipse(cx + rng.normal(0, size * 0.25) * m, cy + rng.normal(0, size * 0.15) * s.m2px(z), r * m, r * s.m2px(z) * 0.8, VEGETATION, s.jitter(base, 18))


def _draw_sides(s: _Scene, layout: dict) -> None:
    rng = s.rng
    for sign, edge, width in ((-1, layout["rl"], layout["swl"]), (1, layout["rr"], layout["swr"])):
        segments = []
        z = rng.uniform(1.5, 6.0)
        while z < 160:
            length = rng.uniform(8, 35) * (1 + z / 60)
            kind = rng.choice(["building", "building", "building", "trees", "wall", "fence", "grass"])
            setback = edge + width + (rng.uniform(0.5, 4) if kind in ("trees", "grass", "fence") else rng.uniform(0, 1.5))
            segments.append((kind, setback, z, z + length))
            z += length + (rng.uniform(1, 8) if rng.random() < 0.3 else 0.0)
        for kind, xb, z0, z1 in segments[::-1]:  # far to near
            if kind == "building":
                _building(s, sign, xb, z0, z1)
            elif kind == "wall":
                if rng.random() < 0.5:
                    _building(s, sign, xb + rng.uniform(3, 10), z0, z1)
                _wall(s, sign, xb, z0, z1)
            elif kind == "fence":
                if rng.random() < 0.5:
                    _hedge_and_trees(s, sign, xb + 1.0, z0, z1)
                _fence(s, sign, xb, z0, z1)
            elif kind == "trees":
                _hedge_and_trees(s, sign, xb, z0, z1)
            # "grass": only the terrain verge shows


# ---- objects: each is (depth, draw function) so that they can be painted far to near ----------

def _pole(s: _Scene, x: float, z: float, top: float | None = None) -> tuple[float, float]:
    top = top if top is not None else s.rng.uniform(3.5, 8.0)
    col = s.colour(POLE)
    r = s.rng.uniform(0.06, 0.12)
    (xa, ya), (xb, yb) = s.px(x - r, top, z), s.px(x + r, 0, z)
    s.rect(xa, ya, xb, yb, POLE, s.jitter(col, 8))
    return s.px(x, top, z)


def _traffic_light(s: _Scene, x: float, z: float) -> None:
    rng = s.rng
    top = rng.uniform(3.0, 5.5)
    if rng.random() < 0.35:  # hanging over the road from a horizontal arm
        arm = -np.sign(x) * rng.uniform(2.0, 4.5)
        _pole(s, x, z, top + 0.6)
        (xa, ya), (xb, yb) = s.px(min(x, x + arm), top + 0.6, z), s.px(max(x, x + arm), top + 0.45, z)
        s.rect(xa, ya, xb, yb, POLE, s.jitter(s.colour(POLE), 8))
        x = x + arm
    else:
        _pole(s, x, z, top)
    housing = s.colour(LIGHT, shared=0.1)
    (xa, ya), (xb, yb) = s.px(x - 0.18, top + 0.5, z), s.px(x + 0.18, top - 0.5, z)
    s.rect(xa, ya, xb, yb, LIGHT, s.jitter(housing, 6))
    lit = rng.integers(3)
    m = s.m2px(z)
    for k, on in enumerate(((230, 40, 30), (240, 180, 30), (40, 220, 90))):
        cy = ya + (k + 0.5) * (yb - ya) / 3
        c = np.array(on, float) if k == lit else housing * 0.6 + 30
        s.ellipse(0.5 * (xa + xb), cy, 0.11 * m, 0.11 * m, LIGHT, s.jitter(c, 6))


def _traffic_sign(s: _Scene, x: float, z: float) -> None:
    rng = s.rng
    top = rng.uniform(2.2, 3.5)
    _pole(s, x, z, top)
    m = s.m2px(z)
    for k in range(1 if rng.random() < 0.7 else 2):
        size = rng.uniform(0.45, 0.9)
        cx, cy = s.px(x, top - k * (size + 0.1), z)
        face = s.colour(SIGN, shared=0.1)
        shape = rng.integers(4)
        r = 0.5 * size * m
        if shape == 0:
            s.ellipse(cx, cy, r, r, SIGN, s.jitter(face, 6))
            s.ellipse(cx, cy, r * 0.65, r * 0.65, SIGN, s.jitter(np.array((235, 235, 235.0)), 8))
        elif shape == 1:
            s.poly([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], SIGN, s.jitter(face, 6))
        elif shape == 2:
            s.rect(cx - r, cy - 0.7 * r, cx + r, cy + 0.7 * r, SIGN, s.jitter(face, 6))
        else:
            s.poly([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], SIGN, s.jitter(face, 6))


def _person(s: _Scene, x: float, z: float, cls: int = PERSON, base_y: float = 0.0, seated: bool = False) -> None:
    rng = s.rng
    height = rng.uniform(1.55, 1.95) * (0.75 if seated else 1.0)
    m = s.m2px(z)
    mx = m * s.fu * s.w / (s.fv * s.h)
    bx, by = s.px(x, base_y, z)
    top = by - height * m
    shirt, trousers = s.colour(cls, shared=0.0), s.colour(cls, shared=0.0)
    skin = s.jitter(np.array(rng.choice([(225, 180, 150), (180, 130, 100), (110, 75, 55)]), float), 10)
    hw = 0.22 * mx
    if not seated:  # legs (stride)
        stride = rng.uniform(-0.15, 0.15) * mx
        leg_top = by - 0.48 * height * m
        s.poly([(bx - hw, leg_top), (bx - 0.02 * mx, leg_top), (bx - stride, by), (bx - stride - 0.13 * mx, by)], cls, s.jitter(trousers, 6))
        s.poly([(bx + 0.02 * mx, leg_top), (bx + hw, leg_top), (bx + stride + 0.13 * mx, by), (bx + stride, by)], cls, s.jitter(trousers, 6))
    torso_top, torso_bot = top + 0.15 * height * m, by - (0.2 if seated else 0.47) * height * m
    s.rect(bx - hw, torso_top, bx + hw, torso_bot, cls, s.jitter(shirt, 6))
    arm = rng.uniform(0.0, 0.25) * mx
    s.line([(bx - hw, torso_top + 1), (bx - hw - arm, torso_bot)], 0.09 * mx, cls, s.jitter(shirt * 0.9, 6))
    s.line([(bx + hw, torso_top + 1), (bx + hw + arm, torso_bot)], 0.09 * mx, cls, s.jitter(shirt * 0.9, 6))
    s.ellipse(bx, top + 0.075 * height * m, 0.11 * mx, 0.075 * height * m, cls, skin)
    if rng.random() < 0.4:  # hair / hat / helmet
        s.ellipse(bx, top + 0.04 * height * m, 0.115 * mx, 0.045 * height * m, cls, s.jitter(s.colour(cls, shared=0.0), 6))


def _two_wheeler(s: _Scene, x: float, z: float, motor: bool, rider: bool) -> None:
    """A bicycle or motorcycle seen from the side (wheels, frame) with or without its rider."""
    rng = s.rng
    cls = MOTORCYCLE if motor else BICYCLE
    m = s.m2px(z)
    mx = m * s.fu * s.w / (s.fv * s.h)
    bx, by = s.px(x, 0, z)
    length = (1.9 if motor else 1.7) * mx * rng.uniform(0.35, 1.0)  # foreshortened side view
    r = (0.32 if motor else 0.34) * m
    col = s.colour(cls)
    tyre = (25, 25, 25)
    width = max(1.0, (0.12 if motor else 0.05) * m)
    for cx in (bx - length / 2 + r * 0.5, bx + length / 2 - r * 0.5):
        s.ellipse(cx, by - r, r * 0.6 if length < 2 * r else r, r, cls, tyre, width=int(max(1, round(width))))
    fx0, fx1 = bx - length / 2 + r * 0.5, bx + length / 2 - r * 0.5
    if motor:
        s.poly([(fx0 + r * 0.3, by - r), (fx1 - r * 0.2, by - r * 1.1), (fx1 - r * 0.5, by - 2.2 * r), (fx0 + r * 0.8, by - 2.0 * r)], cls, s.jitter(col, 6))
    else:
        hub = (0.5 * (fx0 + fx1), by - r * 0.9)
        s.line([(fx0, by - r), hub, (fx1, by - r), (fx1 - r * 0.3, by - 2.3 * r)], width * 1.2, cls, s.jitter(col, 6))
        s.line([hub, (fx0 + r * 0.5, by - 2.2 * r)], width * 1.2, cls, s.jitter(col, 6))
    if rider:
        _person(s, x, z, cls=RIDER, base_y=0.75 if motor else 0.85, seated=True)


def _vehicle(s: _Scene, x: float, z: float, cls: int) -> None:
    """A box-shaped vehicle driving along the road: side face (toward the camera axis) then rear."""
    rng = s.rng
    dims = {CAR: (1.8, 1.5, 4.3), TRUCK: (2.5, 3.4, 8.0), BUS: (2.55, 3.2, 12.0), TRAIN: (2.6, 3.6, 30.0)}[cls]
    wd, ht, ln = (d * rng.uniform(0.9, 1.1) for d in dims)
    col = s.colour(cls)
    side = x - np.sign(x) * wd / 2 if abs(x) > wd / 2 else None
    # cast shadow on the road
    s.shadow([s.px(x - wd / 2 - 0.2, 0, z - 0.3), s.px(x + wd / 2 + 0.2, 0, z - 0.3), s.px(x + wd / 2 + 0.2, 0, z + ln), s.px(x - wd / 2 - 0.2, 0, z + ln)], 0.45)
    body_y0 = 0.3 if cls == CAR else 0.5
    if side is not None:
        s.plane_x(side, z, z + ln, body_y0, ht if cls != CAR else ht * 0.6, cls, s.jitter(col * 0.85, 6))
        if cls == CAR:  # cabin
            s.poly([s.px(side, ht * 0.6, z + ln * 0.2), s.px(side, ht, z + ln * 0.35), s.px(side, ht, z + ln * 0.75), s.px(side, ht * 0.6, z + ln * 0.85)], cls, s.jitter(col * 0.8, 6))
        # windows along the side (vehicle class)
        glass = s.jitter(np.array((40, 50, 60.0)) if rng.random() < 0.7 else np.array((150, 170, 190.0)), 10)
        wy0, wy1 = (ht * 0.65, ht * 0.95) if cls == CAR else (ht * 0.55, ht * 0.85)
        za, zb = (z + ln * 0.3, z + ln * 0.75) if cls == CAR else (z + 0.8, z + ln - 0.8)
        step = ln / (2 if cls == CAR else 6 if cls == BUS else 12 if cls == TRAIN else 1)
        zz = za
        while zz < zb - 0.3:
            s.plane_x(side, zz + 0.1, min(zz + step - 0.2, zb), wy0, wy1, cls, glass)
            zz += step
        # wheels (vehicle class, dark)
        for zw in (z + ln * 0.15, z + ln * 0.85) if cls != TRAIN else ():
            wx, wy = s.px(side, 0.35, zw)
            rr = 0.35 * s.m2px(zw)
            s.ellipse(wx, wy, rr * 0.5, rr, cls, (20, 20, 20))
    # rear face
    s.plane_z(z, x - wd / 2, x + wd / 2, body_y0 if cls != TRAIN else 0.3, ht * (0.62 if cls == CAR else 1.0), cls, s.jitter(col, 6))
    if cls == CAR:
        (a, b), (c, d) = s.px(x - wd * 0.4, ht, z + ln * 0.25), s.px(x + wd * 0.4, ht * 0.62, z + ln * 0.25)
        s.rect(a, b, c, d, cls, s.jitter(np.array((40, 50, 60.0)), 8))
        for sx in (-1, 1):  # tail lights
            (a, b), (c, d) = s.px(x + sx * wd * 0.45 - 0.12, ht * 0.5, z), s.px(x + sx * wd * 0.45 + 0.12, ht * 0.42, z)
            s.rect(min(a, c), b, max(a, c), d, cls, s.jitter(np.array((200, 30, 30.0)), 10))
    else:
        (a, b), (c, d) = s.px(x - wd * 0.42, ht * 0.9, z), s.px(x + wd * 0.42, ht * 0.6, z)
        s.rect(a, b, c, d, cls, s.jitter(np.array((45, 55, 65.0)), 8))
    for sx in (-1, 1):  # tyres under the rear
        (a, b), (c, d) = s.px(x + sx * wd * 0.38 - 0.15, body_y0 + 0.05, z + 0.5), s.px(x + sx * wd * 0.38 + 0.15, 0, z + 0.5)
        s.rect(a, b, c, d, cls, (20, 20, 20))


def _place_objects(s: _Scene, layout: dict, index: int) -> list[tuple[float, object]]:
    rng = s.rng
    rl, rr, swl, swr = layout["rl"], layout["rr"], layout["swl"], layout["swr"]
    objs: list[tuple[float, object]] = []

    def side_x(where: str) -> float:
        """A lateral position on a sidewalk ("curb" = near the road, "walk" = anywhere on it)."""
        sign = rng.choice([-1, 1])
        edge, width = (rl, swl) if sign < 0 else (rr, swr)
        off = rng.uniform(0.3, 0.7) if where == "curb" else rng.uniform(0.5, width - 0.3)
        return float(sign * (edge + off))

    def depth(lo: float = 4.0, hi: float = 70.0) -> float:
        return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))  # uniform in log-depth: many far, small ones

    for _ in range(rng.integers(3, 9)):
        x, z = side_x("curb"), depth(3, 80)
        objs.append((z, lambda x=x, z=z: _pole(s, x, z)))
    for _ in range(rng.integers(1, 4)):
        x, z = side_x("curb"), depth(6, 70)
        objs.append((z, lambda x=x, z=z: _traffic_light(s, x, z)))
    for _ in range(rng.integers(1, 5)):
        x, z = side_x("curb"), depth(4, 70)
        objs.append((z, lambda x=x, z=z: _traffic_sign(s, x, z)))
    for _ in range(rng.integers(1, 4)):
        x, z = side_x("walk"), depth(5, 60)
        objs.append((z, lambda x=x, z=z: _tree(s, x, z, size=rng.uniform(4, 8))))
    for _ in range(rng.integers(2, 10)):  # pedestrians, mostly distant
        x, z = side_x("walk"), depth(4, 90)
        objs.append((z, lambda x=x, z=z: _person(s, x, z)))
    if rng.random() < 0.3:  # people crossing the road
        for _ in range(rng.integers(1, 4)):
            x, z = float(rng.uniform(-rl, rr)), depth(8, 40)
            objs.append((z, lambda x=x, z=z: _person(s, x, z)))
    # riders near the road edges; motorcycles and bicycles appear in every run of 10 scenes
    n_bikes = rng.integers(0, 4) + (index % 5 == 1)
    for k in range(n_bikes):
        motor = bool(rng.random() < 0.35 or (k == 0 and index % 10 == 1))
        rider = bool(rng.random() < 0.8)
        sign = rng.choice([-1, 1])
        x = float(sign * ((rl if sign < 0 else rr) - rng.uniform(0.6, 1.5)))
        if not rider and rng.random() < 0.6:
            x = side_x("curb")
        z = depth(5, 50)
        objs.append((z, lambda x=x, z=z, motor=motor, rider=rider: _two_wheeler(s, x, z, motor, rider)))
    lane = rng.uniform(2.8, 3.6)
    for _ in range(rng.integers(1, 7)):
        x = float(rng.choice([-rl + 1.1, rr - 1.1, -lane / 2, lane / 2, rng.uniform(-rl + 1, rr - 1)]))
        z = depth(5, 90)
        objs.append((z, lambda x=x, z=z: _vehicle(s, x, z, CAR)))
    # larger vehicles: random, plus one of each in every run of 10 consecutive scenes
    for cls, p, slot in ((TRUCK, 0.3, 3), (BUS, 0.25, 5), (TRAIN, 0.08, 7)):
        if rng.random() < p or index % 10 == slot:
            if cls == TRAIN:
                x = float(rng.uniform(-1.5, 1.5))
                z = float(rng.uniform(12, 35))
            else:
                x = float(rng.choice([-lane / 2, lane / 2, rr - 1.5, -rl + 1.5]))
                z = float(rng.uniform(8, 40))
            objs.append((z, lambda x=x, z=z, cls=cls: _vehicle(s, x, z, cls)))
    return objs


def _finish(s: _Scene, label: np.ndarray) -> np.ndarray:
    """Illumination, shadows, per-class texture and sensor noise on the flat-coloured drawing."""
    rng = s.rng
    h, w = s.h, s.w
    rgb = np.asarray(s.rgb, dtype=np.float32)
    # smooth illumination field shared by all classes
    grid = rng.uniform(0.75, 1.15, size=(4, 8)).astype(np.float32)
    light = np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.BILINEAR), dtype=np.float32)
    shade = np.asarray(s.shade, dtype=np.float32) / 255.0
    factor = (light * shade)[..., None]
    # surface texture: coarse blotches for vegetation/terrain, fine grain elsewhere
    small = rng.standard_normal((max(1, h // 4), max(1, w // 4)), dtype=np.float32)
    blotch = np.asarray(Image.fromarray(small, mode="F").resize((w, h), Image.BILINEAR), dtype=np.float32)
    rough = np.isin(label, (VEGETATION, TERRAIN))
    factor = factor * (1.0 + np.where(rough, 0.18, 0.05)[..., None] * blotch[..., None])
    rgb = rgb * factor
    sigma = rng.uniform(5.0, 12.0)
    noise = rng.standard_normal((h, w, 1), dtype=np.float32) * sigma
    noise = noise + rng.standard_normal((h, w, 3), dtype=np.float32) * (sigma * 0.4)
    return np.clip(rgb + noise, 0, 255).round().astype(np.uint8)


MAX_SIDE = 8192  # 4x Cityscapes' width; a scene's arrays take about 40 bytes per pixel


def check_size(size: tuple[int, int] | str, name: str = "size") -> tuple[int, int]:
    """A scene size (H, W) within [8, MAX_SIDE] per side; a larger one is refused before any memory is taken."""
    h, w = parse_size(size, name)
    if h < 8 or w < 8:
        raise ValueError(f"{name} must be at least 8x8, got {h}x{w}")
    if h > MAX_SIDE or w > MAX_SIDE:
        raise ValueError(f"{name} must be at most {MAX_SIDE}x{MAX_SIDE} (a scene of {h}x{w} needs about "
                         f"{40 * h * w / 2**30:.0f} GiB of memory), got {h}x{w}")
    return h, w


def render_scene(seed: int, index: int, size: tuple[int, int] | str = (256, 512)) -> tuple[np.ndarray, np.ndarray]:
    """Render scene ``index`` of stream ``seed``: (rgb uint8 (H, W, 3), train ids uint8 (H, W)).

    Deterministic for (seed, index) at a given size; geometry is in metres and projected, so
    every resolution shows the same scene.
    """
    h, w = check_size(size)
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    rng = np.random.default_rng([int(seed), int(index)])
    s = _Scene(rng, (h, w))
    layout = {"rl": rng.uniform(3.5, 8.0), "rr": rng.uniform(3.5, 8.0), "swl": rng.uniform(2.0, 5.0), "swr": rng.uniform(2.0, 5.0)}
    _draw_skyline(s)
    _draw_ground(s, layout)
    _draw_sides(s, layout)
    objs = _place_objects(s, layout, index)
    for _, draw in sorted(objs, key=lambda t: -t[0]):  # painter's order: far to near
        draw()
    label = np.asarray(s.label, dtype=np.uint8).copy()
    return _finish(s, label), label
