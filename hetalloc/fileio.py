"""Files: atomic output (write to a temporary file beside the target, then rename: nothing
half-written is ever left at the target path, even if the process dies), and JSON input
whose problems are one-line errors naming the file.

A writer killed mid-write leaves only its temporary file (``.NAME.XXXXXXXX.tmp``), which
``remove_temporaries`` deletes. Files get the user's umask, as with ``open(path, "w")``.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from .errors import SpecError

TMP_SUFFIX = ".tmp"


def _temporary_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _temporary_name(path)
        try:
            # Not tempfile.mkstemp: it creates files 0600 whatever the umask. O_EXCL keeps
            # the name ours alone, mode 0666 lets the umask decide, as open() does.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (a crash after it must not bring back the old file)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)


def remove_temporaries(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete the temporary files that writers killed mid-write left in `directory` (of
    target `name` only, or of every target); returns what was deleted. Call it only when
    no other writer of those targets is running."""
    pattern = f".{name}.*{TMP_SUFFIX}" if name else f".*{TMP_SUFFIX}"
    removed = []
    for p in Path(directory).glob(pattern):
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """Stable JSON: fixed indentation, keys in the order the writer gave them."""
    return json.dumps(obj, indent=2) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, dumps_json(obj))


def read_text(path: str | os.PathLike, *, missing_fix: str, what: str = "file") -> str:
    """A text file's content. A missing file, a directory, an unreadable file or one that
    is not UTF-8 text raises SpecError naming the file, with the fix given."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(str(p), "", "file not found", missing_fix) from None
    except IsADirectoryError:
        raise SpecError(str(p), "", "is a directory, not a file", f"pass the {what} itself") from None
    except UnicodeDecodeError as e:
        raise SpecError(str(p), "", f"is not a text file (byte {e.start} is not UTF-8)",
                        f"pass the {what} itself") from None
    except OSError as e:
        raise SpecError(str(p), "", f"cannot be read ({e.strerror or e})", "check its permissions") from None


def read_json(path: str | os.PathLike, *, missing_fix: str, invalid_fix: str = "fix or regenerate the file") -> Any:
    """A JSON file's content. A missing or unreadable file, or invalid JSON, raises
    SpecError naming the file (and the line), with the fix given."""
    p = Path(path)
    text = read_text(p, missing_fix=missing_fix, what="JSON file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(str(p), f"line {e.lineno}", f"invalid JSON ({e.msg})", invalid_fix) from None
    except RecursionError:
        raise SpecError(str(p), "", "invalid JSON (nested too deeply)", invalid_fix) from None
