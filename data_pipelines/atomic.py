"""One way to write a file so that nobody ever sees it half-written: a temp file beside it, renamed.

The temp file sits in the destination directory (os.replace is atomic only within a filesystem), is
hidden (`.name.tmp-<pid>.ext`: it keeps the extension, which PIL and matplotlib read the format from)
and is removed if the block fails. Checkpoints (jedi_train/checkpoints.py) and export directories
(jedi_train/export.py staged_dir) follow the same rule with their own fsync / directory handling.
"""
from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def atomic_path(path, fsync: bool = False):
    """Yield a temp path to write; when the block ends without error it becomes `path` (fsync: flushed to
    disk first, for files a crash must not lose), else it is removed."""
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    tmp = os.path.join(directory, f".{stem}.tmp-{os.getpid()}{ext}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def atomic_write_text(path, text: str) -> bool:
    """Write `text` to `path` atomically. Returns False (and touches nothing) if the content is unchanged."""
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return False
    with atomic_path(path, fsync=True) as tmp, open(tmp, "w") as f:
        f.write(text)
    return True
