"""Read a W&B offline run file (run-<id>.wandb) back, for tests.

wandb 0.31 has no public reader. The file is a LevelDB-style log: a 7-byte file header
(':W&B', magic 0xBEE1, version), then 32 KiB blocks of records, each with a 7-byte header
(crc32, length, type FULL/FIRST/MIDDLE/LAST); payloads are `wandb_internal_pb2.Record` protobufs.
"""
from __future__ import annotations

import glob
import json
import os
import struct

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    pos, chunks = 7, []  # skip the file header
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # trailer padding at the end of a block
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        chunk = data[pos:pos + length]
        pos += length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            chunks = [chunk]
        elif kind == MIDDLE:
            chunks.append(chunk)
        elif kind == LAST:
            chunks.append(chunk)
            yield b"".join(chunks)


def read_run(run_dir_or_file: str) -> dict:
    """-> {"history": [row dicts], "config": {key: value}, "summary": {...}, "files": [paths], "run_id": str,
    "artifacts": [{"name", "type", "aliases", "files", "metadata"}]}"""
    from wandb.proto import wandb_internal_pb2 as pb

    path = run_dir_or_file
    if os.path.isdir(path):
        path = glob.glob(os.path.join(path, "run-*.wandb"))[0]
    out = {"history": [], "config": {}, "summary": {}, "files": [], "run_id": None, "artifacts": []}
    with open(path, "rb") as f:
        data = f.read()
    for payload in _payloads(data):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                   for i in rec.history.item})
        elif kind == "config":
            for i in rec.config.update:
                out["config"][i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
        elif kind == "summary":
            for i in rec.summary.update:
                out["summary"][i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
        elif kind == "files":
            out["files"] += [f.path for f in rec.files.files]
        elif kind == "artifact":
            a = rec.artifact
            out["artifacts"].append({"name": a.name, "type": a.type, "aliases": list(a.aliases),
                                     "files": [e.path for e in a.manifest.contents],
                                     "metadata": json.loads(a.metadata or "{}")})
        elif kind == "run":
            out["run_id"] = rec.run.run_id
    return out
