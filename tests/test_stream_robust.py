"""Bad or odd data is skipped or repaired, counted by reason, logged rate-limited, and never crashes;
sources: brace expansion, weights, pipe: refused unless allowed."""
import logging
import os

import numpy as np
import pytest
import torch
from helpers.stream_helpers import write_raw_tar, write_shards
from helpers.stream_zoo import KEPT, SKIPPED, stream_all, write_zoo

from data_pipelines.resume import ResumableLoader
from data_pipelines.shards import expand_sources
from data_pipelines.skips import Counts
from data_pipelines.stream import SetStream, StreamConfig


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("zoo"))
    write_zoo(root)
    return root


def test_bad_and_odd_data_is_skipped_or_repaired_and_counted(zoo):
    seen, loader = stream_all(os.path.join(zoo, "*.tar"))
    kept_good = {s for s in seen if s.startswith("good")}
    assert set(seen) - kept_good == KEPT
    assert {"good0_0", "good0_3", "good1_0"} <= kept_good and "good1_3" not in kept_good  # truncated shard's tail
    skips = loader.skip_counts()
    for reason in set(SKIPPED.values()) | {"not_tar", "truncated_tar", "image_too_small", "image_undecodable",
                                           "image_too_large"}:
        assert skips.get(reason, 0) >= 1, reason
    repairs = loader.repair_counts()
    for reason in ("image_mode_L", "image_alpha", "image_mode_P", "image_16bit", "image_mode_CMYK",
                   "caption_not_utf8", "caption_not_string"):
        assert repairs.get(reason, 0) >= 1, reason
    px = {k: b["pixel_values"][0, 0] for k, b in seen.items()}
    assert torch.allclose(px["rgba"], torch.ones(3, 16, 16))                   # transparent -> white
    assert abs(float(px["sixteen"].mean()) - (128 / 127.5 - 1)) < 0.02         # 16-bit scaled, not clipped
    assert float(px["cmyk"][0].mean()) > 0.5 and float(px["cmyk"][1].mean()) < -0.5  # CMYK red -> RGB red
    assert seen["huge_jpeg"]["pixel_values"].shape[-2:] == (16, 16)
    assert seen["one_bad"]["valid"].sum() == 2 and seen["one_tiny"]["valid"].sum() == 2
    assert "\ufffd" in seen["latin1"]["captions"][0][0]
    assert sorted(seen["caption_int"]["captions"][0]) == ["", "7"]


def test_skip_logging_is_rate_limited(caplog):
    counts = Counts(log_every_s=3600)
    with caplog.at_level(logging.WARNING, logger="data_pipelines.stream"):
        for _ in range(500):
            counts.skip("missing_json", "x")
        counts.skip("bad_json", "y")
    assert counts.skipped == {"missing_json": 500, "bad_json": 1}
    assert len(caplog.records) == 2  # the first of each reason only


def test_a_dataset_with_nothing_readable_stops_instead_of_spinning(tmp_path, caplog):
    for i in range(2):
        (tmp_path / f"junk{i}.tar").write_bytes(b"not a tar" * 100)
    cfg = StreamConfig(sources=str(tmp_path / "*.tar"), epoch_sets=8, batch_size=2)
    with caplog.at_level(logging.ERROR):
        assert list(ResumableLoader(SetStream(cfg), 0)) == []
    assert "no readable set" in caplog.text


def test_pipe_urls_are_refused_unless_allowed(tmp_path):
    write_shards(str(tmp_path), num_shards=1, sets_per_shard=4, size=16)
    url = f"pipe:cat {tmp_path}/s-0000.tar"
    with pytest.raises(ValueError, match="allow_pipe"):
        expand_sources(url)
    cfg = StreamConfig(sources=url, allow_pipe=True, epoch_sets=4, batch_size=2, resolution=16)
    batches = list(ResumableLoader(SetStream(cfg), 0))
    assert sorted(s for b in batches for s in b["set_id"]) == ["s0_0", "s0_1", "s0_2", "s0_3"]


def test_brace_expansion_globs_and_weighted_sources(tmp_path):
    write_shards(str(tmp_path / "a"), num_shards=3, sets_per_shard=2, size=16, prefix="a")
    write_shards(str(tmp_path / "b"), num_shards=1, sets_per_shard=2, size=16, prefix="b")
    srcs = expand_sources([{"url": f"{tmp_path}/a/a-{{0000..0002}}.tar", "weight": 1.0},
                           {"url": f"{tmp_path}/b/*.tar", "weight": 3.0}])
    assert [len(s.urls) for s in srcs] == [3, 1]
    with pytest.raises(FileNotFoundError, match="matches no shards"):
        expand_sources(f"{tmp_path}/c/*.tar")
    cfg = StreamConfig(sources=[{"url": f"{tmp_path}/a/a-{{0000..0002}}.tar", "weight": 1.0},
                                {"url": f"{tmp_path}/b/*.tar", "weight": 3.0}], resampled=True, epoch_sets=8)
    stream = SetStream(cfg)
    draws = [stream.shard_at(0, 0, 0, d) for d in range(4000)]
    frac_b = np.mean(["/b/" in u for u in draws])
    assert abs(frac_b - 0.75) < 0.03  # a source's share follows its weight, not its shard count


def test_truncated_last_sample_never_reaches_decode(tmp_path):
    # a set whose json announces 3 images but the tar ends after 2: validated away, not decoded
    from helpers.stream_helpers import encode_image, set_json
    from PIL import Image

    img = encode_image(Image.new("RGB", (16, 16)), "PNG")
    write_raw_tar(str(tmp_path / "t.tar"), {"ok.json": set_json("ok", 2), "ok.0.png": img, "ok.1.png": img,
                                            "cut.json": set_json("cut", 3), "cut.0.png": img, "cut.1.png": img})
    cfg = StreamConfig(sources=str(tmp_path / "t.tar"), epoch_sets=1, batch_size=1, resolution=16)
    loader = ResumableLoader(SetStream(cfg), 0)
    assert [b["set_id"] for b in loader] == [["ok"]]
    assert loader.skip_counts() == {"missing_image": 1}
