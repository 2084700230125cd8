"""`jedi-data stats`: same validation/decoding as training, exit codes, and the issue's acceptance
check on jedi-synth output (truncated shard + garbage .tar) when the synthesizer is available."""
import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.stream_zoo import KEPT, MAX_PIXELS, stream_all, write_zoo

from jedi_train.cli.data import main


def run_stats(capsys, *argv):
    rc = main(["stats", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_stats_report_usable_sets_and_skips_by_reason(tmp_path, capsys):
    write_zoo(str(tmp_path))
    pattern = str(tmp_path / "*.tar")
    rc, out, _ = run_stats(capsys, pattern, "--json", "--resolution", "16", "--max-image-pixels", str(MAX_PIXELS))
    s = json.loads(out)
    assert rc == 0
    streamed, _ = stream_all(pattern)  # the training stream keeps exactly the sets stats calls usable
    assert s["sets"] == len(streamed) >= len(KEPT) + 5
    assert s["shards"] == 4
    assert s["images"] == sum(int(k) * v for k, v in s["set_size_histogram"].items())
    assert s["skipped"]["not_tar"] == 1 and s["skipped"]["truncated_tar"] == 1
    assert s["skipped"]["missing_json"] >= 1 and s["skipped"]["no_captions"] == 1
    assert s["skipped"]["too_few_images"] == 1  # the set of one image
    assert s["repaired"]["image_16bit"] == 2
    assert s["caption_words"]["min"] == 0 and s["caption_words"]["max"] == 7  # the null caption counts as ""
    rc, text, _ = run_stats(capsys, pattern, "--resolution", "16", "--max-image-pixels", str(MAX_PIXELS))
    assert rc == 0 and "not_tar=1" in text and f"sets    {s['sets']} usable" in text


def test_stats_exit_codes_when_nothing_is_usable(tmp_path, capsys):
    (tmp_path / "junk.tar").write_bytes(b"\0garbage" * 300)
    rc, _, err = run_stats(capsys, str(tmp_path / "junk.tar"))
    assert rc == 1 and "no usable set" in err and "not_tar" in err
    rc, _, err = run_stats(capsys, str(tmp_path / "missing-*.tar"))
    assert rc == 2 and "matches no shards" in err
    rc, _, err = run_stats(capsys, "pipe:cat x.tar")
    assert rc == 2 and "--allow-pipe" in err


def _synth_available() -> bool:
    try:
        import data_pipelines.synth.cli  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.mark.skipif(not _synth_available(), reason="jedi-synth (data_pipelines.synth) not available yet")
def test_acceptance_on_jedi_synth_output(tmp_path):
    out = tmp_path / "synth"
    bindir = os.path.dirname(sys.executable)
    synth = shutil.which("jedi-synth", path=bindir) or "jedi-synth"
    subprocess.run([synth, "generator=procedural", "num_sets=64", "set_size=4", "resolution=64", f"out_dir={out}"],
                   check=True, cwd=tmp_path, capture_output=True)
    shards = sorted(glob.glob(str(out / "*.tar")))
    assert shards
    raw = Path(shards[0]).read_bytes()
    Path(shards[0]).write_bytes(raw[: len(raw) // 2])
    (out / "garbage.tar").write_bytes(os.urandom(4096))
    cli = shutil.which("jedi-data", path=bindir) or "jedi-data"
    res = subprocess.run([cli, "stats", f"{out}/*.tar", "--json"], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)
    assert 0 < s["sets"] < 64 and s["skipped"]["not_tar"] == 1 and s["skipped"].get("truncated_tar", 0) == 1
    assert s["set_size_histogram"] == {"4": s["sets"]} or s["set_size_histogram"] == {4: s["sets"]}
