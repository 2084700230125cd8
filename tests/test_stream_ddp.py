"""Two real torch.distributed (gloo) processes: the DataModule takes rank/world from the process
group, `state_dict()` gathers both ranks' positions (Lightning writes only rank 0's checkpoint), and
each rank resumes its own stream exactly from that one saved state."""
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers.stream_helpers import write_shards

from jedi_train.training.datamodule import JeDiDataModule
from jedi_train.models.components import tokenize  # noqa: F401 - imported once, forked
from jedi_train.models.tiny import build_tiny_tokenizer

STOP, TOTAL = 2, 6


def _take(dm, n):
    it, out = iter(dm.train_dataloader()), []
    while len(out) < n:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(dm.train_dataloader())
            continue
        dm.on_before_batch_transfer(batch, 0)
        out.append(batch["set_id"])
    it.close()
    return out


def _worker(rank, root, shards, model_dir):
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=2)

    def make():
        dm = JeDiDataModule(sources=shards, resolution=16, batch_size=2, num_workers=2, shuffle_buffer=3,
                            model_dir=model_dir, seed=5)
        dm.setup("fit")
        return dm

    whole = make()
    full = _take(whole, TOTAL)
    own, summed = whole.repair_counts(), whole.global_counts()  # collective: both ranks call it
    first = make()
    head = _take(first, STOP)
    state = first.state_dict()  # collective: every rank calls it, as in trainer.save_checkpoint
    if rank == 0:
        torch.save(state, f"{root}/data_state.pt")
    dist.barrier()
    resumed = make()
    resumed.load_state_dict(torch.load(f"{root}/data_state.pt"))  # every rank reads rank 0's file
    tail = _take(resumed, TOTAL - STOP)
    with open(f"{root}/rank{rank}.json", "w") as f:
        json.dump({"full": full, "resumed": head + tail, "ranks": sorted(state["ranks"]),
                   "world": state["world_size"],
                   "own": own, "summed": summed["repaired"]}, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_group_ranks_resume_from_one_gathered_state(tmp_path):
    shards = write_shards(str(tmp_path / "shards"), num_shards=4, sets_per_shard=6, size=16)
    gray_shard(shards[0], sets=6, size=16)  # one shard of grayscale images: repairs on one rank only
    build_tiny_tokenizer(str(tmp_path / "model" / "tokenizer"))
    args = (str(tmp_path), str(tmp_path / "shards" / "*.tar"), str(tmp_path / "model"))
    mp.start_processes(_worker, args=args, nprocs=2, start_method="fork")  # forked: no re-imports per rank
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["ranks"] == [0, 1] and r["world"] == 2
        assert r["resumed"] == r["full"]
    ids = [{s for b in r["full"][:3] for s in b} for r in results]  # 24 sets / (2 ranks x 2) = 6 batches
    assert not ids[0] & ids[1]  # the ranks read different shards
    own = [r["own"].get("image_mode_L", 0) for r in results]
    assert min(own) == 0 and sum(own) > 0  # only the rank that read the gray shard saw them
    assert all(r["summed"] == {"image_mode_L": sum(own)} for r in results)  # logged: the sum, on every rank


def gray_shard(path, sets, size):
    """Replace the shard at `path` by one of `sets` 2-image sets of grayscale PNGs."""
    from helpers.stream_helpers import encode_image, set_json, write_raw_tar
    from PIL import Image

    members = {}
    for i in range(sets):
        members[f"g{i}.json"] = set_json(f"g{i}", 2)
        for j in range(2):
            members[f"g{i}.{j}.png"] = encode_image(Image.new("L", (size, size), 40 * j + i))
    write_raw_tar(path, members)
