"""Atomic file writes: a crash never leaves a half-written file under the final name.

Outputs that are whole directories are built beside their destination and swapped in only
on success (`staged_dir`), and nothing replaces a user's data unless asked to
(`overwrite=True`). Operating-system failures while writing (permissions, a read-only or
full disk, a directory in the way) become one `LmlabError` naming the path and the fix."""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator

from lmlab.errors import LmlabError

# What to do about each errno a write can hit; anything else gets the generic advice.
_FIXES = {
    errno.ENOSPC: "the disk is full: free some space or write somewhere else",
    errno.EDQUOT: "the disk quota is exhausted: free some space or write somewhere else",
    errno.EACCES: "permission denied: fix the permissions or choose a location you can write to",
    errno.EPERM: "operation not permitted: fix the permissions or choose a location you can write to",
    errno.EROFS: "the file system is read-only: choose a writable location",
    errno.EISDIR: "a directory is in the way where a file is expected: choose a file path",
    errno.ENOTDIR: "a file is in the way where a directory is expected: choose another path",
    errno.EEXIST: "something already exists there: choose another path",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
}


def os_error_message(e: OSError, path: str | os.PathLike, action: str = "write") -> str:
    """One line naming what failed, where, and how to fix it."""
    fix = _FIXES.get(e.errno, "check the path and try again")
    detail = e.strerror or str(e)
    if e.filename is not None and str(e.filename) != str(path):
        detail += f" ({e.filename})"
    return f"cannot {action} {path}: {detail}; {fix}"


@contextmanager
def os_errors(path: str | os.PathLike, action: str = "write") -> Iterator[None]:
    """Turn an OSError raised in the block into an LmlabError about `path`."""
    try:
        yield
    except LmlabError:
        raise
    except OSError as e:
        raise LmlabError(os_error_message(e, path, action)) from e


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once at import, before any threads write.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it into place
    with the permissions a plain open() would give (mkstemp's are owner-only). An OSError
    (here or in the block) leaves `path` untouched and is raised as an LmlabError."""
    path = Path(path)
    tmp_path: Path | None = None
    with os_errors(path):
        if path.is_dir():
            raise LmlabError(f"cannot write {path}: it is a directory; choose a file path")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmp_path = Path(tmp)
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp_path, 0o666 & ~UMASK)
            os.replace(tmp_path, path)
            fsync_dir(path.parent)
        finally:
            if tmp_path is not None and tmp_path.exists():
                tmp_path.unlink()


# ---------------------------------------------------------------------------------------
# Outputs that must not replace someone else's data
# ---------------------------------------------------------------------------------------


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def refuse_inputs(dest: str | os.PathLike, inputs: Iterable[str | os.PathLike], what: str = "output") -> None:
    """An output equal to an input, or inside an input directory, would write over what is
    being read: always refused."""
    out = Path(dest).resolve()
    for given in inputs:
        src = Path(given).resolve()
        if out == src:
            raise LmlabError(f"the {what} {dest} is also an input; write to a new path instead")
        if src.is_dir() and _inside(out, src):
            raise LmlabError(f"the {what} {dest} is inside the input {given}; write outside it instead")


def check_output_file(path: str | os.PathLike, overwrite: bool = False,
                      is_ours: Callable[[Path], bool] | None = None,
                      inputs: Iterable[str | os.PathLike] = (), what: str = "output file") -> Path:
    """Refuse before any work starts: an output file that is an input, a directory, or an
    existing non-empty file not recognised by `is_ours` (a previous output of the same
    kind), unless `overwrite`. Returns the path."""
    path = Path(path)
    refuse_inputs(path, inputs, what)
    if path.is_dir():
        raise LmlabError(f"the {what} {path} is a directory; give a file path")
    if path.exists() and not overwrite and path.stat().st_size > 0 and not (is_ours and is_ours(path)):
        raise LmlabError(f"the {what} {path} already exists and would be replaced; choose a new path "
                         "or pass overwrite (--overwrite) to replace it")
    return path


STAGING_TAG = ".lmlab-staging-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_staging(dest: Path) -> None:
    """Staging directories of killed builds (their pid is in the name) are removed."""
    prefix = f".{dest.name}{STAGING_TAG}"
    if not dest.parent.is_dir():
        return
    for old in dest.parent.glob(f"{prefix}*"):
        pid = old.name[len(prefix):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


def _foreign(dest: Path, owned: Callable[[Path], Collection[str]] | None) -> list[str]:
    if not dest.is_dir():
        return []
    mine = set(owned(dest)) if owned else set()
    return sorted(p.name for p in dest.iterdir() if p.name not in mine)


@contextmanager
def staged_dir(dest: str | os.PathLike, overwrite: bool = False,
               owned: Callable[[Path], Collection[str]] | None = None, marker: str | None = None,
               inputs: Iterable[str | os.PathLike] = (), what: str = "output directory") -> Iterator[Path]:
    """Yield an empty directory beside `dest` to build into; on success it becomes `dest`.

    `owned(dest)` names the entries of `dest` a previous build of the same command wrote
    (a manifest and the files it lists). Then:
    - `dest` missing, empty, or holding only owned entries: the build replaces it whole
      (two renames; the old build is deleted only after the new one is in place);
    - `dest` holding anything else is refused before any work, unless `overwrite`; then
      the new files replace same-named ones one by one, stale owned entries are removed,
      and every other entry is left alone. `marker` (the file whose presence means
      "complete") is removed first and moved in last, so a crash midway leaves `dest`
      visibly incomplete rather than mixed.
    `dest` equal to or inside one of `inputs` is always refused. On any error the staging
    directory is removed and `dest` is untouched; OSErrors become LmlabErrors."""
    dest = Path(dest)
    refuse_inputs(dest, inputs, what)
    if dest.exists() and not dest.is_dir():
        raise LmlabError(f"the {what} {dest} exists and is not a directory; choose another path")
    foreign = _foreign(dest, owned)
    if foreign and not overwrite:
        listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise LmlabError(f"the {what} {dest} is not empty (it holds {listed}) "
                         "and lmlab did not write it; choose a new directory, or pass overwrite (--overwrite) "
                         "to replace only the files this command writes")
    staging: Path | None = None
    try:
        with os_errors(dest):
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                _remove_dead_staging(dest)
                staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}{STAGING_TAG}{os.getpid()}-", dir=dest.parent))
                os.chmod(staging, 0o777 & ~UMASK)
                yield staging
                _commit(staging, dest, owned, marker, overwrite)
            finally:
                if staging is not None and staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
    except LmlabError as e:
        # Name the destination the user gave, not the hidden staging directory.
        if staging is not None and str(staging) in str(e):
            raise LmlabError(str(e).replace(str(staging), str(dest))) from e
        raise


def _commit(staging: Path, dest: Path, owned, marker: str | None, overwrite: bool) -> None:
    foreign = _foreign(dest, owned)
    if not foreign:
        old = None
        if dest.exists():
            if any(dest.iterdir()):
                old = dest.with_name(staging.name + "-old")
                os.replace(dest, old)
            else:
                dest.rmdir()
        os.replace(staging, dest)
        fsync_dir(dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return
    if not overwrite:  # someone wrote into dest while we were building
        raise LmlabError(f"{dest} gained files lmlab did not write ({', '.join(foreign[:3])}) during the build; "
                         "nothing was changed there; choose a new directory or pass overwrite (--overwrite)")
    new = sorted(p.name for p in staging.iterdir())
    stale = set(owned(dest)) - set(new) if owned else set()
    if marker and (dest / marker).exists():
        (dest / marker).unlink()
    for name in stale:
        target = dest / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    for name in sorted(new, key=lambda n: n == marker):  # the marker last
        target = dest / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(staging / name, target)
    fsync_dir(dest)


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------


def _check_readable_file(path: Path, missing: str) -> None:
    if path.is_dir():
        raise LmlabError(f"{path} is a directory, but a file is expected: {missing}")
    if not path.is_file():
        raise LmlabError(f"{path} not found: {missing}")


def read_json(path: str | os.PathLike, missing: str) -> Any:
    """Parse a JSON file; a missing or malformed file is an LmlabError (`missing` says what
    the file should be and how to get one)."""
    path = Path(path)
    _check_readable_file(path, missing)
    with os_errors(path, "read"):
        raw = path.read_bytes()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise LmlabError(f"{path}:{line}: not UTF-8 text (byte {e.start}); re-save it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise LmlabError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); repair or regenerate it") from None


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line of a UTF-8 file; a line that is not UTF-8 is an
    LmlabError naming file:line (decoding line by line is what makes the number exact)."""
    path = Path(path)
    _check_readable_file(path, "give a text file")
    with os_errors(path, "read"), open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LmlabError(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line); "
                                 "re-save the file as UTF-8 or remove that line") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of a JSONL file; a malformed, truncated
    or non-UTF-8 line is an LmlabError naming file:line."""
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise LmlabError(f"{path}:{lineno}: malformed JSON ({e.msg}); fix or delete that line") from None


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Any]) -> int:
    """Write one JSON value per line, atomically; return how many lines were written."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
