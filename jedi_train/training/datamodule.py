"""JeDiDataModule: the set stream (data_pipelines/stream.py) as a LightningDataModule.

Its `state_dict()` holds every rank's stream position, so a Lightning checkpoint resumes the data
exactly where training stopped (see data_pipelines/resume.py). A batch counts as consumed when the
model receives it (`on_before_batch_transfer`), not when the loader hands it out: Lightning fetches
one batch ahead. `skip_counts()` / `repair_counts()` give the data problems met so far (this rank,
all workers); `global_counts()` sums them over ranks for logging.

Cached encodings (`jedi-data encode`): at setup, the first set of each source says whether it is cached
and for which encoders; with `use_cache` (default) the stream then hands the objective cached latents
+ text embeddings, after checking that their fingerprint is the trained model's (else one error naming
both models). Sources without a cache are encoded on the fly as before. `drop_text_encoders`: when every
source is cached, the text encoders are freed (the cache also holds the empty caption).
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from data_pipelines.resume import ResumableLoader, StreamState
from data_pipelines.shards import expand_sources
from data_pipelines.skips import merge
from data_pipelines.stream import SetStream, StreamConfig

log = logging.getLogger(__name__)
# Lightning warns that a mid-epoch checkpoint cannot resume a plain iterable loader; this one resumes
# through the DataModule's state_dict, so the warning would mislead
warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class JeDiDataModule(L.LightningDataModule):
    def __init__(self, sources: Any, resolution: int = 32, min_set: int = 2, max_set: int = 4, batch_size: int = 4,
                 num_workers: int = 2, resampled: bool = False, shuffle_buffer: int = 64, shardshuffle: bool = True,
                 epoch_sets: int | None = None, ref_count_probs: Sequence[float] = (0.1, 0.45, 0.35, 0.1),
                 crop: str = "random", flip_prob: float = 0.0, min_image_size: int = 16,
                 max_image_pixels: int = 100_000_000, allow_pipe: bool = False, seed: int = 0,
                 tokenizer: Any = None, model_dir: str | None = None, rank: int | None = None,
                 world_size: int | None = None, prefetch_factor: int = 2, pin_memory: bool = False,
                 log_every_s: float = 60.0, heldout_sources: Any = None,
                 synthesize_if_missing: dict | None = None, heldout_synthesize_if_missing: dict | None = None,
                 use_cache: bool = True, drop_text_encoders: bool = False, heldout_split: dict | None = None,
                 text_layout: str | None = None):
        super().__init__()
        self.cfg = StreamConfig(
            sources=sources, resolution=resolution, min_set=min_set, max_set=max_set, batch_size=batch_size,
            resampled=resampled, shuffle_buffer=shuffle_buffer, shardshuffle=shardshuffle, epoch_sets=epoch_sets,
            ref_count_probs=tuple(ref_count_probs), crop=crop, flip_prob=flip_prob, min_image_size=min_image_size,
            max_image_pixels=max_image_pixels, allow_pipe=allow_pipe, seed=seed, log_every_s=log_every_s)
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self.tokenizer, self.model_dir = tokenizer, model_dir
        self.text_layout = text_layout  # the family's (text.PromptEncoder): FLUX.2 wraps captions in a chat prompt
        self.rank, self.world_size = rank, world_size
        self.heldout_sources, self.synthesize_if_missing = heldout_sources, synthesize_if_missing
        self.heldout_synthesize_if_missing = heldout_synthesize_if_missing
        self.use_cache, self.drop_text_encoders = use_cache, drop_text_encoders
        self.heldout_split = heldout_split  # {num_sets, seed}: see split_heldout
        self.heldout_only: frozenset | None = None  # the held-out split's set ids (split_heldout)
        self.cache_model: tuple[str, Any] | None = None  # (model_dir, Components): train.py sets it
        self._empty_text: dict | None = None
        self.loader: ResumableLoader | None = None
        self._pending: dict | None = None
        self._heldout: dict | None = None

    # -- Lightning hooks -------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Synthesize the configured sets once when no shard matches the sources (the demo's default)."""
        self._synthesize(self.cfg.sources, self.synthesize_if_missing)
        if self.heldout_sources:
            self._synthesize(self.heldout_sources, self.heldout_synthesize_if_missing)

    def _synthesize(self, sources: Any, synth_args: dict | None) -> None:
        if not synth_args:
            return
        try:
            expand_sources(sources, self.cfg.allow_pipe)
            return
        except FileNotFoundError as e:
            out_dir = os.path.abspath(str(synth_args.get("out_dir", "")))
            patterns = [str(x) if isinstance(x, (str, os.PathLike)) else str(x["url"])
                        for x in ([sources] if isinstance(sources, (str, os.PathLike)) else sources)]
            if not all(os.path.abspath(u).startswith(out_dir + os.sep) for u in patterns):
                # the user's own data: synthesizing into the demo's folder would not make it match
                raise FileNotFoundError(f"{e}; check the path (synthesis on first use fills only "
                                        f"{out_dir}, which this source is not in)") from None
        exe = shutil.which("jedi-synth", path=os.path.dirname(sys.executable)) or shutil.which("jedi-synth")
        cmd = [exe] if exe else [sys.executable, "-c",
                                 "import sys; from data_pipelines.synth.cli import main; sys.exit(main())"]
        args = dict(synth_args)
        extra = list(args.pop("overrides", None) or [])  # verbatim jedi-synth overrides, e.g. generator.layout=centered
        cmd += [f"{k}={v}" for k, v in args.items()] + extra
        log.info("no shards match %s: synthesizing with %s", sources, " ".join(cmd))
        subprocess.run(cmd, check=True)

    def setup(self, stage: str | None = None) -> None:
        if self.loader is not None:
            return
        rank, world = _dist_info()
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        self._rank = self.rank if self.rank is not None else rank
        self._world = self.world_size if self.world_size is not None else world
        self._setup_cache()
        stream = SetStream(self.cfg, tokenize=self._tokenize_fn(), rank=self._rank, world_size=self._world,
                           num_workers=self.num_workers, empty_text=self._empty_text)
        self.loader = ResumableLoader(stream, self.num_workers, prefetch_factor=self.prefetch_factor,
                                      pin_memory=self.pin_memory, auto_consume=False)
        if self._pending is not None:
            self._apply(self._pending)

    def train_dataloader(self) -> ResumableLoader:
        if self.loader is None:
            self.setup("fit")
        return self.loader

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.loader is not None and isinstance(batch, dict):
            self.loader.consume(batch)
        return batch

    # -- what the training loop logs ---------------------------------------------------------------
    def skip_counts(self) -> dict[str, int]:
        return self.loader.skip_counts() if self.loader else {}

    def repair_counts(self) -> dict[str, int]:
        return self.loader.repair_counts() if self.loader else {}

    def global_counts(self) -> dict[str, dict[str, int]]:
        """{"skipped": ..., "repaired": ...} summed over all ranks (each rank reads its own shards).
        Under torch.distributed this is collective: every rank must call it at the same step."""
        own = {"skipped": self.skip_counts(), "repaired": self.repair_counts()}
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return own
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, own)
        return {kind: merge(*(g[kind] for g in gathered)) for kind in own}

    # -- checkpoint --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """{"version", "world_size", "num_workers", "batch_size", "ranks": {rank: StreamState dict}}.

        Under torch.distributed every rank's position is gathered (Lightning builds checkpoints on
        every rank and writes rank 0's), so this must be called on all ranks together, as
        `trainer.save_checkpoint` is.
        """
        if self.loader is None:
            return dict(self._pending or {})
        own = self.loader.state.to_dict()
        ranks = {self._rank: own}
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (self._rank, own))
            ranks = dict(gathered)
        return {"version": 1, "world_size": self._world, "num_workers": self.num_workers,
                "batch_size": self.cfg.batch_size, "ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.loader is None:
            self._pending = state
        else:
            self._apply(state)

    def _apply(self, state: dict[str, Any]) -> None:
        ranks = {int(k): v for k, v in state.get("ranks", {}).items()}
        own = ranks.get(self._rank)
        same = (state.get("world_size"), state.get("num_workers"), state.get("batch_size")) == \
            (self._world, self.num_workers, self.cfg.batch_size)
        if own is None:
            log.warning("data state has no entry for rank %d: starting the data stream fresh", self._rank)
            return
        restored = StreamState.from_dict(own)
        if not same:  # positions only replay under the same layout; keep the epoch and the counts
            log.warning("data state was saved with world_size/num_workers/batch_size %s, now %s: resuming at the "
                        "start of epoch %d instead of mid-epoch",
                        (state.get("world_size"), state.get("num_workers"), state.get("batch_size")),
                        (self._world, self.num_workers, self.cfg.batch_size), restored.epoch)
            restored.fold_counts()
            restored.batches, restored.next_worker, restored.cursors = 0, 0, {}
        self.loader.state = restored

    # -- cached encodings --------------------------------------------------------------------------
    def _setup_cache(self) -> None:
        """Use the sources' cached encodings if there are any and they were made by the trained model's encoders."""
        from data_pipelines.stream import check_cache_options
        from jedi_train.training.encode import fingerprint, load_empty_prompt, mismatch_error, probe_cache

        if not self.use_cache:
            return
        probed = probe_cache(self.cfg.sources, self.cfg.allow_pipe)
        cached = [(url, info) for url, info in probed if info is not None]
        if not cached:
            return
        if self.cache_model is None:
            raise ValueError("the data sources hold cached encodings: the datamodule checks them against the trained "
                             "model's encoders (set dm.cache_model = (model_dir, components), as train.py does), or "
                             "set data.use_cache=false")
        model_dir, components = self.cache_model
        model = fingerprint(model_dir, components.codec, components.resolution)
        for url, info in cached:
            if info.get("fingerprint") != model["id"]:
                raise ValueError(mismatch_error(url, info, model))
        check_cache_options(self.cfg)
        self._empty_text = load_empty_prompt(cached[0][0])
        self.cfg.cache_fingerprint = model["id"]
        uncached = [url for url, info in probed if info is None]
        log.info("data: cached latents + text embeddings (fingerprint %s) for %d of %d sources", model["id"],
                 len(cached), len(probed))
        if self.drop_text_encoders:
            if uncached:
                raise ValueError(f"data.drop_text_encoders=true but {uncached[0]} holds no cached encodings; encode "
                                 "it with `jedi-data encode`, or set data.drop_text_encoders=false")
            components.drop_text_encoders()

    # -- helpers -----------------------------------------------------------------------------------
    def _tokenize_fn(self):
        """captions -> token ids: the given tokenizer (or list of them: SDXL has two), else those in model_dir.
        Only tokenizers go to the loader workers, never the text encoders."""
        from jedi_train.models.text import layout_token_ids

        if self.tokenizer is None:
            if self.model_dir is None:
                raise ValueError("JeDiDataModule needs a tokenizer object or model_dir (a diffusers SD directory "
                                 "with a tokenizer/ subfolder)")
            from jedi_train.models import families

            family = families.family_of_dir(self.model_dir)
            self.tokenizer = [family.tokenizer_class(i).from_pretrained(self.model_dir, subfolder=s)
                              for i, s in enumerate(family.tokenizers)]
            self.text_layout = self.text_layout or family.text_layout
        tokenizers = self.tokenizer if isinstance(self.tokenizer, list) else [self.tokenizer]
        return functools.partial(layout_token_ids, self.text_layout, tokenizers)

    # -- a held-out split of the user's own sources ------------------------------------------------------
    def split_heldout(self, run_dir: str) -> list[dict] | None:
        """When data.sources are the user's own (not the demo's synthesized sets) but the held-out sets are still
        the demo's procedural ones, hold out a fixed, seeded set of the user's subjects instead: they leave the
        training stream and become the held-out sets (sample grid, identity gain). Chosen once per run dir and
        recorded in RUN/heldout.json (a resumed run keeps it, even if shards were added). -> the held-out sets,
        or None when the configured held-out sets stay."""
        import json

        from data_pipelines.heldout import choose_heldout
        from jedi_common.atomic import atomic_write_text

        split = self.heldout_split or {}
        if not split.get("num_sets") or will_synthesize(self.cfg.sources, self.synthesize_if_missing) or \
                not will_synthesize(self.heldout_sources, self.heldout_synthesize_if_missing):
            return None
        path = os.path.join(run_dir, "heldout.json")
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            record = None
        if not record or record.get("sources") != _patterns(self.cfg.sources):
            sets = choose_heldout(self.cfg.sources, int(split["num_sets"]), int(split.get("seed", 0)),
                                  self.cfg.allow_pipe)
            record = {"what": "held-out split of data.sources: kept out of training, used by the sample grid and "
                              "the identity gain", "seed": int(split.get("seed", 0)),
                      "sources": _patterns(self.cfg.sources), "sets": sets}
            if (self.trainer is None or self.trainer.is_global_zero) and int(os.environ.get("RANK", "0")) == 0:
                atomic_write_text(path, json.dumps(record, indent=1) + "\n")
        sets = record["sets"]
        if not sets:
            return None
        self.heldout_sources, self.heldout_synthesize_if_missing = self.cfg.sources, None
        self.heldout_only = frozenset(s["set_id"] for s in sets)
        self.cfg.exclude_sets = self.heldout_only
        self.cfg.exclude_subjects = frozenset(s["subject"] for s in sets if s.get("subject"))
        names = ", ".join(s["set_id"] for s in sets[:8]) + (", ..." if len(sets) > 8 else "")
        log.warning("held-out sets: %d sets of your data.sources (seeded split, seed %d: %s), kept out of training "
                    "for the sample grid and identity gain; listed in %s", len(sets), record["seed"], names, path)
        return sets

    def heldout_batch(self, num_sets: int) -> dict | None:
        """The first `num_sets` sets of `heldout_sources` (center crop, fixed refs), or None if not configured."""
        if not self.heldout_sources:
            return None
        if self._heldout is None or len(self._heldout["set_id"]) != num_sets:
            self._heldout = self.fixed_batch(self.heldout_sources, num_sets, heldout=True)
        return self._heldout

    def fixed_batch(self, sources: Any, num_sets: int, set_size: int | None = None,
                    num_refs: int | None = None, heldout: bool = False) -> dict | None:
        """The first `num_sets` sets of `sources` in shard order (center crop, no flip): the same sets on
        every call. set_size / num_refs: every set cut to exactly that many images / references (sets
        too small are skipped). heldout: these are the held-out sets (with a held-out split: only its sets)."""
        over: dict[str, Any] = {"sources": sources, "resampled": False, "shuffle_buffer": 1, "shardshuffle": False,
                                "crop": "center", "flip_prob": 0.0, "batch_size": num_sets, "epoch_sets": num_sets}
        if heldout and self.heldout_only is not None:  # the held-out split's sets only
            num_sets = min(num_sets, len(self.heldout_only))
            over.update(only_sets=self.heldout_only, exclude_sets=None, exclude_subjects=None, batch_size=num_sets,
                        epoch_sets=num_sets)
        if set_size is not None:
            over.update(min_set=set_size, max_set=set_size)
        if num_refs is not None:
            over["ref_count_probs"] = tuple([0.0] * num_refs + [1.0])
        cfg = StreamConfig(**{**vars(self.cfg), **over})
        if self._empty_text is None:  # setup did not check the cache: these sets are encoded on the fly
            cfg.cache_fingerprint = None
        loader = ResumableLoader(SetStream(cfg, tokenize=self._tokenize_fn(), empty_text=self._empty_text), 0)
        return next(iter(loader), None)


def _patterns(sources: Any) -> list[str]:
    return [str(x) if isinstance(x, (str, os.PathLike)) else str(x["url"])
            for x in ([sources] if isinstance(sources, (str, os.PathLike)) else sources)]


def will_synthesize(sources: Any, synth_args: dict | None) -> bool:
    """True when missing `sources` are filled by synthesis on first use: every pattern lies in its out_dir
    (the demo's procedural sets); a user's own paths never are."""
    if not synth_args or not sources:
        return False
    out_dir = os.path.abspath(str(synth_args.get("out_dir", "")))
    return all(os.path.abspath(u).startswith(out_dir + os.sep) for u in _patterns(sources))


def check_sources(data: dict) -> None:
    """data.sources / data.heldout_sources that match nothing and will not be synthesized: FileNotFoundError
    naming the pattern, before anything is built or created (jedi-train checks this before Hydra starts)."""
    for key, synth in (("sources", "synthesize_if_missing"), ("heldout_sources", "heldout_synthesize_if_missing")):
        sources = data.get(key)
        if not sources or will_synthesize(sources, data.get(synth)):
            continue
        try:
            for src in expand_sources(sources, bool(data.get("allow_pipe"))):
                for url in src.urls:
                    local = url.removeprefix("file://")
                    if "://" not in local and not local.startswith("pipe:") and not os.path.exists(local):
                        raise FileNotFoundError(f"data source {src.pattern!r}: {url} does not exist")
        except FileNotFoundError as e:
            synth_dir = (data.get(synth) or {}).get("out_dir")
            why = f" (synthesis on first use fills only {synth_dir}, which this source is not in)" if synth_dir else ""
            raise FileNotFoundError(f"data.{key}: {e}; check the path{why}, e.g. data.{key}='[{{url: "
                                    "/data/my_sets/*.tar}]'") from None


def build_datamodule(cfg, tokenizer=None, **overrides) -> JeDiDataModule:
    """The training app's entry: a `data` config (conf/data/*.yaml) + the model's tokenizer."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    kwargs = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    cls = get_class(kwargs.pop("_target_", "jedi_train.training.datamodule.JeDiDataModule"))
    return cls(**{**kwargs, **overrides}, tokenizer=tokenizer)
