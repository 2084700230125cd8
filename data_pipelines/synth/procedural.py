"""The procedural generator: synthetic subjects rendered in named scenes. No weights, CPU, fast.

A SUBJECT is a JSON-able dict (its identity): a shape family (the class named in captions, e.g.
"mug"), body/pattern/part colours, a pattern (stripes, dots, ...), shape parameters and an emblem.
A VIEW is what changes between the images of a set: scene, position, scale, rotation, mirror,
lighting. Captions name the class and the scene only ("a photo of a mug on the beach"), never the
colours or the pattern, so a model can only learn identity from the other images of the set.

Shapes are signed-distance fields evaluated on the whole pixel grid in the object's own frame
(u, v in about [-1, 1], v down), so the pattern rotates and scales with the subject, and edges are
antialiased from the distance (one-pixel ramp). Everything is deterministic from a seed.

Public API:
    sample_subject(rng, family=None) -> dict
    sample_view(rng, scene) -> dict
    render(subject, scene, rng, resolution=64, view=None) -> uint8 array (R, R, 3)
    render_subject(subject, scene, seed=0, resolution=64) -> uint8 array   (re-render a stored spec)
    make_set(seed, set_size=4, resolution=64, scenes=None) -> (images, captions, meta)
"""
from __future__ import annotations

import colorsys
import hashlib
import json
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from data_pipelines.synth.scenes import F32, SCENE_NAMES, SCENES, draw_scene

SPEC_VERSION = 1
PATTERNS = ("solid", "stripes", "dots", "checker", "two-tone", "rings", "zigzag")
EMBLEMS = ("none", "circle", "diamond", "triangle", "cross")
PATTERN_FREQ = (1.5, 4.0)  # pattern repeats per object unit, drawn uniformly
WINDOWED = True  # draw the subject only in its bounding window (False: whole frame; the same pixels)
CAPTION_TEMPLATES = ("a photo of a {cls} {scene}", "a {cls} {scene}", "a picture of a {cls} {scene}",
                     "a close-up photo of a {cls} {scene}", "a photo of the {cls} {scene}")


# -- signed distances (negative inside), in object units ----------------------------------------------
def _circle(u, v, cx, cy, r):
    return np.hypot(u - cx, v - cy) - r


def _box(u, v, cx, cy, a, b, r=0.0):
    qx, qy = np.abs(u - cx) - a + r, np.abs(v - cy) - b + r
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - r


def _ellipse(u, v, cx, cy, a, b):  # approximate, good enough near the edge
    return (np.hypot((u - cx) / a, (v - cy) / b) - 1) * min(a, b)


def _smin(a, b, k):  # smooth union: a bottle's shoulder, not a corner
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0, 1)
    return b + (a - b) * h - k * h * (1 - h)


# -- shape families: (u, v, params) -> (layers [(fill, sdf)], shading) -----------------------------
# fill: "body" (colour + pattern), "part" (accent colour), "dark"; shading: "sphere" | "cylinder" | "flat"
def _ball(u, v, p):
    body = _circle(u, v, 0, 0, 1.0)
    layers = [("body", body)]
    if p["band"]:
        layers.append(("part", np.maximum(body, np.abs(v - p["band_pos"]) - p["band_w"])))
    return layers, "sphere"


def _toy_block(u, v, p):
    body = _box(u, v, 0, 0, p["a"], p["b"], p["r"])
    layers = [("part", body), ("body", _box(u, v, 0, 0, p["a"] - p["border"], p["b"] - p["border"],
                                            max(p["r"] - p["border"], 0.0)))]
    return layers, "flat"


def _mug(u, v, p):
    a, b = p["a"], p["b"]
    handle = np.maximum(np.abs(_circle(u, v, a, 0.05, p["handle_r"])) - p["handle_t"], a - u)
    body = _box(u, v, 0, 0.05, a, b, 0.08)
    rim = _ellipse(u, v, 0, 0.05 - b, a, 0.12)
    inside = _ellipse(u, v, 0, 0.05 - b, a * 0.85, 0.08)
    return [("part" if p["part_handle"] else "body", handle), ("body", body), ("part", rim),
            ("dark", inside)], "cylinder"


def _vase(u, v, p):
    t = np.clip((v + 1) / 2, 0, 1)  # 0 at the top, 1 at the base
    belly = np.exp(-((t - p["belly_pos"]) / 0.3) ** 2)
    width = p["neck"] + (p["belly"] - p["neck"]) * belly
    body = np.maximum(np.abs(u) - width, np.abs(v) - 1.0) * 0.8
    lip = _box(u, v, 0, -0.97, p["neck"] + 0.08, 0.06, 0.03)
    return [("body", body), ("part", lip)], "cylinder"


def _donut(u, v, p):
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    ring = np.abs(rho - p["R"]) - p["t"]
    icing = np.abs(rho - p["R"]) - p["t"] * 0.75 - 0.06 * np.sin(phi * p["waves"])
    return [("body", ring), ("part", np.maximum(icing, ring))], "sphere"


def _star_toy(u, v, p):
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    a = p["amp"]
    radius = (1 + a * np.cos(p["points"] * phi + p["phase"])) / (1 + a)
    layers = [("body", (rho - radius) * 0.6)]
    if p["face"]:
        layers += [("dark", _circle(u, v, -0.15, -0.08, 0.07)), ("dark", _circle(u, v, 0.15, -0.08, 0.07))]
    return layers, "flat"


def _bottle(u, v, p):
    body = _box(u, v, 0, 0.3, p["a"], 0.68, 0.2)
    neck = _box(u, v, 0, -0.55, p["neck"], 0.35)
    layers = [("body", _smin(body, neck, 0.15)), ("part", _box(u, v, 0, -0.92, p["neck"] + 0.04, 0.1, 0.03))]
    if p["label"]:
        layers.append(("part", np.maximum(body, np.abs(v - 0.35) - 0.2)))
    return layers, "cylinder"


def _robot_toy(u, v, p):
    head = _box(u, v, 0, -0.5, p["head"], 0.3, 0.08)
    body = _box(u, v, 0, 0.38, 0.6, 0.5, 0.1)
    antenna = _box(u, v, 0, -0.92, 0.03, 0.12)
    layers = [("dark", antenna), ("part", _circle(u, v, 0, -1.05, 0.09)), ("body", head), ("body", body),
              ("dark", _circle(u, v, -0.17, -0.52, 0.08)), ("dark", _circle(u, v, 0.17, -0.52, 0.08)),
              ("part", _box(u, v, 0, 0.38, 0.3, 0.22, 0.05))]
    return layers, "flat"


def _sample_shape(family: str, rng: np.random.Generator) -> dict[str, Any]:
    U = lambda lo, hi: round(float(rng.uniform(lo, hi)), 4)
    B = lambda: bool(rng.random() < 0.5)
    return {
        "ball": lambda: {"band": B(), "band_pos": U(-0.25, 0.25), "band_w": U(0.08, 0.2)},
        "toy block": lambda: {"a": U(0.7, 0.95), "b": U(0.7, 0.95), "r": U(0.05, 0.3), "border": U(0.0, 0.16)},
        "mug": lambda: {"a": U(0.48, 0.62), "b": U(0.7, 0.85), "handle_r": U(0.28, 0.4), "handle_t": U(0.07, 0.12),
                            "part_handle": B()},
        "vase": lambda: {"belly": U(0.5, 0.85), "neck": U(0.18, 0.34), "belly_pos": U(0.4, 0.8)},
        "donut": lambda: {"R": U(0.58, 0.7), "t": U(0.24, 0.34), "waves": int(rng.integers(5, 12))},
        "star toy": lambda: {"points": int(rng.integers(4, 7)), "amp": U(0.22, 0.4), "phase": U(-0.3, 0.3), "face": B()},
        "bottle": lambda: {"a": U(0.38, 0.55), "neck": U(0.13, 0.22), "label": B()},
        "robot toy": lambda: {"head": U(0.35, 0.5)},
    }[family]()


# shape parameters that switch a part on or off (what the detail eval varies as "part layout")
PART_TOGGLES = {"ball": "band", "mug": "part_handle", "star toy": "face", "bottle": "label"}
EMBLEMLESS = ("robot toy",)  # families drawn without their emblem (its chest panel is there)

FAMILIES: dict[str, Callable] = {"ball": _ball, "toy block": _toy_block, "mug": _mug, "vase": _vase,
                                 "donut": _donut, "star toy": _star_toy, "bottle": _bottle,
                                 "robot toy": _robot_toy}
CLASSES: tuple[str, ...] = tuple(FAMILIES)


# -- identity ------------------------------------------------------------------------------------------
def _hsv(rng, h=None, s=(0.45, 0.95), v=(0.45, 0.95)) -> tuple[float, float, float]:
    return (rng.random() if h is None else h % 1.0, rng.uniform(*s), rng.uniform(*v))


def _to_rgb(hsv) -> list[int]:
    return [round(c * 255) for c in colorsys.hsv_to_rgb(*hsv)]


def sample_subject(rng: np.random.Generator, family: str | None = None) -> dict[str, Any]:
    """A random identity: everything needed to re-render it, as plain JSON types."""
    family = family or CLASSES[int(rng.integers(len(CLASSES)))]
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(CLASSES)}")
    body = _hsv(rng)
    # the pattern and part colours contrast with the body (hue shift or brightness flip)
    pattern = _hsv(rng, body[0] + rng.uniform(0.25, 0.75), v=(0.2, 0.45) if body[2] > 0.7 else (0.75, 1.0))
    part = _hsv(rng, body[0] + rng.uniform(0.15, 0.85))
    kind = PATTERNS[int(rng.integers(len(PATTERNS)))]
    return {
        "spec_version": SPEC_VERSION,
        "family": family,
        "colors": {"body": _to_rgb(body), "pattern": _to_rgb(pattern), "part": _to_rgb(part)},
        "pattern": {"kind": kind, "freq": round(float(rng.uniform(*PATTERN_FREQ)), 4),
                    "angle": round(float(rng.uniform(0, np.pi)), 4), "phase": round(float(rng.uniform(0, 1)), 4)},
        "shape": _sample_shape(family, rng),
        "emblem": {"kind": EMBLEMS[int(rng.integers(len(EMBLEMS)))], "size": round(float(rng.uniform(0.18, 0.3)), 4)},
    }


def subject_id(subject: dict[str, Any]) -> str:
    """Stable id of an identity (same spec -> same id, whatever seed drew it)."""
    return "proc-" + hashlib.sha1(json.dumps(subject, sort_keys=True).encode()).hexdigest()[:12]


def _pattern_mask(u, v, pat: dict, px: float) -> np.ndarray | None:
    kind, f, ang, ph = pat["kind"], pat["freq"], pat["angle"], pat["phase"]
    if kind == "solid":
        return None
    along = u * np.cos(ang) + v * np.sin(ang)
    if kind == "stripes":
        return np.clip(0.5 + np.sin(2 * np.pi * (f * along + ph)) / (4 * np.pi * f * px), 0, 1)
    if kind == "zigzag":
        across = -u * np.sin(ang) + v * np.cos(ang)
        tri = np.abs(np.mod(across * f * 1.5, 1) - 0.5) * 0.6
        return np.clip(0.5 + np.sin(2 * np.pi * (f * along + tri + ph)) / (4 * np.pi * f * px), 0, 1)
    if kind == "dots":
        fu, fv = np.mod(u * f * 1.3 + ph, 1) - 0.5, np.mod(v * f * 1.3 + ph, 1) - 0.5
        return np.clip(0.5 - (np.hypot(fu, fv) - 0.22) / (f * 1.3 * px), 0, 1)
    if kind == "checker":
        s = np.sin(np.pi * f * (u + ph)) * np.sin(np.pi * f * (v + ph))
        return np.clip(0.5 + s / (2 * np.pi * f * px), 0, 1)
    if kind == "two-tone":
        return np.clip(0.5 + (along - (ph - 0.5) * 0.6) / px, 0, 1)
    if kind == "rings":
        return np.clip(0.5 + np.sin(2 * np.pi * (f * 0.8 * np.hypot(u, v) + ph)) / (4 * np.pi * f * px), 0, 1)
    raise ValueError(f"unknown pattern {kind!r}; known: {', '.join(PATTERNS)}")


def _emblem_sdf(u, v, emb: dict, family: str):
    kind, s = emb["kind"], emb["size"]
    cy = {"robot toy": 0.38, "bottle": 0.35, "mug": 0.1, "vase": 0.3, "donut": -0.65}.get(family, 0.0)
    if kind == "none" or family in EMBLEMLESS:
        return None
    if kind == "circle":
        return _circle(u, v, 0, cy, s)
    if kind == "diamond":
        return (np.abs(u) + np.abs(v - cy) - s) * 0.7
    if kind == "triangle":
        return np.maximum(v - cy - s * 0.6, (np.abs(u) * 1.7 - (v - cy) - s * 0.9) * 0.5)
    if kind == "cross":
        return np.minimum(_box(u, v, 0, cy, s, s * 0.3), _box(u, v, 0, cy, s * 0.3, s))
    raise ValueError(f"unknown emblem {kind!r}; known: {', '.join(EMBLEMS)}")


# -- views -------------------------------------------------------------------------------------------
# How subjects sit in the frame. "varied": small to medium, anywhere on the scene's ground; "centered":
# larger and near the centre (a simpler world for tiny models: more subject pixels, and where the subject
# is matters less than what it looks like). Both draw the same random numbers, so a seed picks the same
# scene texture, lighting and mirror in either.
LAYOUTS: dict[str, dict[str, Any]] = {
    "varied": {"scale": (0.22, 0.33), "jitter": 1.0, "angle_sd": 0.22},
    "centered": {"scale": (0.30, 0.38), "jitter": 0.35, "angle_sd": 0.15},
}


def sample_view(rng: np.random.Generator, scene: str, layout: str = "varied") -> dict[str, float]:
    """Pose and lighting of one image: centre (cx, cy), half-size `scale`, rotation, mirror, light."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    lay = LAYOUTS[layout]
    scale = float(rng.uniform(*lay["scale"]))
    lo, hi = SCENES[scene][1]
    margin = 0.5 - scale - 0.04
    mid = (lo + hi) / 2
    return {"cx": 0.5 + float(rng.uniform(-1, 1)) * margin * 0.8 * lay["jitter"],
                "cy": float(np.clip(mid + (rng.uniform(lo, hi) - mid) * lay["jitter"] if lay["jitter"] != 1.0
                                    else rng.uniform(lo, hi), scale + 0.06, 1 - scale - 0.02)),
                "scale": scale, "angle": float(np.clip(rng.normal(0, lay["angle_sd"]), -0.55, 0.55)),
                "mirror": bool(rng.random() < 0.5),
                "light": float(rng.uniform(0, 2 * np.pi)), "light_z": float(rng.uniform(0.55, 0.9)),
                "brightness": float(rng.uniform(0.82, 1.12)), "warmth": float(rng.uniform(-1, 1))}


@lru_cache(maxsize=8)
def _grid(res: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(res, dtype=F32) + 0.5) / res
    Y, X = np.meshgrid(c, c, indexing="ij")
    Y.flags.writeable = X.flags.writeable = False
    return X, Y


def _normals(kind: str, u, v, p: dict):
    if kind == "sphere":
        return u, v, np.sqrt(np.clip(1 - u * u - v * v, 0.05, 1))
    if kind == "cylinder":
        w = max(p.get("a", p.get("belly", 0.6)), 0.3)
        nx = np.clip(u / w, -1, 1)
        return nx, np.zeros_like(u), np.sqrt(np.clip(1 - nx * nx, 0.05, 1))
    return 0.25 * u, 0.25 * v, np.full_like(u, 0.95)


def _draw_subject(subject: dict[str, Any], view: dict[str, float], img: np.ndarray, X: np.ndarray, Y: np.ndarray,
                  px: float, lx: float, ly: float) -> tuple[np.ndarray, np.ndarray]:
    """Contact shadow + the subject's layers over `img` (a window of the image; X, Y its pixel centres).
    `px` is one pixel in object units: the antialiasing ramp. Returns (img, subject coverage in [0, 1])."""
    s, th = view["scale"], view["angle"]
    # contact shadow on the ground, offset away from the light
    sh = _ellipse(X, Y, view["cx"] - 0.25 * s * lx, view["cy"] + 0.92 * s, 0.85 * s, 0.18 * s)
    img = img * (1 - 0.4 * np.clip(-sh / (0.12 * s), 0, 1))[..., None]

    dx, dy = X - view["cx"], Y - view["cy"]
    c, sn = float(np.cos(th)), float(np.sin(th))  # Python floats keep the arrays float32
    u = (c * dx + sn * dy) / s
    v = (-sn * dx + c * dy) / s
    if view["mirror"]:
        u = -u
    family, p = subject["family"], subject["shape"]
    layers, shading = FAMILIES[family](u, v, p)
    emb = _emblem_sdf(u, v, subject["emblem"], family)
    if emb is not None:
        body = next(d for fill, d in layers if fill == "body")
        layers.append(("part", np.maximum(emb, body)))

    cols = {k: np.asarray(c, F32) / 255 for k, c in subject["colors"].items()}
    mask = _pattern_mask(u, v, subject["pattern"], px)
    body_col = cols["body"] + (0 * u)[..., None] if mask is None else \
        cols["body"] + (cols["pattern"] - cols["body"]) * mask[..., None]

    # Lambert + a little specular, with the light brought into the object's frame
    ca, sa = c, sn
    olx, oly = ca * lx + sa * ly, -sa * lx + ca * ly
    if view["mirror"]:
        olx = -olx
    lz = view["light_z"]
    norm = float(np.sqrt(olx * olx + oly * oly + lz * lz))
    nx, ny, nz = _normals(shading, u, v, p)
    ndl = np.clip((nx * olx + ny * oly + nz * lz) / norm, 0, 1)
    shade = (0.55 + 0.55 * ndl)[..., None]
    spec = (0.35 * ndl ** 24)[..., None] if shading != "flat" else 0.0

    fills = {"body": body_col, "part": cols["part"], "dark": np.asarray([0.08, 0.08, 0.1], F32)}
    lit: dict[str, np.ndarray] = {}  # shaded colour per fill, computed once
    coverage = np.zeros(img.shape[:2], F32)
    for fill, d in layers:
        if fill not in lit:
            lit[fill] = fills[fill] * shade + spec
        alpha = np.clip(0.5 - d / px, 0, 1)[..., None]
        step = lit[fill] - img
        step *= alpha
        img += step  # in place: same arithmetic as img + (colour - img) * alpha, fewer temporaries
        np.maximum(coverage, alpha[..., 0], out=coverage)
    return img, coverage


def render(subject: dict[str, Any], scene: str, rng: np.random.Generator, resolution: int = 64,
           view: dict[str, float] | None = None, with_mask: bool = False, layout: str = "varied"):
    """One image of `subject` in `scene` as uint8 (R, R, 3). `view` (from sample_view) fixes the pose;
    otherwise it is drawn from rng first, then the scene texture. with_mask: returns (image, mask), the
    mask uint8 (R, R), 255 where the subject covers the pixel (antialiased edges in between)."""
    if scene not in SCENES:
        raise ValueError(f"unknown scene {scene!r}; known scenes: {', '.join(SCENE_NAMES)}")
    view = view or sample_view(rng, scene, layout)
    X, Y = _grid(resolution)
    img = draw_scene(scene, rng, X, Y)
    s, th = view["scale"], view["angle"]
    # Subject and shadow lie within 1.2 object units of the centre (rotated: up to x(|cos|+|sin|)); every
    # pixel farther out gets alpha 0 and shadow factor 1, so only this window is computed (same pixels).
    reach = 1.25 * s * (abs(np.cos(th)) + abs(np.sin(th))) + 3.0 / resolution
    x0, x1 = (min(max(int(np.floor((view["cx"] + k * reach) * resolution)), 0), resolution) for k in (-1, 1))
    y0, y1 = (min(max(int(np.floor((view["cy"] + k * reach) * resolution)), 0), resolution) for k in (-1, 1))
    x1, y1 = min(x1 + 1, resolution), min(y1 + 1, resolution)
    if not WINDOWED:
        x0, y0, x1, y1 = 0, 0, resolution, resolution
    lx, ly = float(np.cos(view["light"])), float(np.sin(view["light"]))
    mask = np.zeros((resolution, resolution), F32)
    if x0 < x1 and y0 < y1:
        img[y0:y1, x0:x1], mask[y0:y1, x0:x1] = _draw_subject(
            subject, view, img[y0:y1, x0:x1], X[y0:y1, x0:x1], Y[y0:y1, x0:x1], 1.0 / (resolution * s), lx, ly)

    # global light: brightness, warm/cool tint, a soft gradient from the light's side
    tint = 1 + 0.06 * view["warmth"] * np.asarray([1, 0, -1], F32)
    grad = 1 + 0.12 * ((X - 0.5) * lx + (Y - 0.5) * ly)
    img = img * (view["brightness"] * tint) * grad[..., None]
    img = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return (img, (mask * 255 + 0.5).astype(np.uint8)) if with_mask else img


def render_subject(subject: dict[str, Any], scene: str, seed: int = 0, resolution: int = 64,
                   with_mask: bool = False, layout: str = "varied"):
    """Re-render a stored subject spec (a set's json `subject`) in any scene: evaluation ground truth.
    With a set's per-image `views[i].seed` and scene it reproduces image i exactly (with_mask: and
    returns its subject mask too, see render)."""
    return render(subject, scene, np.random.default_rng(seed), resolution, with_mask=with_mask, layout=layout)


def caption_for(cls: str, scene: str, rng: np.random.Generator) -> str:
    return CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(cls=cls, scene=scene)


def set_seed(base_seed: int, index: int) -> int:
    """The seed of set `index` of a run: independent of how the run is split into shards or workers."""
    return int(np.random.SeedSequence([int(base_seed), int(index)]).generate_state(1, np.uint64)[0] >> 1)


def make_set(seed: int, set_size: int = 4, resolution: int = 64, scenes: Sequence[str] | None = None,
             subject: dict[str, Any] | None = None, classes: Sequence[str] | None = None,
             with_masks: bool = False, layout: str = "varied"):
    """One set: the same subject in `set_size` different scenes (distinct while there are enough).
    `scenes` / `classes` restrict the scenes and shape families drawn from (default: all).

    Returns (images uint8 (R, R, 3), captions, meta); meta holds subject_id, class, scenes, subject
    (the spec) and views (per-image scene + seed, for exact re-rendering with render_subject).
    with_masks: (images, captions, meta, masks), masks uint8 (R, R) per image (see render).
    """
    rng = np.random.default_rng(seed)
    if subject is None:
        subject = sample_subject(rng, classes[int(rng.integers(len(classes)))] if classes else None)
    names = list(scenes or SCENE_NAMES)
    replace = set_size > len(names)
    picked = [names[i] for i in rng.choice(len(names), size=set_size, replace=replace)]
    view_seeds = [int(x) for x in rng.integers(0, 2**62, size=set_size)]
    rendered = [render_subject(subject, sc, vs, resolution, with_mask=True, layout=layout)
                for sc, vs in zip(picked, view_seeds)]
    images, masks = [r[0] for r in rendered], [r[1] for r in rendered]
    cls = subject["family"]
    captions = [caption_for(cls, sc, rng) for sc in picked]
    meta = {"subject_id": subject_id(subject), "class": cls, "scenes": picked, "generator": "procedural",
            "seed": int(seed), "subject": subject,
            "views": [{"scene": sc, "seed": vs} for sc, vs in zip(picked, view_seeds)], "layout": layout}
    return (images, captions, meta, masks) if with_masks else (images, captions, meta)
