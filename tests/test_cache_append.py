"""Issue 35, item 5 (and the encode part of item 4): a `jedi-data encode` OUT_DIR grows with its dataset, and
encode's bad input is one `jedi-data: error:` line."""
from __future__ import annotations

import json
import os

import pytest
from helpers.stream_helpers import write_shards

from jedi_train.cli.data import main as jedi_data

pytestmark = pytest.mark.usefixtures("one_thread")


def encode(src: str, out: str, model: str, *extra: str) -> int:
    return jedi_data(["encode", f"{src}/*.tar", out, "--model", model, "--no-progress", *extra])


def test_new_shards_are_appended_to_an_existing_cache(tiny_model_dir, tmp_path, capsys):
    src, out = tmp_path / "sets", tmp_path / "cached"
    write_shards(str(src), 2, 2, prefix="m")  # m-0000.tar, m-0001.tar
    assert encode(str(src), str(out), tiny_model_dir) == 0
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")}
    assert sorted(before) == ["sets-000000.tar", "sets-000001.tar"]

    write_shards(str(src), 1, 3, prefix="a")  # sorts before the known shards: they must keep their numbers
    write_shards(str(src), 1, 1, prefix="z")
    capsys.readouterr()
    assert encode(str(src), str(out), tiny_model_dir) == 0, capsys.readouterr().err
    assert "2 shard(s) written, 2 already complete" in capsys.readouterr().out
    after = {p.name: p for p in out.glob("*.tar")}
    assert sorted(after) == [f"sets-{k:06d}.tar" for k in range(4)]
    for name, (mtime, data) in before.items():  # complete shards are skipped, byte for byte
        assert after[name].stat().st_mtime_ns == mtime and after[name].read_bytes() == data
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["sets"] == 2 * 2 + 3 + 1 and len(manifest["shards"]) == 4
    assert [os.path.basename(u) for u in manifest["inputs"]] == ["m-0000.tar", "m-0001.tar", "a-0000.tar", "z-0000.tar"]
    assert not list(out.glob(".*.partial"))

    # only the new shard given: it is appended, the others stay in the manifest
    write_shards(str(tmp_path / "more"), 1, 2, prefix="n")
    assert jedi_data(["encode", str(tmp_path / "more" / "n-0000.tar"), str(out), "--model", tiny_model_dir,
                      "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) == 5 and manifest["sets"] == 10 and manifest["complete"]


def one_line(capsys) -> str:
    """The error line (last on stderr; transformers' weight-loading bar may come before it), no traceback."""
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("jedi-data: error: encode:") and "Traceback" not in err, err
    return last


def test_encode_bad_input_is_one_line_naming_the_problem(tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "sets"
    write_shards(str(src), 12, 1, prefix="shard")
    capsys.readouterr()
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"not a directory")
    assert encode(str(src), str(tmp_path / "o1"), str(a_file)) == 2
    assert "is a file, not a model directory" in one_line(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert encode(str(src), str(tmp_path / "o2"), str(empty)) == 2
    line = one_line(capsys)
    assert "is empty" in line and "lacks" not in line
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()  # nothing created

    out = tmp_path / "cached"
    assert encode(str(src), str(out), tiny_model_dir) == 0
    capsys.readouterr()
    assert encode(str(src), str(out), tiny_model_dir, "--dtype", "bfloat16") == 2
    line = one_line(capsys)
    assert "different config" in line and "dtype 'float16' -> 'bfloat16'" in line
    # its length does not grow with the dataset: no shard path in it, only OUT_DIR (twice) and the model
    assert "shard-0000" not in line and len(line) < 300 + 2 * len(str(out)) + len(tiny_model_dir), line
