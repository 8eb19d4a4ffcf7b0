"""What a synthetic vehicle looks like: identity traits and how they are painted from the side, front or rear.

A `Vehicle` holds every trait that belongs to one identity. Body colour comes from a small palette shared by
many identities (as in real traffic, colour alone does not identify); the identity lies in the combination of
shape, size and details (stripes, roof sign or rack, wheel style, window tint, door/tailgate marking, bumper,
lights). Some traits show in every view (colour, tint, roof, stripes, marking), others only in some (wheels
from the side, grille from the front), as with real cameras.

`draw_vehicle` paints one canonical view onto a transparent RGBA layer; cameras then move, scale, rotate and
light it (`synthetic_camera.py`). Geometry is in units of the vehicle's length (side) or width (front/rear),
so the vehicle fills the frame like a detector crop, as in VeRi-776.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# (rgb, how common): white/black/grey/silver dominate real traffic, so most identities share a colour.
BODY_PALETTE = [
    ((236, 236, 232), 0.20), ((28, 28, 32), 0.17), ((160, 162, 166), 0.14), ((98, 100, 104), 0.12),
    ((170, 30, 32), 0.09), ((30, 60, 140), 0.09), ((30, 90, 50), 0.05), ((220, 180, 40), 0.04),
    ((120, 80, 50), 0.04), ((230, 120, 30), 0.03), ((110, 170, 210), 0.02), ((90, 30, 90), 0.01),
]
ACCENTS = [(250, 250, 250), (20, 20, 20), (200, 30, 30), (240, 200, 30), (40, 110, 220), (40, 170, 80),
           (240, 130, 20), (150, 60, 170)]
TINTS = [(120, 150, 170), (60, 75, 90), (22, 26, 32)]          # light, medium, limo-dark glass
BUMPERS = [(25, 25, 25), (120, 120, 120), None]                 # None = body colour
HUBS = [(190, 192, 196), (40, 40, 40), (200, 170, 80), (235, 235, 235)]
BODIES = ("sedan", "suv", "van", "truck")
VIEWS = ("side", "front", "rear")


@dataclass(frozen=True)
class Vehicle:
    body: str                  # one of BODIES
    length: float              # fraction of the frame the vehicle spans (size)
    tallness: float            # height multiplier around the body type's typical proportions
    colour: tuple
    stripe: str                # none / single / double / diagonal
    stripe_colour: tuple
    stripe_y: float            # height of the side stripe, in vehicle lengths
    roof: str                  # none / sign / rack
    roof_colour: tuple
    hub: tuple                 # wheel style: hub colour, spoke count, hub size
    spokes: int
    hub_size: float
    tint: tuple
    marking: str               # none / circle / square / triangle / bars
    marking_colour: tuple
    marking_x: float           # where along the door the marking sits
    bumper: tuple
    lights: str                # round / rect
    grille_bars: int


def sample_vehicle(rng: np.random.Generator, colours: int) -> Vehicle:
    """Draw one identity's traits; `colours` = how many palette entries are in use (most common first)."""
    weights = np.array([w for _, w in BODY_PALETTE[:colours]])
    colour = BODY_PALETTE[int(rng.choice(colours, p=weights / weights.sum()))][0]
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731 - one-line chooser over tuples
    bumper = pick(BUMPERS)
    return Vehicle(
        body=pick(BODIES), length=float(rng.uniform(0.68, 0.84)), tallness=float(rng.uniform(0.9, 1.1)),
        colour=colour, stripe=pick(("none", "single", "double", "diagonal")), stripe_colour=pick(ACCENTS),
        stripe_y=float(rng.uniform(0.09, 0.17)), roof=pick(("none", "none", "sign", "rack")),
        roof_colour=pick(ACCENTS), hub=pick(HUBS), spokes=pick((0, 3, 5)), hub_size=float(rng.uniform(0.4, 0.7)),
        tint=pick(TINTS), marking=pick(("none", "circle", "square", "triangle", "bars")),
        marking_colour=pick(ACCENTS), marking_x=float(rng.uniform(0.3, 0.6)),
        bumper=colour if bumper is None else bumper, lights=pick(("round", "rect")),
        grille_bars=int(rng.integers(0, 5)),
    )


# Side profiles, x along the length (0 = rear, 1 = front), y up from the ground, in vehicle lengths.
_SIDE = {
    "sedan": dict(body=[(0, .07), (0, .2), (.06, .23), (.28, .24), (.38, .36), (.66, .36), (.78, .24), (.97, .21),
                        (1, .16), (1, .07)],
                  glass=[(.31, .245), (.40, .34), (.64, .34), (.75, .245)], roof=(.40, .64, .36),
                  wheels=(.17, .83), r=.075),
    "suv": dict(body=[(0, .09), (0, .36), (.04, .44), (.72, .44), (.84, .30), (.99, .27), (1, .2), (1, .09)],
                glass=[(.05, .30), (.07, .42), (.71, .42), (.81, .30)], roof=(.08, .68, .44),
                wheels=(.17, .83), r=.085),
    "van": dict(body=[(0, .08), (0, .52), (.03, .55), (.80, .55), (.95, .32), (1, .28), (1, .08)],
                glass=[(.10, .36), (.10, .50), (.79, .50), (.91, .34)], roof=(.06, .76, .55),
                wheels=(.16, .84), r=.08),
    "truck": dict(body=[(0, .09), (0, .60), (.72, .60), (.72, .46), (.90, .46), (1, .30), (1, .09)],
                  glass=[(.76, .30), (.76, .43), (.89, .43), (.97, .30)], roof=(.05, .67, .60),
                  wheels=(.14, .30, .86), r=.085),
}
# Front/rear: total height, body (hood) height and cabin top width, in vehicle widths.
_FRONT = {"sedan": (.78, .42, .70), "suv": (.95, .52, .86), "van": (1.0, .45, .88), "truck": (1.12, .50, .90)}


def draw_vehicle(v: Vehicle, view: str, width: int, height: int) -> Image.Image:
    """One canonical view of `v`, centred on a transparent (height, width) RGBA layer, front facing right."""
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    span = v.length * min(width, 1.6 * height)
    if view == "side":
        top = max(y for _, y in _SIDE[v.body]["body"]) * v.tallness
        _side(draw, v, (width - span) / 2, height / 2 + top * span / 2, span)
    else:
        span *= 0.85  # a vehicle is narrower than long, but a crop of it still fills the frame
        total = _FRONT[v.body][0] * v.tallness
        _front_rear(draw, v, width / 2, height / 2 + total * span / 2, span, rear=(view == "rear"))
    return layer


def _side(draw: ImageDraw.ImageDraw, v: Vehicle, x0: float, ground: float, L: float) -> None:
    spec, t = _SIDE[v.body], v.tallness
    P = lambda x, y: (x0 + x * L, ground - y * t * L)  # noqa: E731 - vehicle units -> pixels
    poly = lambda pts, fill: draw.polygon([P(x, y) for x, y in pts], fill=fill)  # noqa: E731
    poly(spec["body"], v.colour)
    poly(spec["glass"], v.tint)
    gx, gy = [x for x, _ in spec["glass"]], [y for _, y in spec["glass"]]
    pillar = (gx[0] + gx[-1]) / 2  # B-pillar splits the side glass into two windows
    poly([(pillar - .012, min(gy)), (pillar - .012, max(gy)), (pillar + .012, max(gy)), (pillar + .012, min(gy))],
         v.colour)
    # Stripes run along the lower body, below every body type's window line.
    s = v.stripe_y
    if v.stripe == "single":
        poly([(.02, s), (.02, s + .035), (.98, s + .035), (.98, s)], v.stripe_colour)
    elif v.stripe == "double":
        for y in (s, s + .04):
            poly([(.02, y), (.02, y + .016), (.98, y + .016), (.98, y)], v.stripe_colour)
    elif v.stripe == "diagonal":
        poly([(.05, .10), (.05, .135), (.95, .225), (.95, .19)], v.stripe_colour)
    rx0, rx1, ry = spec["roof"]
    if v.roof == "sign":
        mid = (rx0 + rx1) / 2
        poly([(mid - .08, ry), (mid - .08, ry + .055), (mid + .08, ry + .055), (mid + .08, ry)], v.roof_colour)
    elif v.roof == "rack":
        poly([(rx0 + .02, ry + .035), (rx0 + .02, ry + .05), (rx1 - .02, ry + .05), (rx1 - .02, ry + .035)],
             v.roof_colour)
        for x in (rx0 + .05, rx1 - .05):
            poly([(x - .01, ry), (x - .01, ry + .04), (x + .01, ry + .04), (x + .01, ry)], v.roof_colour)
    my = .36 if v.body == "truck" else .15
    mx = v.marking_x * (.6 if v.body == "truck" else 1.0) + (.05 if v.body == "truck" else 0)
    _marking(draw, v, P(mx, my), .05 * L)
    poly([(0, .07), (0, .12), (.05, .12), (.05, .07)], v.bumper)
    poly([(.95, .07), (.95, .12), (1, .12), (1, .07)], v.bumper)
    poly([(.975, .16), (.975, .2), (1, .19), (1, .16)], (250, 240, 190))
    poly([(0, .16), (0, .2), (.02, .2), (.02, .16)], (200, 20, 20))
    for wx in spec["wheels"]:
        _wheel(draw, v, P(wx, spec["r"]), spec["r"] * L)


def _wheel(draw: ImageDraw.ImageDraw, v: Vehicle, centre: tuple, r: float) -> None:
    cx, cy = centre
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(18, 18, 18))
    h = r * v.hub_size
    draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=v.hub)
    for k in range(v.spokes):
        a = 2 * np.pi * k / v.spokes
        draw.line([(cx, cy), (cx + h * np.cos(a), cy + h * np.sin(a))], fill=(18, 18, 18), width=max(1, int(r / 6)))


def _marking(draw: ImageDraw.ImageDraw, v: Vehicle, centre: tuple, size: float) -> None:
    cx, cy, s, c = centre[0], centre[1], size, v.marking_colour
    if v.marking == "circle":
        draw.ellipse([cx - s, cy - s, cx + s, cy + s], fill=c)
    elif v.marking == "square":
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=c)
    elif v.marking == "triangle":
        draw.polygon([(cx - s, cy + s), (cx + s, cy + s), (cx, cy - s)], fill=c)
    elif v.marking == "bars":
        for k in (-1, 0, 1):
            draw.rectangle([cx - 1.6 * s, cy + k * .7 * s - .2 * s, cx + 1.6 * s, cy + k * .7 * s + .2 * s], fill=c)


def _front_rear(draw: ImageDraw.ImageDraw, v: Vehicle, cx: float, ground: float, W: float, rear: bool) -> None:
    total, hood, cab_top = _FRONT[v.body]
    t = v.tallness
    total, hood = total * t, hood * t
    P = lambda u, y: (cx + u * W, ground - y * W)  # noqa: E731 - u across (-.5..5), y up, in widths
    box = lambda u0, y0, u1, y1, fill: draw.rectangle(  # noqa: E731
        [P(u0, y1), P(u1, y0)], fill=fill)
    box(-.47, 0, -.31, .16, (18, 18, 18))
    box(.31, 0, .47, .16, (18, 18, 18))
    box(-.5, .07, .5, hood, v.colour)
    draw.polygon([P(-.48, hood), P(-cab_top / 2, total), P(cab_top / 2, total), P(.48, hood)], fill=v.colour)
    g = .06 if v.body in ("sedan", "suv") else .05
    glass_top = total - .07
    if not (rear and v.body == "truck"):  # a box truck's rear is all cargo doors
        draw.polygon([P(-.42, hood + g), P(-cab_top / 2 + .05, glass_top), P(cab_top / 2 - .05, glass_top),
                      P(.42, hood + g)], fill=v.tint)
    else:
        box(-.005, .1, .005, total - .02, (60, 60, 60))
    # Stripes run front to back over hood and roof, so every view of the identity shows them.
    if v.stripe == "single":
        box(-.06, .12, .06, hood, v.stripe_colour)
        box(-.06, glass_top, .06, total, v.stripe_colour)
    elif v.stripe == "double":
        for u in (-.1, .06):
            box(u, .12, u + .04, hood, v.stripe_colour)
            box(u, glass_top, u + .04, total, v.stripe_colour)
    elif v.stripe == "diagonal":
        draw.polygon([P(-.5, .18), P(-.5, .24), P(.5, hood - .02), P(.5, hood - .08)], fill=v.stripe_colour)
    if v.roof == "sign":
        box(-.14, total, .14, total + .07, v.roof_colour)
    elif v.roof == "rack":
        box(-cab_top / 2 + .04, total + .04, cab_top / 2 - .04, total + .06, v.roof_colour)
        for u in (-cab_top / 2 + .06, cab_top / 2 - .08):
            box(u, total, u + .02, total + .05, v.roof_colour)
    lamp = (200, 20, 20) if rear else (250, 240, 190)
    ly0, ly1 = hood - .15, hood - .06
    for u0, u1 in ((-.45, -.29), (.29, .45)):
        if v.lights == "round":
            draw.ellipse([P(u0, ly1), P(u1, ly0)], fill=lamp)
        else:
            box(u0, ly0, u1, ly1, lamp)
    if rear:
        box(-.12, .1, .12, .17, (235, 235, 225))  # licence plate
        _marking(draw, v, P(0, hood - .1), .035 * W)
    else:
        box(-.22, .18, .22, hood - .05, (45, 45, 48))
        for k in range(v.grille_bars):
            y = .2 + (k + .5) * (hood - .27) / max(v.grille_bars, 1)
            box(-.2, y - .008, .2, y + .008, (150, 150, 150))
        _marking(draw, v, P(0, (.18 + hood - .05) / 2), .03 * W)
    box(-.5, .07, .5, .13, v.bumper)
