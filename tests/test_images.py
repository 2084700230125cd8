"""data_pipelines/images.py: the fast JPEG path must decode exactly what PIL decodes."""
import io

import numpy as np
import pytest
from PIL import Image

from data_pipelines.images import Unusable, decode_rgb, draft_request, open_pil
from data_pipelines.skips import Counts


def jpeg(w: int, h: int, mode: str = "RGB", seed: int = 0, **save) -> bytes:
    a = np.random.default_rng(seed).normal(128, 40, (h, w, 3)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).convert(mode).save(buf, "JPEG", **save)
    return buf.getvalue()


@pytest.mark.parametrize("w,h,res", [(128, 128, 128), (96, 130, 64), (512, 384, 96), (1001, 777, 128),
                                     (260, 900, 128), (257, 256, 128), (4000, 3000, 512)])
def test_fast_jpeg_decode_is_bit_identical_to_pil_draft(w, h, res):
    data = jpeg(w, h)
    got = decode_rgb(data, res, max_pixels=10**9, min_size=16)
    want = np.asarray(open_pil(io.BytesIO(data), res).convert("RGB"))  # PIL, DCT-scaled like training
    assert got.shape == want.shape and np.array_equal(got, want)
    if min(w, h) >= 4 * res:  # a 1/2 scale (or smaller) fits: really decoded at a reduced scale
        assert draft_request(w, h, res) and min(got.shape[:2]) <= min(w, h) // 2


def test_gray_and_cmyk_jpegs_are_repaired_and_counted():
    for mode in ("L", "CMYK"):
        counts = Counts()
        arr = decode_rgb(jpeg(64, 48, mode), 32, max_pixels=10**9, min_size=16, counts=counts)
        assert arr.shape == (48, 64, 3) and counts.repaired == {f"image_mode_{mode}": 1}


@pytest.mark.parametrize("save", [{"progressive": True}, {"subsampling": 0, "quality": 100},
                                  {"optimize": True, "progressive": True, "quality": 30}])
def test_fast_jpeg_matches_pil_for_other_encodings(save):
    data = jpeg(200, 300, **save)
    for res in (64, 128):
        want = np.asarray(open_pil(io.BytesIO(data), res).convert("RGB"))
        assert np.array_equal(decode_rgb(data, res, max_pixels=10**9, min_size=16), want)


@pytest.mark.parametrize("data,reason", [(jpeg(64, 64)[:300], "image_undecodable"), (b"not an image", "image_undecodable"),
                                         (jpeg(8, 64), "image_too_small"), (jpeg(200, 200), "image_too_large")])
def test_unusable_images_name_their_reason(data, reason):
    with pytest.raises(Unusable) as e:
        decode_rgb(data, 32, max_pixels=30_000, min_size=16)
    assert e.value.reason == reason
