"""Where sets come from: URL patterns with weights -> shard lists -> raw (undecoded) samples.

A source is a URL pattern and a sampling weight. Patterns are brace-expanded (webdataset's
`expand_urls`, which also splits on '::'); local patterns may also be globs. Remote URLs open
through webdataset's `gopen` (http/https via curl, gs via gsutil, ...) and other schemes (s3, ...)
through fsspec. `pipe:` URLs run a shell command, so they are refused unless explicitly allowed.

`read_tar` yields the raw samples of one shard, numbered, and turns every way a shard can be broken
(not a tar, truncated, unreadable) into a counted reason instead of an exception.
"""
from __future__ import annotations

import glob
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from webdataset.gopen import gopen, gopen_schemes
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from jedi_common.errors import open_reason
from data_pipelines.skips import Counts


@dataclass(frozen=True)
class Source:
    urls: tuple[str, ...]
    weight: float = 1.0
    pattern: str = ""


def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def expand_pattern(pattern: str, allow_pipe: bool = False) -> list[str]:
    urls = []
    for url in expand_urls(str(pattern)):
        if url.startswith("pipe:") and not allow_pipe:
            raise ValueError(f"refusing {url!r}: pipe: URLs run shell commands; set data.allow_pipe=true "
                             "if you trust this config")
        if _is_local(url) and glob.has_magic(url):
            urls.extend(sorted(glob.glob(url.removeprefix("file://"))))
        else:
            urls.append(url)
    return urls


def expand_sources(sources: Any, allow_pipe: bool = False) -> list[Source]:
    """`sources`: a pattern string, a list of patterns, or a list of {url, weight} mappings."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    out = []
    for s in sources or []:
        pattern, weight = (s, 1.0) if isinstance(s, (str, os.PathLike)) else (s["url"], float(s.get("weight", 1.0)))
        if weight < 0:
            raise ValueError(f"source {pattern}: weight must be >= 0, got {weight}")
        urls = expand_pattern(str(pattern), allow_pipe)
        if not urls:
            raise FileNotFoundError(f"data source {pattern!r} matches no shards")
        out.append(Source(tuple(urls), weight, str(pattern)))
    if not out:
        raise ValueError("no data sources given; set data.sources to one or more shard URL patterns")
    if sum(s.weight for s in out) <= 0:
        raise ValueError("data source weights sum to 0; give at least one source a positive weight")
    return out


def open_url(url: str):
    scheme = urlparse(url).scheme
    if scheme in ("", "file") or scheme in gopen_schemes:
        return gopen(url)
    import fsspec  # s3://, az://, ... (needs the matching fsspec backend, e.g. s3fs)

    return fsspec.open(url, "rb").open()


def _tar_error_reason(exc: BaseException, files_read: int) -> str:
    """A tar that breaks after some members is (nearly always) cut short; one that breaks before any is not a tar."""
    msg = str(exc).lower()
    if isinstance(exc, (tarfile.TarError, EOFError)):
        return "truncated_tar" if files_read or "unexpected end" in msg else "not_tar"
    return "read_error"


def read_tar(url: str, counts: Counts, skip: int = 0) -> Iterator[tuple[int, dict]]:
    """(index, raw sample) for the samples of one shard, from index `skip` on.

    The first `skip` samples are read but not returned, and errors met before they are all read are
    not counted: a resumed stream re-reads them and they were counted the first time.
    """
    produced = 0

    def reason(name: str, detail: str) -> None:
        if produced >= skip:
            counts.skip(name, f"{url}: {detail}")

    def files(stream) -> Iterator[dict]:
        n = 0
        try:
            for f in tar_file_iterator(stream):
                n += 1
                f["__url__"] = url
                yield f
        except Exception as e:  # noqa: BLE001 - any broken shard must end this shard only
            reason(_tar_error_reason(e, n), repr(e))

    def on_group_error(e: Exception) -> bool:
        reason("duplicate_file" if "duplicate" in str(e) else "bad_tar_entry", repr(e))
        return True

    try:
        stream = open_url(url)
    except Exception as e:  # noqa: BLE001
        reason(open_reason(e), repr(e))
        return
    try:
        for sample in group_by_keys(files(stream), handler=on_group_error):
            index = produced
            produced += 1
            if index >= skip:
                yield index, sample
    finally:
        stream.close()


def count_samples(urls: Sequence[str]) -> int:
    """Samples (distinct keys) in local shards, from tar headers only (no data is read)."""
    total = 0
    for url in urls:
        if not _is_local(url):
            raise ValueError(f"cannot count the sets of remote shard {url} without reading it; set "
                             "data.epoch_sets (sets per epoch) explicitly")
        keys = set()
        try:
            with tarfile.open(url.removeprefix("file://"), "r:") as tar:
                for member in tar:
                    key = base_plus_ext(member.name)[0] if member.isreg() else None
                    if key is not None:
                        keys.add(key)
        except (tarfile.TarError, OSError, EOFError):
            pass  # broken shards hold what the stream will manage to read; estimating is enough here
        total += len(keys)
    return total
