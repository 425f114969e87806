"""Run-directory writes that never leave a half-written file: write to a temporary name, then rename."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_text(obj: Any) -> str:
    if isinstance(obj, BaseModel):
        return obj.model_dump_json(indent=2) + "\n"
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def jsonl_text(rows: Iterable[BaseModel | dict[str, Any]]) -> str:
    lines = [r.model_dump_json() if isinstance(r, BaseModel) else json.dumps(r, sort_keys=True, ensure_ascii=False) for r in rows]
    return "".join(line + "\n" for line in lines)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json_text(obj))


def write_jsonl(path: Path, rows: Iterable[BaseModel | dict[str, Any]]) -> None:
    atomic_write_text(path, jsonl_text(rows))


def write_once(path: Path, text: str) -> bool:
    """Write ``path`` atomically if it does not exist; if it does, it must already hold exactly ``text``.

    A resumed run recomputes its deterministic stages and checks them against the files instead of overwriting
    them, so nothing computed earlier is silently replaced. Returns True when the file was written now.
    """
    from audit.errors import AuditError

    path = Path(path)
    if path.exists():
        if path.read_text(encoding="utf-8") == text:
            return False
        raise AuditError(f"{path} already exists with different content than this run computes now "
                         "(the recipe, the corpus or the code changed since it was written)",
                         fix="start a new run instead of resuming, or restore the original inputs")
    atomic_write_text(path, text)
    return True
