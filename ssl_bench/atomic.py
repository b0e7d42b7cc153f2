"""The one atomic file write: every record, checkpoint, cache and table goes through here.

    write into a temp file in the target's directory -> flush + fsync it -> rename (or link) it onto the
    target -> fsync the directory

A reader sees the old file or the new one, never half of one, and after a crash (power loss included)
the rename is durable. A write that fails (a full disk, a quota, an I/O error) removes the temp file,
leaves the previous file as it was and raises :class:`WriteFailed`, one line naming both.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from ssl_bench.errors import UserError

TEMP_PREFIX = ".tmp-"  # temp files start with this; a crash may leave one behind, never a torn target
# temp names carry their writer (host, pid), so a later process can tell a dead writer's leftover from a live write
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


class WriteFailed(UserError):
    """A file could not be written (disk full, ...); the previous version, if any, is untouched."""


def make_folder(path: str | Path, option: str | None = None) -> Path:
    """``path`` and its missing parents; a folder the file system refuses (no permission, a read-only mount, a
    file in the way) is one line naming it, and ``option``, the command-line option that chose it, if any."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteFailed(f"cannot create folder {path}: {exc.strerror or exc}; {_folder_fix(option)}") from None
    return path


def check_can_make(path: str | Path, option: str | None = None) -> None:
    """Whether ``make_folder(path)`` would succeed, without making anything: for a command that writes its
    folder only at the end, so that a bad one is one line before the work, not after it."""
    path, fix = Path(path).absolute(), _folder_fix(option)
    ancestor = next(p for p in (path, *path.parents) if p.exists())
    if not ancestor.is_dir():
        raise WriteFailed(f"cannot create folder {path}: {ancestor} is a file; {fix}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise WriteFailed(f"cannot create folder {path}: no permission to write to {ancestor}; {fix}")


def _folder_fix(option: str | None) -> str:
    """What to do about a folder that cannot be made: the fix a one-line error ends with."""
    return f"pass {option} a folder you can write to" if option else "check that you can write to its parent"


def fsync_dir(directory: str | Path) -> None:
    """Make a rename in ``directory`` durable (POSIX: the entry lives in the directory's data)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _failed(path: Path, exc: OSError) -> WriteFailed:
    kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
    reason = exc.strerror or exc.__class__.__name__
    return WriteFailed(f"could not write {path} ({reason}); {kept}; free space or fix the directory and rerun")


def _writer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete the temp files under ``directory`` left by writers that died mid-write (``kill -9``, power
    loss): those written on this host by a process that no longer runs. A live writer's temp file, or
    one from another host (a shared file system), is left alone. Returns what was removed."""
    removed = []
    for path in Path(directory).rglob(f"{TEMP_PREFIX}*"):
        parts = path.name[: len(path.name) - len(path.suffix)].rsplit("-", 3)  # .tmp-<stem>, host, pid, uuid
        if len(parts) != 4 or parts[1] != _HOST or not parts[2].isdigit() or _writer_alive(int(parts[2])):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


class Staged:
    """A temp file beside ``target``: ``tmp`` is filled by the caller; ``path`` is where it ended up."""

    def __init__(self, target: Path):
        self.target = target
        self.tmp = target.with_name(f"{TEMP_PREFIX}{target.stem}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}{target.suffix}")
        self.path: Path | None = None


@contextlib.contextmanager
def staged(path: str | Path, new_names: Iterable[Path] | None = None) -> Iterator[Staged]:
    """Yields a :class:`Staged` whose ``tmp`` the caller fills (by name: ``torch.save``, ``np.save``, a
    memmap...). On a clean exit ``tmp`` is fsynced and renamed onto ``path``; with ``new_names`` it is
    instead linked to the first of them that does not exist yet (never replacing a file). ``.path`` then
    names the file written. On any error the temp file is removed and ``path`` is untouched."""
    path = Path(path)
    make_folder(path.parent)
    stage = Staged(path)
    try:
        yield stage
        _fsync_file(stage.tmp)
        if new_names is None:
            os.replace(stage.tmp, path)
            stage.path = path
        else:
            stage.path = _link_first_free(stage.tmp, new_names)
        fsync_dir(path.parent)
    except FileExistsError:
        raise
    except OSError as exc:
        raise _failed(path, exc) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stage.tmp)


def _link_first_free(tmp: Path, names: Iterable[Path]) -> Path:
    for name in names:
        try:
            os.link(tmp, name)  # fails if the name exists: two writers both keep their files
            return name
        except FileExistsError:
            continue
    raise FileExistsError(f"every name offered for {tmp.name} is taken")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], new_names: Iterable[Path] | None = None) -> Path:
    """Replace ``path`` atomically with what ``write(f)`` writes into a binary file; with ``new_names``,
    publish under the first of them that is free instead (see :func:`staged`). Returns the path written."""
    with staged(path, new_names) as stage:
        with open(stage.tmp, "wb") as f:
            write(f)
            f.flush()
    return stage.path
