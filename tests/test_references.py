"""Reference loading on its own: folders and paths, PIL / numpy / torch inputs, sizes and the [-1, 1]
mapping, and one clear error per bad input. (EXIF, alpha, gray and float-CHW-vs-uint8-HWC are in
test_pipeline.py; the decompression bomb in test_cli_errors.py.)"""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jedi_train.pipelines.references import expand_reference_paths, load_references, prepare_reference


def solid(color, size=(16, 16)) -> Image.Image:
    return Image.new("RGB", size, tuple(color))


def test_a_folder_becomes_its_image_files_in_sorted_order(tmp_path):
    for name in ("10.png", "1.jpg", "0.PNG", ".hidden.png"):
        solid((0, 0, 0)).save(tmp_path / name, format="JPEG" if name.endswith("jpg") else "PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    files = expand_reference_paths(str(tmp_path))
    assert [os.path.basename(f) for f in files] == ["0.PNG", "1.jpg", "10.png"]  # no dotfiles, no .txt
    assert expand_reference_paths(tmp_path) == files  # a Path too
    pil, arr = solid((1, 2, 3)), np.zeros((4, 4, 3), np.uint8)
    mixed = expand_reference_paths([pil, str(tmp_path / "1.jpg"), tmp_path, arr])  # order kept, folders inlined
    assert mixed[0] is pil and mixed[1] == str(tmp_path / "1.jpg") and mixed[2:5] == files and mixed[5] is arr
    assert expand_reference_paths(pil) == [pil]  # one item, not a list


def test_missing_empty_and_broken_paths_raise_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png does not exist"):
        expand_reference_paths([str(tmp_path / "nope.png")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(ValueError, match="holds no image files"):
        expand_reference_paths(str(tmp_path / "empty"))
    os.symlink(tmp_path / "gone.png", tmp_path / "link.png")
    with pytest.raises(FileNotFoundError, match="broken symlink"):
        load_references([str(tmp_path / "link.png")], 16)
    (tmp_path / "fake.png").write_text("this is text")
    with pytest.raises(ValueError, match=r"fake.png is not a readable image"):
        load_references([str(tmp_path / "fake.png")], 16)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((8, 8, 2), np.uint8), r"shape \(8, 8, 2\) is not an image"),
    (np.zeros((2, 8, 8, 3), np.uint8), "is not an image"),
    (torch.zeros(8), "is not an image"),
    (42, "of type int is not supported"),
    (b"\x89PNG", "of type bytes is not supported"),
])
def test_unsupported_inputs_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        load_references([bad], 16)


def test_center_crop_of_wide_and_tall_images():
    """The shorter side is already R: no resampling, the centre square is kept exactly."""
    wide = np.zeros((16, 48, 3), np.uint8)
    wide[:, :16, 0], wide[:, 16:32, 1], wide[:, 32:, 2] = 255, 255, 255  # red | green | blue
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2))  # red / green / blue from the top
    pixels, pils = load_references([wide, tall], 16)
    green = torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand(3, 16, 16)
    assert torch.equal(pixels[0], green) and torch.equal(pixels[1], green)
    assert [p.size for p in pils] == [(16, 16), (16, 16)] and all(p.mode == "RGB" for p in pils)


@pytest.mark.parametrize("size", [(8, 8), (64, 32), (33, 70), (200, 120)])
def test_any_size_becomes_r_by_r(size):
    pixels, pils = load_references([solid((30, 60, 90), size)], 24)
    assert pixels.shape == (1, 3, 24, 24) and pixels.dtype == torch.float32 and pils[0].size == (24, 24)
    expect = torch.tensor([30, 60, 90]) / 127.5 - 1  # a solid colour survives resizing and cropping
    torch.testing.assert_close(pixels[0].mean((1, 2)), expect, atol=1 / 127.5, rtol=0)


def test_pixel_values_map_0_255_to_minus_one_one():
    pixels, _ = load_references([solid((0, 128, 255)), solid((10, 20, 30))], 16)
    assert pixels[0, 0].eq(-1).all() and pixels[0, 2].eq(1).all()
    torch.testing.assert_close(pixels[:, :, 3, 5], torch.tensor([[0, 128, 255], [10, 20, 30]]) / 127.5 - 1)


def test_float_arrays_are_clipped_to_0_1_and_uint8_tensors_match_arrays():
    over, under, half = (np.full((16, 16, 3), v, np.float32) for v in (2.0, -0.5, 0.5))
    pixels, _ = load_references([over, under, half], 16)
    assert pixels[0].eq(1).all() and pixels[1].eq(-1).all()
    torch.testing.assert_close(pixels[2], torch.full((3, 16, 16), 128 / 127.5 - 1))
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    from_tensor, _ = load_references([torch.from_numpy(hwc).permute(2, 0, 1).contiguous()], 16)  # uint8 CHW
    from_array, _ = load_references([hwc], 16)
    assert torch.equal(from_tensor, from_array)


def test_single_channel_inputs_become_gray_rgb():
    ramp = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (16, 1))
    for item in (torch.from_numpy(ramp)[None], ramp[..., None], ramp):  # (1, H, W), (H, W, 1), (H, W)
        pixels, _ = load_references([item], 16)
        assert pixels.shape == (1, 3, 16, 16)
        assert torch.equal(pixels[0, 0], pixels[0, 1]) and torch.equal(pixels[0, 1], pixels[0, 2])
        assert pixels[0, 0, :, -1].mean() > 0.9 and pixels[0, 0, :, 0].mean() < -0.9  # the ramp, left to right


def test_paths_and_objects_load_in_order(tmp_path):
    solid((255, 0, 0)).save(tmp_path / "red.png")
    blue, green = solid((0, 0, 255)), np.zeros((16, 16, 3), np.uint8)
    green[..., 1] = 255
    pixels, pils = load_references([Path(tmp_path / "red.png"), blue, green], 16)
    assert pixels[:, :, 0, 0].argmax(1).tolist() == [0, 2, 1]
    assert np.array_equal(np.asarray(pils[1]), np.asarray(prepare_reference(blue, 16)))


def test_no_references_is_an_empty_batch():
    pixels, pils = load_references([], 20)
    assert pixels.shape == (0, 3, 20, 20) and pils == []
