"""`jedi-data encode IN_URLS... OUT_DIR --model MODEL_DIR`: cache each set's latents and text embeddings.

Streams set shards (read like training reads them: shards.read_tar, schema validation, sets.load_image)
through the model's frozen VAE (or pixel fold) and text encoder(s) and writes, per input shard, one
output shard holding every set's original members unchanged plus its cached encodings (schema.py:
latents.safetensors, text.safetensors, cache.json). Training uses them when the fingerprint matches
(jedi_train/training/datamodule.py), so the VAE and text encoders need not run every step.

Crop policy: the cache holds the CENTRE crop at the model resolution, unflipped (shorter side resized to
the resolution, as data.crop=center). Training with the cache therefore needs data.crop=center and
data.flip_prob=0 (else one clear error); random crops / flips train without the cache.

The VAE posterior is stored (mean + logvar), not one draw: training samples it each step exactly as the
VAE would (LatentCodec.sample). Unusable images (undecodable, too small) get zero rows; the stream drops
them as it always does.

Resumable and shardable like jedi-synth (synth/writer.py ShardOutput): output shard k (sets-<k>.tar)
is input shard k, written to a hidden .partial file and renamed when whole; complete shards are not
redone; `--num-shards N --shard-index I` (default: SLURM_ARRAY_TASK_COUNT / SLURM_ARRAY_TASK_ID) takes
shards I, I+N, ... An OUT_DIR encoded with another model or settings is refused. OUT_DIR also gets
empty_prompt.safetensors (the "" caption embedding, for caption dropout) and manifest.json (the
encoder fingerprint and the complete shards).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipelines.schema import SCHEMA_VERSION, SkipSet, encode_cache, set_meta
from data_pipelines.sets import SetOptions, load_image, read_captions
from data_pipelines.shards import count_samples, expand_sources, read_tar
from data_pipelines.skips import Counts
from jedi_common.atomic import atomic_path
from jedi_common.errors import missing

EMPTY_PROMPT = "empty_prompt.safetensors"
STATE_DIR = ".jedi-data-encode"
ENCODER_DIRS = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
_SMALL = 4 << 20  # files up to this size are hashed whole; larger (weights): size + three 1 MiB samples


def _file_digest(path: Path) -> str:
    """sha256 of a config / tokenizer file; of a weight file, its size and its first, middle and last MiB
    (the safetensors header names every tensor's shape and offset): cheap on a 10 GB T5, and independent
    of the dtype the weights are loaded in for training."""
    h, size = hashlib.sha256(), path.stat().st_size
    with open(path, "rb") as f:
        if size <= _SMALL:
            h.update(f.read())
        else:
            h.update(str(size).encode())
            for at in (0, size // 2, size - (1 << 20)):
                f.seek(at)
                h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def fingerprint(model_dir: str, codec, resolution: int) -> dict[str, Any]:
    """What the cached encodings depend on: the encoders' and tokenizers' files, the codec settings and the
    resolution. `id` is its digest (what cache.json stores), the rest says which model it was."""
    files = {comp: {p.name: _file_digest(p) for p in sorted(Path(model_dir, comp).iterdir())
                    if p.is_file() and not p.name.startswith(".")}
             for comp in ENCODER_DIRS if Path(model_dir, comp).is_dir()}
    codec_cfg = {"pixel_fold": codec.fold} if codec.vae is None else {
        "vae_scaling_factor": codec.vae.config.get("scaling_factor"), "vae_shift_factor": codec.shift}
    what = {"files": files, "codec": codec_cfg, "resolution": int(resolution), "cache_version": 1}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    return {"id": digest, "model_dir": os.path.abspath(model_dir), **what}


def frozen_encoders(model_dir: str, resolution: int | None = None, device: str = "cpu"):
    """(codec, prompt encoder, resolution) of a model directory, without loading its denoiser."""
    from jedi_train.models import families
    from jedi_train.models.components import LatentCodec, check_model_dir, load_text_parts
    from jedi_train.models.joint import infer_pixel_fold
    from jedi_train.models.text import PromptEncoder

    family = families.get(check_model_dir(model_dir))
    with open(os.path.join(model_dir, family.denoiser_folder, "config.json")) as f:
        cfg = json.load(f)
    jedi = cfg.get("_jedi") or {}
    vae = None
    if os.path.isdir(os.path.join(model_dir, "vae")):
        vae = family.vae().from_pretrained(model_dir, subfolder="vae").requires_grad_(False).eval().to(device)
    fold = 1
    if vae is None:  # a joint model records its fold; a base one implies it (in_channels = 3 fold^2)
        fold = jedi.get("pixel_fold") or infer_pixel_fold(cfg["in_channels"])
    codec = (family.codec() if vae is not None else LatentCodec)(vae, fold)
    native = cfg["sample_size"] * codec.downsample if family.fixed_resolution else jedi.get("resolution")
    if resolution is None and native is None:
        raise ValueError(f"{model_dir} is a {family.title} model, which has no fixed resolution: give --resolution "
                         "(the model.resolution you train at)")
    if native is not None and resolution is not None and resolution != native:
        raise ValueError(f"--resolution {resolution} but the model in {model_dir} works at {native} px; "
                         f"give --resolution {native} (or leave it out)")
    text = load_text_parts(model_dir, family.name)
    for name, enc in text.items():
        if enc is not None and name.startswith("text_encoder"):
            enc.requires_grad_(False).eval().to(device)
    return codec, PromptEncoder.of(family.text_layout, **text), int(resolution or native)


@torch.no_grad()
def encode_set(sample: dict, codec, text, opt: SetOptions, fp_id: str, model_dir: str, dtype: torch.dtype,
               device: str, counts: Counts) -> tuple[dict, int] | None:
    """One validated raw set -> (output sample: its members + cache members, images), or None (skipped)."""
    try:
        meta = set_meta(sample)
    except SkipSet as e:
        counts.skip(str(e), f"{sample.get('__url__')} {sample.get('__key__')}")
        return None
    captions = read_captions(sample.get("json"), meta, counts)
    arrays = [load_image(sample[k], opt, None, counts) for k in meta["image_keys"]]  # centre crop: no rng
    unusable = [i for i, a in enumerate(arrays) if a is None]
    if len(unusable) == len(arrays):
        counts.skip("no_decodable_image", str(meta["set_id"]))
        return None
    u8 = np.zeros((len(arrays), opt.resolution, opt.resolution, 3), dtype=np.uint8)
    for i, a in enumerate(arrays):
        if a is not None:
            u8[i] = a
    pixels = torch.from_numpy(u8).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).to(device)
    mean, logvar = codec.posterior(pixels)
    if unusable:  # zero rows: the stream never picks an image it cannot decode
        mean[unusable] = 0.0
        if logvar is not None:
            logvar[unusable] = 0.0
    emb = text.embed(text.token_ids(captions), opt.resolution)
    info = {"fingerprint": fp_id, "model_dir": model_dir, "dtype": str(dtype).removeprefix("torch."), "resolution": opt.resolution,
            "crop": "center", "unusable": unusable}
    cache = encode_cache(info, {"mean": mean, "logvar": logvar}, vars(emb), dtype)
    out = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
    return out | cache, len(arrays)


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
        f.write(save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


# -- what training reads (jedi_train/training/datamodule.py) -------------------------------------------------
def probe_cache(sources: Any, allow_pipe: bool = False) -> list[tuple[str, dict | None]]:
    """(first shard, cache.json of its first set or None) for each source: is it cached, for which model."""
    from data_pipelines.schema import cache_info, validate_sample

    out = []
    for src in expand_sources(sources, allow_pipe):
        url = src.urls[0]
        first = next((s for _, s in read_tar(url, Counts(log_every_s=float("inf"))) if not validate_sample(s)), None)
        out.append((url, None if first is None else cache_info(first)))
    return out


def load_empty_prompt(shard_url: str) -> dict[str, torch.Tensor]:
    """The "" caption embedding jedi-data encode wrote beside the shards, as {"text_hidden": (1, T, D), ...}."""
    from safetensors.torch import load

    from data_pipelines.shards import open_url

    url = shard_url.rsplit("/", 1)[0] + "/" + EMPTY_PROMPT if "/" in shard_url else EMPTY_PROMPT
    try:
        with open_url(url) as f:
            tensors = load(f.read())
    except Exception as e:  # noqa: BLE001 - missing or unreadable: the same fix
        raise FileNotFoundError(f"{shard_url} holds cached encodings but {url} (the empty-caption embedding "
                                f"jedi-data encode writes beside the shards) cannot be read ({e.__class__.__name__}); "
                                "copy it from the encode OUT_DIR, or set data.use_cache=false") from None
    return {f"text_{k}": v for k, v in tensors.items()}


def mismatch_error(url: str, info: dict, model: dict) -> str:
    return (f"{url} holds latents / text embeddings encoded with model {info.get('model_dir')} (fingerprint "
            f"{info.get('fingerprint')}, {info.get('resolution')} px) but this run trains {model['model_dir']} "
            f"(fingerprint {model['id']}, {model['resolution']} px): re-encode with `jedi-data encode ... "
            f"--model {model['model_dir']}`, or set data.use_cache=false to encode on the fly")


def run(patterns: list[str], out_dir: str, model_dir: str, dtype: str = "float16", resolution: int | None = None,
        num_shards: int | None = None, shard_index: int | None = None, device: str | None = None,
        prefix: str = "sets", allow_pipe: bool = False, progress: bool = True) -> dict[str, Any]:
    from tqdm import tqdm

    from data_pipelines.synth.writer import SetResult, ShardOutput, Unit, shard_slice, worker_units
    from jedi_common.atomic import atomic_write_text

    if dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"--dtype {dtype} is not supported; use float16, bfloat16 or float32")
    if os.path.isfile(model_dir):
        raise ValueError(f"--model {model_dir} is a file, not a model directory; give the diffusers model "
                         "directory training uses (model.model_dir)")
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"--model {model_dir} {missing(model_dir)}; give a diffusers model directory")
    n_workers, worker = shard_slice(num_shards, shard_index)
    urls = [u for s in expand_sources(patterns, allow_pipe) for u in s.urls]
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"OUT_DIR {out_dir} is a file; give a directory for the encoded shards")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    codec, text, res = frozen_encoders(model_dir, resolution, device)
    fp = fingerprint(model_dir, codec, res)
    out = ShardOutput(out_dir, prefix)
    out.state = out.dir / STATE_DIR
    inputs = _plan_inputs(out, {"fingerprint": fp["id"], "dtype": dtype, "resolution": res}, urls)

    units = [Unit(k, k, k + 1) for k in range(len(inputs))]  # unit k: the k-th input shard ever encoded here
    number = {u: k for k, u in enumerate(inputs)}
    mine = worker_units([units[number[u]] for u in dict.fromkeys(urls)], n_workers, worker)  # this run's shards
    todo = [u for u in mine if not out.is_complete(u)]
    empty = vars(text.embed(text.token_ids([""]), res))
    _save_atomic({k: v.to("cpu", getattr(torch, dtype)) for k, v in empty.items() if v is not None},
                 out.dir / EMPTY_PROMPT, {"fingerprint": fp["id"]})
    opt = SetOptions(resolution=res, crop="center", flip_prob=0.0)
    counts, t0 = Counts(log_every_s=float("inf")), time.perf_counter()
    total = count_samples([inputs[u.index] for u in todo]) if all("://" not in inputs[u.index] for u in todo) else None

    def results(url: str, bar):
        for _, sample in read_tar(url, counts):
            encoded = encode_set(sample, codec, text, opt, fp["id"], fp["model_dir"], getattr(torch, dtype),
                                 device, counts)
            bar.update(1)
            yield SetResult(None, reject="skipped") if encoded is None else SetResult(*encoded)

    written = {"sets": 0, "images": 0}
    with tqdm(total=total, unit="set", desc=f"jedi-data encode {worker}/{n_workers}", disable=not progress,
              dynamic_ncols=True) as bar:
        for unit in todo:
            stats = out.write_unit(unit, results(inputs[unit.index], bar))
            written["sets"] += stats["sets"]
            written["images"] += stats["images"]
    done = [s for u in units if (s := out.unit_stats(u)) is not None]
    manifest = {"tool": "jedi-data encode", "schema_version": SCHEMA_VERSION, "fingerprint": fp, "dtype": dtype,
                "crop": "center", "complete": len(done) == len(units), "inputs": inputs,
                "shards": [{k: s[k] for k in ("file", "sets", "images", "bytes")} for s in done],
                "sets": sum(s["sets"] for s in done)}
    atomic_write_text(out.dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return {"out_dir": str(out.dir), "worker": f"{worker}/{n_workers}", "written": len(todo),
            "skipped_complete": len(mine) - len(todo), **written, "skipped": dict(counts.skipped),
            "seconds": round(time.perf_counter() - t0, 2), "fingerprint": fp["id"], "dtype": dtype,
            "complete": manifest["complete"]}


def _plan_inputs(out, config: dict[str, Any], urls: list[str]) -> list[str]:
    """Every input shard ever encoded into `out`, in the order of their output shards: the known ones keep
    their numbers, new ones are appended (a growing dataset is encoded incrementally). A directory encoded
    with another model / dtype / resolution is refused in one line (no shard list in it)."""
    from data_pipelines.synth.writer import SynthError
    from jedi_common.atomic import atomic_write_text

    def read(name):
        try:
            return json.loads((out.state / name).read_text())
        except (OSError, ValueError):
            return None

    old = read("config.json")
    known = read("inputs.json")
    if isinstance(old, dict):
        legacy = old.pop("inputs", None)  # encoded before appending was possible: the inputs sat in the config
        if known is None:
            known = legacy
        if old != config:
            diff = ", ".join(f"{k} {old.get(k)!r} -> {config.get(k)!r}" for k in sorted(set(old) | set(config))
                             if old.get(k) != config.get(k))
            made = (read("../manifest.json") or {}).get("fingerprint", {}).get("model_dir")
            raise SynthError(f"OUT_DIR {out.dir} holds encodings made with a different config ({diff}"
                             f"{f'; model {made}' if made else ''}); to add shards use the same --model, --dtype and "
                             f"--resolution, else another OUT_DIR (or delete {out.dir} to re-encode)")
    inputs = list(known or [])
    inputs += [u for u in dict.fromkeys(urls) if u not in set(inputs)]
    (out.state / "units").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.state / "inputs.json", json.dumps(inputs, indent=1) + "\n")  # before the config
    out.prepare(config)
    return inputs


def add_parser(sub) -> None:
    p = sub.add_parser("encode", help="cache latents + text embeddings of set shards for one model")
    p.add_argument("paths", nargs="+", metavar="IN_URLS... OUT_DIR", help="input shard patterns, then the output dir")
    p.add_argument("--model", required=True, help="the diffusers model directory training will use")
    p.add_argument("--dtype", default="float16", help="storage dtype: float16 | bfloat16 | float32")
    p.add_argument("--resolution", type=int, default=None, help="default: the model's (FLUX: required)")
    p.add_argument("--num-shards", type=int, default=None, help="split the shards over N processes "
                   "(default: SLURM_ARRAY_TASK_COUNT or 1)")
    p.add_argument("--shard-index", type=int, default=None, help="this process's share, 0..N-1 "
                   "(default: SLURM_ARRAY_TASK_ID or 0)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--prefix", default="sets", help="output shard names: PREFIX-000000.tar, ...")
    p.add_argument("--allow-pipe", action="store_true", help="allow pipe: URLs (they run shell commands)")
    p.add_argument("--no-progress", action="store_true")


def main(args) -> int:
    from data_pipelines.synth.writer import SynthError

    if len(args.paths) < 2:
        print("jedi-data: error: encode needs input shard patterns and then OUT_DIR (jedi-data encode 'DIR/*.tar' "
              "OUT_DIR --model MODEL_DIR)", file=sys.stderr)
        return 2
    try:
        s = run(args.paths[:-1], args.paths[-1], args.model, args.dtype, args.resolution, args.num_shards,
                args.shard_index, args.device, args.prefix, args.allow_pipe, not args.no_progress)
    except Exception as e:  # user errors and disk trouble: one line; anything else: the traceback
        from jedi_common.errors import report_error

        if not report_error(e, "jedi-data", "OUT_DIR", (FileNotFoundError, ValueError, SynthError),
                            explain=lambda x: f"encode: {x}" if isinstance(x, (FileNotFoundError, ValueError,
                                                                                 SynthError)) else None):
            raise
        return 2
    skipped = ", ".join(f"{k}={v}" for k, v in s["skipped"].items()) or "none"
    print(f"jedi-data encode: {s['written']} shard(s) written, {s['skipped_complete']} already complete "
          f"(worker {s['worker']}); {s['sets']} sets / {s['images']} images in {s['seconds']} s; skipped: "
          f"{skipped}; {s['dtype']}, fingerprint {s['fingerprint']} -> {s['out_dir']}"
          f"{'' if s['complete'] else ' (other shards pending)'}")
    return 0
