"""Subject masks: rendered with the subject, written into shards, streamed aligned with their image."""
import numpy as np
import torch
import webdataset as wds

from data_pipelines.schema import encode_set, validate_sample
from data_pipelines.sets import SetOptions, collate_sets, load_set
from data_pipelines.skips import Counts
from data_pipelines.synth import procedural as P
from data_pipelines.synth.scenes import SCENE_NAMES


def test_mask_covers_exactly_the_subject():
    spec = P.sample_subject(np.random.default_rng(3))
    img, mask = P.render_subject(spec, SCENE_NAMES[0], seed=5, resolution=48, with_mask=True)
    assert np.array_equal(img, P.render_subject(spec, SCENE_NAMES[0], seed=5, resolution=48))  # same pixels
    assert mask.shape == (48, 48) and mask.dtype == np.uint8 and 0.03 < (mask > 127).mean() < 0.5
    # swapping the subject's colours changes the image inside the mask only (the shadow aside)
    other = {**spec, "colors": {k: [255 - c for c in v] for k, v in spec["colors"].items()}}
    img2 = P.render_subject(other, SCENE_NAMES[0], seed=5, resolution=48)
    changed = np.abs(img.astype(int) - img2).sum(-1) > 0
    assert changed[mask == 255].mean() > 0.9 and not changed[mask == 0].any()


def test_masks_travel_through_shards_and_crops(tmp_path):
    _images, caps, meta, masks = P.make_set(7, set_size=3, resolution=48, with_masks=True)
    # paint each image white where its mask is on: after resize + random crop the two must still agree
    painted = [np.where(m[..., None] > 127, 255, 0).astype(np.uint8).repeat(3, 2) for m in masks]
    sample = encode_set("s-0", painted, caps, meta, ext="png", masks=masks)
    assert validate_sample(sample) is None
    assert validate_sample({k: v for k, v in sample.items() if k != "1.mask.png"}) == "missing_mask"
    with wds.TarWriter(str(tmp_path / "a.tar")) as w:
        w.write(sample)
    raw = next(iter(wds.WebDataset(str(tmp_path / "a.tar"), shardshuffle=False)))
    opt = SetOptions(resolution=32, min_set=3, max_set=3, crop="random", flip_prob=0.5)
    for seed in range(4):
        s = load_set(raw, opt, np.random.default_rng(seed), Counts())
        for img, m in zip(s["images"], s["masks"]):
            assert img.shape == (32, 32, 3) and m.shape == (32, 32)
            assert np.abs(img[..., 0].astype(int) - m).mean() < 8  # same pixels, same crop, same flip
    batch = collate_sets([s, {**s, "images": s["images"][:2], "captions": s["captions"][:2],
                              "is_ref": s["is_ref"][:2], "masks": s["masks"][:2]}], None)
    assert batch["subject_mask"].shape == (2, 3, 1, 32, 32) and batch["subject_mask"][1, 2].sum() == 0
    assert torch.allclose(batch["subject_mask"][0, 0, 0], torch.from_numpy(s["masks"][0].copy()).float() / 255)
    del s["masks"]  # a set without masks: the batch carries none
    assert "subject_mask" not in collate_sets([s], None)


def test_jpeg_is_written_without_chroma_subsampling():
    import io

    from PIL import Image

    img = np.zeros((16, 16, 3), np.uint8)
    img[:, ::2] = (255, 0, 0)  # one-pixel colour stripes: 4:2:0 would smear them
    sample = encode_set("j", [img, img], ["a", "b"], ext="jpg")
    back = np.asarray(Image.open(io.BytesIO(sample["0.jpg"])).convert("RGB")).astype(int)
    assert np.abs(back - img).mean() < 12
