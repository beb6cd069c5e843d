"""The embedded synthetic apparel dataset: a figure wearing 1-5 garments over a background that says nothing.

Each garment class is a recognisable silhouette (sleeves, hems, legs, brims) drawn with a random colour and
texture, on a figure of random size, position and skin tone. Backgrounds (solid, gradient, noise, stripes,
with stray blobs) are drawn independently of the labels and are loud on purpose: they dominate the pixels,
so an embedding of the whole image is pulled towards "same background", as in the study, and zeroing the
background with the mask can help. Written in the `folder` layout; deterministic per (seed, image index).
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from imret.errors import DataError

CLASSES = [
    "shirt", "t-shirt", "dress", "skirt", "trousers", "shorts",
    "jacket", "coat", "hat", "glasses", "bag", "shoes",
]  # fmt: skip
# Classes that cannot be worn together: one top layer, one bottom, one outer layer.
EXCLUSIVE = [{"shirt", "t-shirt", "dress"}, {"trousers", "shorts", "skirt", "dress"}, {"jacket", "coat"}]
# Paint order: later garments cover earlier ones.
LAYERS = ["trousers", "shorts", "skirt", "shirt", "t-shirt", "dress", "jacket", "coat", "shoes", "bag", "hat", "glasses"]

Polygon = list[tuple[float, float]]


class Figure:
    """Maps body coordinates (x right of the centre line, y down from the top, both in figure heights) to pixels."""

    def __init__(self, cx: float, top: float, height: float):
        self.cx, self.top, self.h = cx, top, height

    def pt(self, x: float, y: float) -> tuple[float, float]:
        return (self.cx + x * self.h, self.top + y * self.h)

    def poly(self, points: Polygon) -> list[tuple[float, float]]:
        return [self.pt(x, y) for x, y in points]

    def mirrored(self, points: Polygon) -> list[Polygon]:
        return [points, [(-x, y) for x, y in points]]

    def box(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [*self.pt(x0, y0), *self.pt(x1, y1)]


def _torso(bottom: float, flare: float = 0.0) -> Polygon:
    return [(-0.13, 0.17), (0.13, 0.17), (0.11, 0.45), (0.12 + flare, bottom), (-0.12 - flare, bottom), (-0.11, 0.45)]


def _sleeve(end: float) -> Polygon:
    # shoulder to `end` (fraction of the way to the wrist), along the outside of the arm
    wrist_y = 0.17 + 0.33 * end
    wrist_x = 0.14 + 0.05 * end
    return [(0.12, 0.17), (0.17, 0.19), (wrist_x + 0.045, wrist_y), (wrist_x - 0.02, wrist_y), (0.12, 0.27)]


def _leg(bottom: float, width: float = 0.055) -> Polygon:
    ankle_x = 0.06
    return [(0.0, 0.47), (0.12, 0.45), (ankle_x + width, bottom), (ankle_x - width * 0.7, bottom), (0.0, 0.55)]


def garment_shapes(name: str, fig: Figure, draw: ImageDraw.ImageDraw) -> None:
    """Fill the silhouette of one garment with value 255."""
    fill = 255
    if name in ("shirt", "t-shirt", "jacket", "coat"):
        bottom = {"shirt": 0.52, "t-shirt": 0.5, "jacket": 0.55, "coat": 0.8}[name]
        flare = 0.05 if name == "coat" else 0.0
        sleeve = 0.35 if name == "t-shirt" else 1.0
        draw.polygon(fig.poly(_torso(bottom, flare)), fill=fill)
        for side in fig.mirrored(_sleeve(sleeve)):
            draw.polygon(fig.poly(side), fill=fill)
        if name == "shirt":  # collar
            draw.polygon(fig.poly([(-0.06, 0.15), (0.0, 0.22), (0.06, 0.15), (0.0, 0.17)]), fill=fill)
        if name in ("jacket", "coat"):  # open front: the layer beneath shows through
            draw.polygon(fig.poly([(-0.025, 0.17), (0.025, 0.17), (0.012, bottom), (-0.012, bottom)]), fill=0)
    elif name == "dress":
        draw.polygon(fig.poly([(-0.1, 0.17), (0.1, 0.17), (0.1, 0.42), (0.24, 0.76), (-0.24, 0.76), (-0.1, 0.42)]), fill=fill)
    elif name == "skirt":
        draw.polygon(fig.poly([(-0.11, 0.44), (0.11, 0.44), (0.22, 0.72), (-0.22, 0.72)]), fill=fill)
    elif name in ("trousers", "shorts"):
        bottom = 0.93 if name == "trousers" else 0.63
        draw.polygon(fig.poly([(-0.12, 0.44), (0.12, 0.44), (0.12, 0.52), (-0.12, 0.52)]), fill=fill)
        for side in fig.mirrored(_leg(bottom, 0.06 if name == "trousers" else 0.08)):
            draw.polygon(fig.poly(side), fill=fill)
    elif name == "shoes":
        for x in (-0.07, 0.07):
            draw.ellipse(fig.box(x - 0.05, 0.92, x + 0.05 + 0.02 * np.sign(x), 0.99), fill=fill)
    elif name == "hat":
        draw.ellipse(fig.box(-0.12, 0.025, 0.12, 0.065), fill=fill)
        draw.rectangle(fig.box(-0.065, -0.03, 0.065, 0.05), fill=fill)
    elif name == "glasses":
        for x in (-0.035, 0.035):
            draw.ellipse(fig.box(x - 0.03, 0.065, x + 0.03, 0.1), fill=fill)
    elif name == "bag":
        draw.rectangle(fig.box(0.16, 0.42, 0.34, 0.58), fill=fill)
        draw.line([fig.pt(0.18, 0.43), fig.pt(0.25, 0.33), fig.pt(0.32, 0.43)], fill=fill, width=max(1, int(fig.h * 0.02)))
    else:
        raise ValueError(f"no shape for class {name!r}")


def draw_body(fig: Figure, draw: ImageDraw.ImageDraw, skin: tuple[int, int, int]) -> None:
    draw.ellipse(fig.box(-0.065, 0.0, 0.065, 0.14), fill=skin)
    draw.rectangle(fig.box(-0.025, 0.12, 0.025, 0.18), fill=skin)
    draw.polygon(fig.poly(_torso(0.5)), fill=skin)
    for side in fig.mirrored(_sleeve(1.0)) + fig.mirrored(_leg(0.95, 0.045)):
        draw.polygon(fig.poly(side), fill=skin)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float32)


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = rng.integers(4)
    c0, c1 = _colour(rng), _colour(rng)
    if kind == 0:  # solid
        img = np.broadcast_to(c0, (size, size, 3)).copy()
    elif kind == 1:  # linear gradient at a random angle
        angle = rng.uniform(0, 2 * np.pi)
        t = (xx * np.cos(angle) + yy * np.sin(angle) + 1.5) % 1.0
        img = c0 + (c1 - c0) * t[..., None]
    elif kind == 2:  # smooth noise: a coarse random grid upsampled, plus grain
        cells = int(rng.integers(3, 9))
        coarse = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)
        img += rng.normal(0, 12, img.shape)
    else:  # stripes at a random angle and period
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(0.06, 0.25)
        t = ((xx * np.cos(angle) + yy * np.sin(angle)) / period) % 1.0 < 0.5
        img = np.where(t[..., None], c0, c1)
    return img


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    base = _colour(rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = rng.integers(4)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    if kind == 1:  # stripes
        period = rng.uniform(3, 9)
        on = ((yy if rng.random() < 0.5 else xx) // (period / 2)) % 2 == 0
        img[on] = _colour(rng)
    elif kind == 2:  # dots
        period = int(rng.integers(4, 9))
        on = ((yy % period) < period / 2.5) & ((xx % period) < period / 2.5)
        img[on] = _colour(rng)
    elif kind == 3:  # two-tone checks
        period = int(rng.integers(4, 12))
        on = ((yy // period + xx // period) % 2) == 0
        img[on] = img[on] * 0.6
    shade = 0.75 + 0.25 * (1 - yy / size)  # light from above keeps shapes readable on loud backgrounds
    return img * shade[..., None]


def choose_garments(rng: np.random.Generator) -> list[str]:
    count = int(rng.integers(1, 6))
    chosen: list[str] = []
    for name in rng.permutation(CLASSES):
        if len(chosen) == count:
            break
        if any(name in group and group & set(chosen) for group in EXCLUSIVE):
            continue
        chosen.append(str(name))
    return sorted(chosen, key=LAYERS.index)


def render_scene(seed: int, index: int, size: int = 96) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One scene: (RGB uint8 [size, size, 3], mask uint8 [size, size] of 0/255, garment names)."""
    rng = np.random.default_rng([seed, index])
    img = background(rng, size)
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, 4))):  # stray blobs: shapes in the background that are no garment
        x, y, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(0.04, 0.15) * size]
        fill = tuple(int(c) for c in _colour(rng))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x - r, y - r, x + r, y + r], fill=fill)

    height = rng.uniform(0.7, 0.98) * size
    fig = Figure(cx=rng.uniform(0.3, 0.7) * size, top=rng.uniform(0.02 * size, size - height), height=height)
    skin = tuple(int(c) for c in rng.choice([[241, 194, 165], [224, 172, 125], [198, 134, 66], [141, 85, 36], [90, 56, 37]]))
    draw_body(fig, draw, skin)

    garments = choose_garments(rng)
    pixels = np.asarray(canvas, dtype=np.float32).copy()
    mask = np.zeros((size, size), dtype=bool)
    for name in garments:
        stencil = Image.new("L", (size, size), 0)
        garment_shapes(name, fig, ImageDraw.Draw(stencil))
        region = np.asarray(stencil) > 0
        colour = np.full(3, 25.0) if name == "glasses" else None
        pixels[region] = colour if colour is not None else texture(rng, size)[region]
        mask |= region
    return np.clip(pixels, 0, 255).astype(np.uint8), mask.astype(np.uint8) * 255, garments


def write_synth(out: str | Path, images: int = 2000, size: int = 96, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the dataset in the `folder` layout. labels.csv goes last, so a killed run is never mistaken for a
    finished one."""
    out = Path(out)
    if images < 1 or size < 32:
        raise DataError("imret data synth: needs --images >= 1 and --size >= 32")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"{out} exists and is not empty: choose another OUT or pass --overwrite")
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    rows = []
    for index in tqdm(range(images), desc="synth", unit="img", mininterval=1.0):
        image, mask, garments = render_scene(seed, index, size)
        name = f"synth-{index:06d}"
        Image.fromarray(image).save(out / "images" / f"{name}.jpg", quality=92)
        Image.fromarray(mask).save(out / "masks" / f"{name}.png")
        rows.append((f"{name}.jpg", ";".join(garments)))
    (out / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    tmp = out / "labels.csv.tmp"
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "labels"])
        writer.writerows(rows)
    os.replace(tmp, out / "labels.csv")
    return out
