"""Disk trouble (read-only, full, no permission) as one line, for every console script.

A full or read-only disk surfaces deep inside Hydra, Lightning, torch.save or PIL, often wrapped
(Hydra's InstantiationException, torch's "PytorchStreamWriter failed writing file" RuntimeError).
`disk_error` finds it anywhere in the exception chain and says what happened, where, and the fix.
"""
from __future__ import annotations

import errno
import os
import shutil

_REASONS = {
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
_TORCH_WRITE = ("PytorchStreamWriter failed writing", "file write failed", "unexpected pos")


def _chain(e: BaseException | None):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _free(path: str | None) -> str:
    probe = os.path.abspath(path) if path else None
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        return f" ({shutil.disk_usage(probe).free / 2**20:.0f} MiB free there)" if probe else ""
    except OSError:
        return ""


def disk_error(e: BaseException, where: str = "the output directory") -> str | None:
    """One line if `e` (or what caused it) is a read-only / full / forbidden disk, else None.
    `where`: the option the user changes to write elsewhere (e.g. 'paths.output_dir', '--out')."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in _REASONS:
            path = x.filename or ""
            fix = "free some space" if x.errno in (errno.ENOSPC, errno.EDQUOT) else "choose a writable place"
            return (f"cannot write {path or 'a file'}: {_REASONS[x.errno]}{_free(path) if fix.startswith('free') else ''}"
                    f"; {fix}, or set {where} to another disk (nothing half-written was kept)")
        if isinstance(x, RuntimeError) and any(s in str(x) for s in _TORCH_WRITE):
            return (f"writing a checkpoint failed ({str(x).splitlines()[0][:120]}): usually a full disk; free some "
                    f"space or set {where} to another disk (nothing half-written was kept)")
    return None


def missing(path: str) -> str:
    """Why an absent `path` cannot be opened, in words: a symlink loop and a dangling link are not
    'does not exist' to the user who sees the name in `ls`."""
    if os.path.islink(path):
        try:
            os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return "is a symlink loop (following it leads back to itself)"
            return f"is a broken symlink (to {os.readlink(path)}, which does not exist)"
    return "does not exist"


def open_reason(e: BaseException) -> str:
    """The skip reason for a shard that could not be opened (counted and logged by the stream)."""
    if isinstance(e, OSError) and e.errno == errno.ELOOP:
        return "symlink_loop"
    if isinstance(e, FileNotFoundError):
        return "not_found"
    if isinstance(e, PermissionError):
        return "no_permission"
    if isinstance(e, IsADirectoryError):
        return "not_a_file"
    return "open_failed"
