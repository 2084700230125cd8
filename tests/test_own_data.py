"""Issue 35, item 3: training on your own shards is measured on your own subjects.

With data.sources pointed at a user's shards (not the demo's synthesized sets), the held-out sets default to a
fixed, seeded split of those shards: kept out of training, used by the sample grid and the identity gain,
recorded in RUN/heldout.json and named in the log. The demo's procedural held-out sets are neither used nor
synthesized."""
from __future__ import annotations

import json

from helpers.cli import FAST, cli, losses
from helpers.stream_helpers import write_shards

from data_pipelines.heldout import choose_heldout


def test_the_split_is_fixed_by_its_seed_and_a_tenth_at_most(tmp_path):
    shards = write_shards(str(tmp_path / "mine"), 4, 16, set_sizes=(3, 4))
    a = choose_heldout(f"{tmp_path}/mine/*.tar", 32, seed=0)
    assert a == choose_heldout(f"{tmp_path}/mine/*.tar", 32, seed=0) and len(a) == 64 // 10
    assert a != choose_heldout(f"{tmp_path}/mine/*.tar", 32, seed=1)
    assert {s["shard"] for s in a} <= set(shards)
    assert len(choose_heldout(f"{tmp_path}/mine/*.tar", 2, seed=0)) == 2


def test_training_on_your_own_shards_holds_out_your_own_subjects(tmp_path):
    write_shards(str(tmp_path / "my_sets"), 4, 16, set_sizes=(3, 4), prefix="mine")
    run = tmp_path / "runs" / "own"
    p = cli("jedi-train", *FAST, f"data.sources=[{{url: {tmp_path}/my_sets/*.tar}}]", "trainer.max_steps=3",
            "export_after_fit=false", "logger=none", "data.num_workers=0", f"paths.output_dir={run}", cwd=tmp_path,
            timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    record = json.loads((run / "heldout.json").read_text())
    held = {s["set_id"] for s in record["sets"]}
    assert len(held) == 6 and all(h.startswith("mine") for h in held) and record["seed"] == 0
    assert "held-out sets: 6 sets of your data.sources" in out, out[-3000:]
    trained = {i for _, _, ids in losses(run) for i in ids.split("|")}
    assert trained and not trained & held  # kept out of training
    assert (run / "samples" / "samples_step0000003.png").is_file()  # the grid of the held-out split
    assert not (tmp_path / "data" / "sets" / "procedural_centered_heldout").exists()  # the demo's: not made
