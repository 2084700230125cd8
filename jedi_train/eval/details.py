"""Details captions never name (pattern kind, frequency band, emblem, part layout) and sharpness.

Colour identity (procedural.py) cannot tell a checkered block from a plain one of the same colours.
Detail accuracy asks, per attribute the generator controls: among the true subject and k-1 variants
that share its class, colours and every other parameter and differ only in that attribute, which one
is this image? The variants are rendered in the image's scene in CALIB random poses (the same poses and
backgrounds for every variant, so only the attribute differs); a nearest-centroid rule on features of
the image's foreground (the scene model's estimate, as for colour identity) in the subject's own colour
axes decides: texture alone for pattern kind and frequency, texture and colour layout for emblem and
parts. Its
accuracy on further ground-truth renders of every variant (HOLDOUT poses each) is the ceiling; 1/k is
chance; detail gap closed = (acc - chance) / (ceiling - chance), a ratio of means over subjects.
Attributes a subject does not have (a frequency for solid / two-tone, an emblem on a robot, a part
toggle on a vase) are not scored for it.

Sharpness: high-frequency energy (luminance minus its Gaussian blur, squared) over the subject region
(the foreground estimate, dilated to include the outline), divided by the same over ground-truth
renders in the scene: 1.0 = as sharp as the renders, a blurry sample lower.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from data_pipelines.synth import procedural
from data_pipelines.synth.scenes import SCENE_NAMES

CALIB = 8  # calibration renders per variant
HOLDOUT = 2  # ground-truth renders per variant the ceiling is measured on
SHARP_SIGMA = 1.0  # px: what the high-pass removes
FREQ_BANDS = 3  # the generator's frequency range, cut in equal bands
FREQ_RANGE = procedural.PATTERN_FREQ
FREQ_KINDS = ("stripes", "dots", "checker", "rings", "zigzag")  # the kinds whose frequency shows
ORIENT_BINS = 4  # gradient orientations, folded to [0, pi/2] (mirror-invariant)
SPECTRAL_BANDS = 5  # radial frequency bands from 0.05 to 0.5 cycles/px
ATTRIBUTES = ("pattern", "frequency", "emblem", "parts")


def _with(spec: dict, path: tuple[str, str], value) -> dict:
    return {**spec, path[0]: {**spec[path[0]], path[1]: value}}


def freq_band(freq: float) -> int:
    lo, hi = FREQ_RANGE
    return int(np.clip((freq - lo) / (hi - lo) * FREQ_BANDS, 0, FREQ_BANDS - 1))


def variants(spec: dict, attribute: str) -> list[dict] | None:
    """The true spec first, then one variant per other value of `attribute`; None when the subject has
    no such attribute. Frequency: the same offset inside every band, so the candidates are evenly spaced."""
    if attribute == "pattern":
        return [spec] + [_with(spec, ("pattern", "kind"), k) for k in procedural.PATTERNS if k != spec["pattern"]["kind"]]
    if attribute == "frequency":
        if spec["pattern"]["kind"] not in FREQ_KINDS:
            return None
        f, width = spec["pattern"]["freq"], (FREQ_RANGE[1] - FREQ_RANGE[0]) / FREQ_BANDS
        b = freq_band(f)
        return [spec] + [_with(spec, ("pattern", "freq"), round(f + (o - b) * width, 4))
                         for o in range(FREQ_BANDS) if o != b]
    if attribute == "emblem":
        if spec["family"] in procedural.EMBLEMLESS:
            return None
        return [spec] + [_with(spec, ("emblem", "kind"), k) for k in procedural.EMBLEMS if k != spec["emblem"]["kind"]]
    if attribute == "parts":
        flag = procedural.PART_TOGGLES.get(spec["family"])
        return None if flag is None else [spec, _with(spec, ("shape", flag), not spec["shape"][flag])]
    raise ValueError(f"unknown attribute {attribute!r}; known: {', '.join(ATTRIBUTES)}")


# -- features ---------------------------------------------------------------------------------------
def _axis_map(img: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per pixel: where its colour lies on the segment from colour a (0) to colour b (1)."""
    d = b - a
    return ((img - a) @ d) / max(float(d @ d), 1e-6)


@functools.lru_cache(maxsize=4)
def _geometry(res: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel rows / columns, and each FFT frequency's band (SPECTRAL_BANDS = out of range)."""
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32)
    fy, fx = np.meshgrid(np.fft.fftfreq(res), np.fft.fftfreq(res), indexing="ij")
    band = np.digitize(np.hypot(fy, fx), np.linspace(0.05, 0.5, SPECTRAL_BANDS + 1)) - 1
    band[(band < 0) | (band >= SPECTRAL_BANDS)] = SPECTRAL_BANDS
    return yy, xx, band.ravel()


def features(image: np.ndarray, fg: np.ndarray, spec: dict) -> np.ndarray:
    """Texture and layout of the image's foreground, relative to the subject's own colours (which every
    variant shares): colour coverage, gradient orientation and frequency content of the body->pattern
    and body->part maps, and where on the subject those colours sit."""
    res = image.shape[0]
    img = image.astype(np.float32) / 255
    w = fg.reshape(res, res).astype(np.float32)
    area = float(w.sum()) + 1e-6
    cols = {k: np.asarray(v, np.float32) / 255 for k, v in spec["colors"].items()}
    maps = [np.clip(_axis_map(img, cols["body"], cols[k]), -0.5, 1.5) for k in ("pattern", "part")]
    core = ndimage.minimum_filter(w, size=3)  # inside the subject: the outline's gradient is not texture
    yy, xx, band = _geometry(res)
    cy, cx = float((w * yy).sum() / area), float((w * xx).sum() / area)
    rad = np.sqrt(area / np.pi) + 1e-6
    ny, nx = (yy - cy) / rad, np.abs(xx - cx) / rad  # mirror-symmetric: poses mirror
    cell = (np.digitize(ny, [-0.35, 0.35]) + 3 * (nx >= 0.4)).ravel()  # 3 rows x (centre, sides)
    cell_w = np.bincount(cell, weights=w.ravel(), minlength=6)
    layout, texture = [], []
    for m in maps:
        mean = float((w * m).sum() / area)
        cell_m = np.bincount(cell, weights=(w * m).ravel(), minlength=6)
        layout += [mean] + list(np.where(cell_w > 0.5, cell_m / np.maximum(cell_w, 1e-6), mean))
        texture.append(float((w * (m - mean) ** 2).sum() / area))
        gy, gx = np.gradient(m)
        mag, ang = np.hypot(gx, gy) * core, np.mod(np.arctan2(gy, gx), np.pi)
        fold = np.minimum(ang, np.pi - ang)  # mirror-invariant orientation in [0, pi/2]
        hist = np.bincount(np.minimum((fold / np.pi * 2 * ORIENT_BINS).astype(int), ORIENT_BINS - 1).ravel(),
                           weights=mag.ravel(), minlength=ORIENT_BINS)
        total = float(mag.sum()) + 1e-6
        coherence = abs(complex((mag * np.cos(2 * ang)).sum(), (mag * np.sin(2 * ang)).sum())) / total
        texture += list(hist / area) + [total / area, coherence]
        power = np.abs(np.fft.fft2((m - mean) * w)) ** 2
        texture += list(np.bincount(band, weights=power.ravel(), minlength=SPECTRAL_BANDS + 1)[:SPECTRAL_BANDS] / area)
    return np.asarray(layout + texture, np.float64)


LAYOUT_FEATURES = 2 * 7  # features() = where the colours sit (2 maps x (mean, 6 cells)), then texture
# Pattern kind and frequency are judged on texture alone: a blur keeps how much of the subject has the
# pattern colour, and that alone would name solid vs dots vs stripes half the time (a blurred ground
# truth scored 0.47 with it, 0.31 without; chance 0.14). Emblem and parts are where colours sit.
TEXTURE_ONLY = ("pattern", "frequency")


def feature_slice(attribute: str) -> slice:
    return slice(LAYOUT_FEATURES, None) if attribute in TEXTURE_ONLY else slice(None)


class CachedForeground:
    """A scene's foreground estimate memoised per colour quantised to 6 bits a channel (at most 0.01 off
    per channel, a tenth of the background tolerance): calibration scores ~170 renders per scene, and
    the nearest-palette query is most of its cost."""

    def __init__(self, foreground):
        self.foreground = foreground
        self.lut = np.full(64 ** 3, 255, np.uint8)  # weight x 254; 255 = not computed yet

    def __call__(self, image: np.ndarray) -> np.ndarray:
        q = image.reshape(-1, 3).astype(np.int32) >> 2
        keys = (q[:, 0] << 12) | (q[:, 1] << 6) | q[:, 2]
        missing = np.unique(keys[self.lut[keys] == 255])
        if len(missing):
            colours = (np.stack([missing >> 12, (missing >> 6) & 63, missing & 63], 1) << 2) + 2
            self.lut[missing] = np.round(self.foreground(colours.astype(np.uint8)[:, None, :]) * 254)
        return self.lut[keys].astype(np.float32) / 254


class NearestCentroid:
    """Per-feature standardised (pooled within-variant spread) nearest centroid."""

    def __init__(self, feats: np.ndarray, labels: np.ndarray):
        classes = np.unique(labels)
        self.centroids = np.stack([feats[labels == c].mean(0) for c in classes])
        within = np.concatenate([feats[labels == c] - self.centroids[i] for i, c in enumerate(classes)])
        spread = within.std(0)
        self.scale = 1 / (spread + 0.05 * feats.std(0) + 1e-6)

    def distances(self, feats: np.ndarray) -> np.ndarray:
        return (((feats[:, None, :] - self.centroids[None]) * self.scale) ** 2).sum(-1)

    def predict(self, feats: np.ndarray) -> np.ndarray:
        return self.distances(feats).argmin(1)

    def credit(self, feats: np.ndarray, label: int) -> np.ndarray:
        """1 where `label` is nearest, 1/n where it ties with n-1 others (argmin would always give the
        tie to the first label: the true subject's), else 0."""
        d = self.distances(feats)
        tied = d <= d.min(1, keepdims=True) * (1 + 1e-9) + 1e-12
        return tied[:, label] / tied.sum(1)


# -- sharpness --------------------------------------------------------------------------------------
def hf_energy(image: np.ndarray, fg: np.ndarray) -> float:
    """Mean squared high-pass luminance over the subject region (foreground dilated by 1 px)."""
    res = image.shape[0]
    lum = image.astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32) / 255
    hp = lum - ndimage.gaussian_filter(lum, SHARP_SIGMA, mode="nearest")
    region = ndimage.grey_dilation(fg.reshape(res, res), size=3)
    return float((region * hp ** 2).sum() / max(float(region.sum()), 1e-6))


def blur(image: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """The sharpness oracle: a ground-truth render blurred (per channel, Gaussian, px)."""
    out = ndimage.gaussian_filter(image.astype(np.float32), (sigma, sigma, 0), mode="nearest")
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# -- per (subject, scene) ---------------------------------------------------------------------------
@dataclass
class DetailTruth:
    spec: dict
    classifiers: dict  # attribute -> (NearestCentroid, k)
    ceiling: dict  # attribute -> accuracy on held-out ground-truth renders of every variant
    other: dict  # attribute -> a render of a variant (other value of the attribute): the ~0% oracle
    sharp_ref: float  # high-frequency energy of ground-truth renders in the scene
    foreground: CachedForeground  # the scene's estimate, the same for calibration and scoring


def build_details(spec: dict, scene: str, base_seed: int, resolution: int, layout: str, foreground) -> DetailTruth:
    """Calibrate every attribute's classifier for one subject in one scene. `foreground` is the scene's
    estimator (procedural.SceneModel.foreground). Render k of every variant of every attribute has seed
    base_seed + k: the same pose and background, so the true subject's renders are shared."""
    foreground = CachedForeground(foreground)
    classifiers, ceiling, other = {}, {}, {}
    true_renders: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # k -> (image, features)
    for attribute in ATTRIBUTES:
        cands = variants(spec, attribute)
        if cands is None:
            continue
        feats, labels, test, tlabels = [], [], [], []
        for v, cand in enumerate(cands):
            for k in range(CALIB + HOLDOUT):
                if v == 0 and k in true_renders:
                    f = true_renders[k][1]
                else:
                    img = procedural.render_subject(cand, scene, base_seed + k, resolution, layout=layout)
                    f = features(img, foreground(img), spec)
                    if v == 0:
                        true_renders[k] = (img, f)
                    if v == 1 and k == CALIB:
                        other[attribute] = img
                (feats if k < CALIB else test).append(f)
                (labels if k < CALIB else tlabels).append(v)
        cols = feature_slice(attribute)
        clf = NearestCentroid(np.stack(feats)[:, cols], np.asarray(labels))
        classifiers[attribute] = (clf, len(cands))
        ceiling[attribute] = float(np.mean(clf.predict(np.stack(test)[:, cols]) == np.asarray(tlabels)))
    sharp_ref = float(np.mean([hf_energy(img, foreground(img)) for img, _ in true_renders.values()]))
    return DetailTruth(spec, classifiers, ceiling, other, sharp_ref, foreground)


def score_details(image: np.ndarray, truth: DetailTruth, images: dict | None = None) -> dict:
    """Per-image columns: detail_<attr> (1 if the true variant is chosen, None when the subject lacks
    the attribute), <attr>_ceiling, <attr>_k; sharp_hf, sharp_ref (the image's and ground truth's
    high-frequency energy) and their ratio, sharpness. `images` (attribute -> image): score another
    image per attribute (the other-detail oracle)."""
    row = {}
    fg = truth.foreground
    for attribute in ATTRIBUTES:
        if attribute not in truth.classifiers:  # blank, not absent: every row has the same columns
            row.update({f"detail_{attribute}": None, f"{attribute}_ceiling": None, f"{attribute}_k": None})
            continue
        clf, k = truth.classifiers[attribute]
        img = image if images is None else images[attribute]
        row[f"detail_{attribute}"] = float(clf.credit(features(img, fg(img), truth.spec)[None, feature_slice(attribute)], 0)[0])
        row[f"{attribute}_ceiling"] = truth.ceiling[attribute]
        row[f"{attribute}_k"] = k
    hf = hf_energy(image, fg(image))
    row.update(sharp_hf=hf, sharp_ref=truth.sharp_ref, sharpness=hf / max(truth.sharp_ref, 1e-12))
    return row


def build_for_cases(cases, truths: dict, resolution: int, tqdm) -> dict:
    """{(subject, scene): DetailTruth} for procedural.py's cases and their colour Truths (whose scene
    model and oracle images it reuses; it adds the other_detail and blurred oracles to them)."""
    out = {}
    for c in tqdm(cases, desc="detail classifiers", leave=False):
        for sc in c.target_scenes:
            t = truths[(c.index, sc)]
            dt = build_details(c.spec, sc, c.gt_seed + 1000 * SCENE_NAMES.index(sc) + 10**6, resolution, c.layout,
                               t.scene.foreground)
            t.oracle.update(other_detail=dt.other["pattern"], blurred=blur(t.oracle["ground_truth"]))
            out[(c.index, sc)] = dt
    return out


def columns(image: np.ndarray, truth: DetailTruth | None, oracle: str) -> dict:
    """score_details, or nothing without a DetailTruth (--details off); the other_detail oracle scores
    each attribute on its own variant's render."""
    if truth is None:
        return {}
    return score_details(image, truth, truth.other if oracle == "other_detail" else None)


# -- per cell ---------------------------------------------------------------------------------------
def chance(k: int) -> float:
    return 1.0 / k


def detail_gap(rows: np.ndarray, k: int) -> float:
    """rows (n, 2): accuracy, ceiling per subject -> (acc - 1/k) / (ceiling - 1/k), a ratio of means."""
    acc, ceil = rows.mean(0)
    return float((acc - chance(k)) / (ceil - chance(k))) if ceil - chance(k) > 1e-9 else float("nan")


def sharpness_ratio(rows: np.ndarray) -> float:
    """rows (n, 2): high-frequency energy of the images, of ground truth, per subject -> ratio of means."""
    hf, ref = rows.mean(0)
    return float(hf / ref) if ref > 0 else float("nan")


def summarize_cell(sel: list[dict], seed: int, bootstrap_ci) -> dict:
    """The detail and sharpness figures of one table cell from its per-image rows (each with a
    `subject`), CIs by `bootstrap_ci` over subjects."""
    out: dict = {}
    subjects = sorted({x["subject"] for x in sel})
    if not sel or "sharp_hf" not in sel[0]:  # --details off
        return {}
    for a in ATTRIBUTES:
        col = f"detail_{a}"
        per = [[x for x in sel if x["subject"] == s and x.get(col) is not None] for s in subjects]
        per = [p for p in per if p]
        if not per:
            continue
        k = int(per[0][0][f"{a}_k"])
        rows = np.array([[np.mean([x[col] for x in p]), np.mean([x[f"{a}_ceiling"] for x in p])] for p in per])
        out[a] = {"acc": float(rows[:, 0].mean()), "acc_ci": list(bootstrap_ci(rows[:, 0], seed=seed)),
                  "ceiling": float(rows[:, 1].mean()), "chance": chance(k), "k": k,
                  "gap_closed": detail_gap(rows, k),
                  "gap_closed_ci": list(bootstrap_ci(rows, functools.partial(detail_gap, k=k), seed=seed)),
                  "n_subjects": len(per)}
    sharp = np.array([np.mean([[x["sharp_hf"], x["sharp_ref"]] for x in sel if x["subject"] == s], axis=0)
                      for s in subjects])
    flat = {f"{a}_{k}": d[k] for a, d in out.items() for k in ("acc", "gap_closed")}  # table columns
    return {"details": out, **flat, "sharpness": sharpness_ratio(sharp),
            "sharpness_ci": list(bootstrap_ci(sharp, sharpness_ratio, seed=seed))}


def table_markdown(rows: list[dict]) -> list[str]:
    """Markdown lines: one row per cell, accuracy and gap closed per attribute, sharpness."""
    present = [a for a in ATTRIBUTES if any(a in r.get("details", {}) for r in rows)]
    if not rows or not present:
        return []
    first = next(r["details"] for r in rows if r.get("details"))
    head = " | ".join(f"{a} acc (ceiling {first[a]['ceiling']:.2f}, chance {first[a]['chance']:.2f}): gap closed"
                      if a in first else a for a in present)
    lines = [f"| refs | image guidance | {head} | sharpness (95% CI) |",
             "|---|---|" + "---|" * len(present) + "---|"]
    for r in rows:
        cells = []
        for a in present:
            d = r["details"].get(a)
            cells.append("-" if d is None else f"{d['acc']:.2f}: {100 * d['gap_closed']:.0f}% "
                         f"({100 * d['gap_closed_ci'][0]:.0f}, {100 * d['gap_closed_ci'][1]:.0f})")
        lo, hi = r["sharpness_ci"]
        lines.append(f"| {r['refs']} | {r['image_guidance']:g} | " + " | ".join(cells)
                     + f" | {r['sharpness']:.2f} ({lo:.2f}, {hi:.2f}) |")
    n = {a: first[a]["n_subjects"] for a in present if a in first}
    lines += ["", "Detail accuracy: the true subject among variants sharing its class and colours that differ in "
              "one attribute, rendered in the image's scene (nearest centroid calibrated on ground-truth renders; "
              "ceiling: its accuracy on further ground-truth renders; chance 1/k). Gap closed = (acc - chance) / "
              "(ceiling - chance); subjects per attribute: " + ", ".join(f"{a} {v}" for a, v in n.items())
              + ". Sharpness: high-frequency energy of the subject region / ground truth's (1 = as sharp).", ""]
    return lines


def summary_line(row: dict) -> str:
    """One line of a table row's detail figures (the demo's summary)."""
    parts = []
    for a in ATTRIBUTES:
        d = row.get("details", {}).get(a)
        if d is not None:
            lo, hi = d["gap_closed_ci"]
            parts.append(f"{a} {100 * d['gap_closed']:+.0f}% ({100 * lo:+.0f} .. {100 * hi:+.0f}; acc {d['acc']:.2f}, "
                         f"ceiling {d['ceiling']:.2f}, chance {d['chance']:.2f})")
    lo, hi = row["sharpness_ci"]
    return "detail gap closed " + ", ".join(parts) + f"; sharpness {row['sharpness']:.2f} ({lo:.2f} .. {hi:.2f})"


def image_set_sharpness(generated, real) -> float | None:
    """Whole-image high-frequency energy of `generated` over that of `real` (lists of PIL images or
    uint8 arrays, any sizes): the training grids' cheap sharpness, with no subject masks or specs
    (scene texture counts too). None without real energy."""
    def energy(images) -> float:
        arrs = [np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images]
        return float(sum(hf_energy(a, np.ones(a.shape[0] * a.shape[1])) for a in arrs))
    real_e = energy(real)
    return energy(generated) / real_e if real_e > 0 and len(generated) else None
