"""Named backgrounds for the procedural generator: each scene is a distinct colour/texture field.

A scene is a function (rng, X, Y) -> float32 (R, R, 3) in [0, 1]; X and Y are pixel-centre
coordinates in [0, 1] (Y grows downwards). Everything is whole-array numpy (no per-pixel Python), so
a 64 px background costs tens of microseconds. `ground` is where objects may stand (fraction of the
image height), so a subject sits on the sand rather than in the sky.

The phrases are what captions say ("a photo of a mug on the beach"); they are the SCENE names and
never describe the subject.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

F32 = np.float32


def rgb(*c: float) -> np.ndarray:
    return np.asarray(c, F32) / 255.0


def jitter(rng: np.random.Generator, c: np.ndarray, amount: float = 0.06) -> np.ndarray:
    return np.clip(c + rng.uniform(-amount, amount, 3).astype(F32), 0, 1)


def lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per-pixel blend of two colours (t: (R, R) in [0, 1])."""
    return a + (b - a) * t[..., None]


def step(x: np.ndarray, edge: float | np.ndarray, res: int) -> np.ndarray:
    """0 below edge, 1 above, with a one-pixel antialiased ramp."""
    return np.clip((x - edge) * res + 0.5, 0, 1)


def smooth_noise(rng: np.random.Generator, res: int, cells_y: int, cells_x: int) -> np.ndarray:
    """Low-frequency noise ~N(0,1): a small random grid upsampled bilinearly (PIL, in C)."""
    low = rng.standard_normal((cells_y, cells_x)).astype(F32)
    return np.asarray(Image.fromarray(low, mode="F").resize((res, res), Image.BILINEAR))


def fine_noise(rng: np.random.Generator, res: int, scale: float) -> np.ndarray:
    return (rng.standard_normal((res, res), dtype=F32) * scale)[..., None]


def _beach(rng, X, Y):
    R = X.shape[0]
    h1 = 0.28 + rng.uniform(-0.05, 0.05)
    h2 = h1 + rng.uniform(0.1, 0.16)
    sky = lerp(jitter(rng, rgb(120, 180, 235)), rgb(205, 230, 250), Y / h1)
    waves = 0.05 * np.sin(Y * 140 + smooth_noise(rng, R, 3, 6) * 2)
    sea = jitter(rng, rgb(30, 120, 170), 0.04) + waves[..., None]
    sand = jitter(rng, rgb(225, 200, 150), 0.04) + 0.04 * smooth_noise(rng, R, 8, 8)[..., None]
    img = sky + (sea - sky) * step(Y, h1, R)[..., None]
    img = img + (sand - img) * step(Y, h2 + 0.01 * np.sin(X * 20), R)[..., None]
    return img + fine_noise(rng, R, 0.02)


def _snow(rng, X, Y):
    R = X.shape[0]
    h = 0.22 + rng.uniform(-0.05, 0.05)
    sky = lerp(jitter(rng, rgb(185, 195, 210), 0.03), rgb(225, 230, 238), Y / h)
    snow = rgb(240, 244, 250) - (0.05 * (1 - Y) + 0.03 * smooth_noise(rng, R, 5, 5))[..., None] * rgb(255, 200, 120)
    img = sky + (snow - sky) * step(Y, h, R)[..., None]
    sparkle = (rng.random((R, R), dtype=F32) > 0.985)[..., None] * 0.25
    return img + sparkle + fine_noise(rng, R, 0.01)


def _wooden_floor(rng, X, Y):
    R = X.shape[0]
    n = int(rng.integers(5, 9))
    row = np.floor(Y * n).astype(np.int32)
    tones = np.stack([jitter(rng, rgb(150, 100, 60), 0.07) for _ in range(n + 1)])
    img = tones[row]
    grain = np.sin(X * rng.uniform(30, 60) + smooth_noise(rng, R, 4, 12) * 3 + row * 1.7)
    img = img * (1 + 0.07 * grain)[..., None]
    seam = (np.mod(Y * n, 1) < 0.06) | (np.mod(X * 1.3 + row * 0.37, 1) < 0.012)
    return np.where(seam[..., None], img * 0.55, img) + fine_noise(rng, R, 0.015)


def _grass(rng, X, Y):
    R = X.shape[0]
    base = jitter(rng, rgb(70, 140, 55), 0.05)
    blades = 0.07 * smooth_noise(rng, R, 5, 40) + 0.04 * smooth_noise(rng, R, 3, 3)
    img = base * (1 + blades + 0.15 * (Y - 0.5))[..., None]
    return img + fine_noise(rng, R, 0.04) * rgb(120, 255, 100)


def _kitchen(rng, X, Y):
    R = X.shape[0]
    h = 0.5 + rng.uniform(-0.06, 0.06)
    tile = jitter(rng, rgb(235, 232, 222), 0.05)
    k = rng.uniform(6, 10)
    grout = (np.mod(X * k, 1) < 0.07) | (np.mod(Y * k, 1) < 0.07)
    wall = np.where(grout[..., None], tile * 0.75, tile + np.zeros_like(X)[..., None])
    counter = jitter(rng, rgb(90, 90, 95), 0.08) * (1.1 - 0.35 * (Y - h))[..., None]
    return wall + (counter - wall) * step(Y, h, R)[..., None] + fine_noise(rng, R, 0.015)


def _night(rng, X, Y):
    R = X.shape[0]
    img = lerp(jitter(rng, rgb(8, 12, 40), 0.02), rgb(30, 40, 85), Y)
    stars = (rng.random((R, R), dtype=F32) > 0.992) & (Y < 0.7)
    mx, my = rng.uniform(0.1, 0.9), rng.uniform(0.08, 0.2)
    moon = np.clip((0.07 - np.hypot(X - mx, Y - my)) * R + 0.5, 0, 1)
    img = img + stars[..., None] * 0.7 + moon[..., None] * (rgb(245, 240, 200) - img)
    ground = rgb(15, 18, 25) + 0.02 * smooth_noise(rng, R, 4, 8)[..., None]
    return img + (ground - img) * step(Y, 0.72 + 0.02 * np.sin(X * 9), R)[..., None]


def _desert(rng, X, Y):
    R = X.shape[0]
    sky = lerp(jitter(rng, rgb(150, 190, 225), 0.04), rgb(245, 225, 180), Y / 0.4)
    dune1 = jitter(rng, rgb(220, 150, 80), 0.05)
    dune2 = dune1 * 0.85
    ph = rng.uniform(0, 6.3)
    e1 = 0.35 + 0.05 * np.sin(X * 6 + ph)
    e2 = 0.6 + 0.06 * np.sin(X * 4.5 + 2 * ph)
    img = sky + (dune1 * (1 - 0.2 * (Y - e1))[..., None] - sky) * step(Y, e1, R)[..., None]
    img = img + (dune2 - img) * step(Y, e2, R)[..., None]
    return img + 0.03 * np.sin(X * 80 + Y * 30)[..., None] * step(Y, e1, R)[..., None] + fine_noise(rng, R, 0.015)


def _brick_wall(rng, X, Y):
    R = X.shape[0]
    rows = int(rng.integers(7, 11))
    row = np.floor(Y * rows).astype(np.int32)
    xs = X * rows / 2.2 + 0.5 * (row % 2)
    col = np.floor(xs).astype(np.int32)
    tones = np.stack([jitter(rng, rgb(160, 70, 50), 0.07) for _ in range(64)])
    img = tones[(row * 7 + col * 13) % 64]
    mortar = (np.mod(Y * rows, 1) < 0.12) | (np.mod(xs, 1) < 0.05)
    return np.where(mortar[..., None], rgb(200, 195, 185), img) + fine_noise(rng, R, 0.03)


def _forest(rng, X, Y):
    R = X.shape[0]
    img = jitter(rng, rgb(35, 80, 40), 0.04) * (1 + 0.25 * smooth_noise(rng, R, 6, 6))[..., None]
    trunk = rgb(80, 55, 35)
    for _ in range(int(rng.integers(3, 6))):
        x0, w = rng.uniform(0, 1), rng.uniform(0.02, 0.06)
        img = img + (trunk * rng.uniform(0.7, 1.1) - img) * step(w - np.abs(X - x0), 0, R)[..., None]
    ground = jitter(rng, rgb(70, 50, 30), 0.04) * (1 + 0.15 * smooth_noise(rng, R, 6, 12))[..., None]
    return img + (ground - img) * step(Y, 0.7, R)[..., None] + fine_noise(rng, R, 0.02)


def _marble_table(rng, X, Y):
    R = X.shape[0]
    base = jitter(rng, rgb(228, 226, 222), 0.03)
    a, b = rng.uniform(2, 5), rng.uniform(1, 4)
    veins = np.abs(np.sin((X * a + Y * b) * 3.0 + smooth_noise(rng, R, 4, 4) * 1.5))
    img = base - (0.3 * np.clip(1 - veins / 0.08, 0, 1) + 0.04 * smooth_noise(rng, R, 6, 6))[..., None]
    return img + fine_noise(rng, R, 0.01)


def _underwater(rng, X, Y):
    R = X.shape[0]
    img = lerp(jitter(rng, rgb(60, 170, 190), 0.04), rgb(10, 50, 110), Y)
    n = smooth_noise(rng, R, 4, 4)
    caustic = np.clip(np.sin(X * 35 + n * 3) * np.sin(Y * 30 - n * 2), 0, 1) ** 3
    img = img + (0.18 * caustic * (1 - Y))[..., None]
    for _ in range(int(rng.integers(3, 7))):
        bx, by, br = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.01, 0.03)
        ring = np.clip(1 - np.abs(np.hypot(X - bx, Y - by) - br) * R, 0, 1)
        img = img + ring[..., None] * 0.35
    return img + fine_noise(rng, R, 0.015)


def _red_carpet(rng, X, Y):
    R = X.shape[0]
    base = jitter(rng, rgb(150, 25, 35), 0.05)
    k = rng.uniform(5, 8)
    diamond = (np.abs(np.mod(X * k, 1) - 0.5) + np.abs(np.mod(Y * k, 1) - 0.5)) < 0.22
    img = np.where(diamond[..., None], base * 0.7, base + np.zeros_like(X)[..., None])
    return img * (1 + 0.05 * smooth_noise(rng, R, 8, 8))[..., None] + fine_noise(rng, R, 0.03)


def _city(rng, X, Y):
    R = X.shape[0]
    img = lerp(jitter(rng, rgb(170, 180, 200), 0.04), rgb(215, 215, 220), Y / 0.6)
    x = 0.0
    while x < 1.0:  # a skyline of 4-8 blocks
        w, top = rng.uniform(0.12, 0.25), rng.uniform(0.1, 0.45)
        inside = (X >= x) & (X < x + w) & (Y > top)
        lit = (np.mod(X * 40, 1) < 0.45) & (np.mod(Y * 40, 1) < 0.5) & inside
        tone = jitter(rng, rgb(95, 100, 110), 0.08)
        img = np.where(inside[..., None], tone, img)
        img = np.where(lit[..., None], tone * 1.45, img)
        x += w
    street = rgb(60, 60, 65) + 0.02 * smooth_noise(rng, R, 4, 8)[..., None]
    return img + (street - img) * step(Y, 0.75, R)[..., None] + fine_noise(rng, R, 0.015)


# phrase -> (draw function, (lowest, highest) centre height of an object standing in it)
SCENES: dict[str, tuple[Callable, tuple[float, float]]] = {
    "on the beach": (_beach, (0.58, 0.72)),
    "in the snow": (_snow, (0.5, 0.7)),
    "on a wooden floor": (_wooden_floor, (0.42, 0.62)),
    "on the grass": (_grass, (0.42, 0.62)),
    "in a kitchen": (_kitchen, (0.55, 0.68)),
    "at night": (_night, (0.5, 0.64)),
    "in the desert": (_desert, (0.55, 0.7)),
    "in front of a brick wall": (_brick_wall, (0.45, 0.62)),
    "in the forest": (_forest, (0.55, 0.7)),
    "on a marble table": (_marble_table, (0.42, 0.62)),
    "underwater": (_underwater, (0.45, 0.62)),
    "on a red carpet": (_red_carpet, (0.42, 0.62)),
    "in the city": (_city, (0.58, 0.72)),
}
SCENE_NAMES: tuple[str, ...] = tuple(SCENES)


def draw_scene(name: str, rng: np.random.Generator, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    if name not in SCENES:
        raise ValueError(f"unknown scene {name!r}; known scenes: {', '.join(SCENE_NAMES)}")
    return SCENES[name][0](rng, X, Y).astype(F32, copy=False)
