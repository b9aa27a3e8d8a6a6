"""Files: atomic output (write to a temporary file beside the target, then rename: nothing
half-written is ever left at the target path, even if the process dies), and JSON input
whose problems are one-line errors naming the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import SpecError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """Stable JSON: fixed indentation, keys in the order the writer gave them."""
    return json.dumps(obj, indent=2) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, dumps_json(obj))


def read_json(path: str | os.PathLike, *, missing_fix: str, invalid_fix: str = "fix or regenerate the file") -> Any:
    """A JSON file's content. A missing file or invalid JSON raises SpecError naming the
    file (and the line), with the fix given."""
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise SpecError(str(p), "", "file not found", missing_fix) from None
    except json.JSONDecodeError as e:
        raise SpecError(str(p), f"line {e.lineno}", f"invalid JSON ({e.msg})", invalid_fix) from None
