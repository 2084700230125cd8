"""Writes nobody ever sees half-done: a temp file or dir beside the destination, renamed into place.

Temp names sit in the destination directory (os.replace is atomic only within a filesystem) and are hidden.
- `atomic_path` / `atomic_write_text`: one file (`.name.partial-<pid>.ext`: it keeps the extension, which PIL
  and matplotlib read the format from), removed if the block fails;
- `staged_dir` / `publish`: a whole directory (exports, sample folders, DeepSpeed checkpoints) staged as
  `.name.partial-<pid>-...` and published when complete; `remove_partials` clears what a killed writer left.
Checkpoint files (jedi_train/training/checkpoints.atomic_save) are written through atomic_path, fsynced.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile

PARTIAL = ".partial-"  # temp files/dirs are ".<name>.partial-<pid>...": hidden, and never a final name


@contextlib.contextmanager
def atomic_path(path, fsync: bool = False):
    """Yield a temp path to write; when the block ends without error it becomes `path` (fsync: flushed to
    disk first, for files a crash must not lose), else it is removed."""
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    ext = os.path.splitext(name)[1]
    tmp = os.path.join(directory, f".{name}{PARTIAL}{os.getpid()}{ext}")  # remove_partials finds a killed one
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    if fsync:  # make the rename itself durable
        with contextlib.suppress(OSError):
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def atomic_write_text(path, text: str) -> bool:
    """Write `text` to `path` atomically. Returns False (and touches nothing) if the content is unchanged."""
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return False
    with atomic_path(path, fsync=True) as tmp, open(tmp, "w") as f:
        f.write(text)
    return True


def publish(tmp: str, path: str) -> None:
    """Put the finished file or directory `tmp` at `path`, replacing what is there. A directory cannot be
    renamed over another one: the old one is moved aside (a hidden name) first, then removed."""
    directory, name = os.path.split(os.path.abspath(path))
    old = os.path.join(directory, f".{name}{PARTIAL}old-{os.getpid()}")
    if os.path.isdir(path) and not os.path.islink(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_partials(*dirs: str, name: str = "*", only_dead: bool = False) -> list[str]:
    """Temp files and dirs left by a save that was killed (they never carry a final name).
    only_dead: keep those of a live process (a directory other jobs publish into, e.g. exports): their
    names hold the writer's pid (`.<name>.partial-<pid>...`)."""
    removed = []
    for d in dirs:
        for p in glob.glob(os.path.join(glob.escape(str(d)), f".{name}{PARTIAL}*")):
            if only_dead:
                pid = re.match(r"(?:old-)?(\d+)", os.path.basename(p).split(PARTIAL, 1)[1])
                if pid is None or _pid_alive(int(pid.group(1))):
                    continue
            with contextlib.suppress(OSError):
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
                removed.append(p)
    return removed


@contextlib.contextmanager
def staged_dir(out_dir: str):
    """A temp dir beside out_dir (same filesystem), published as out_dir when the block ends without error
    (readers see the old or the new directory, never a half-written one). Temp dirs of killed writers into
    the same place are removed first."""
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    remove_partials(parent, name=name, only_dead=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}{PARTIAL}{os.getpid()}-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the published dir should not be
    try:
        yield tmp
        publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
