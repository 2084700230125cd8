"""Disk trouble (read-only, full, no permission) as one line, for every console script.

A full or read-only disk surfaces deep inside Hydra, Lightning, torch.save or PIL, often wrapped
(Hydra's InstantiationException, torch's "PytorchStreamWriter failed writing file" RuntimeError).
`disk_error` finds it anywhere in the exception chain and says what happened, where, and the fix.
`one_line` / `report_error` / `cli_errors`: the one "user error or disk trouble -> one line on stderr,
exit 2; anything else -> traceback" rule that jedi-train, -synth, -sample, -eval and -export share.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
from collections.abc import Callable

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


def one_line(e: BaseException, where: str, user_errors: tuple[type[BaseException], ...] = (),
             explain: Callable[[BaseException], object] | None = None) -> str | None:
    """What a console script says about `e` on its one error line, or None: not the user's fault nor the
    disk's, so the traceback is wanted. Tried in order: `explain(e)` (a message, or None to pass), the
    disk (`disk_error`, naming `where`), then `str(e)` if `e` is one of `user_errors`.
    The result is whitespace-collapsed: one line, whatever the source wrapped."""
    line = explain(e) if explain is not None else None
    if line is None:
        line = disk_error(e, where=where)
    if line is None and isinstance(e, user_errors):
        line = e
    return None if line is None else " ".join(str(line).split())


def report_error(e: BaseException, prog: str, where: str, user_errors: tuple[type[BaseException], ...] = (),
                 explain: Callable[[BaseException], object] | None = None) -> bool:
    """Print `PROG: error: LINE` to stderr and return True if `e` has a `one_line`; False (print nothing)
    if not: the caller re-raises (bare `raise`, so the traceback is the original one). For a `main`
    that returns its exit status: `except Exception as e: if not report_error(...): raise; return 2`."""
    line = one_line(e, where, user_errors, explain)
    if line is None:
        return False
    print(f"{prog}: error: {line}", file=sys.stderr)
    return True


@contextlib.contextmanager
def cli_errors(prog: str, where: str, user_errors: tuple[type[BaseException], ...] = (),
               explain: Callable[[BaseException], object] | None = None):
    """`with cli_errors("jedi-x", "--out", (ValueError,)):` -- user errors and disk trouble inside the block:
    `report_error`'s line and SystemExit(2); anything else propagates unchanged (its traceback too)."""
    try:
        yield
    except Exception as e:
        if not report_error(e, prog, where, user_errors, explain):
            raise
        sys.exit(2)


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
