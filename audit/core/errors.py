"""User-facing errors.

Every problem a user can fix (a bad recipe, a missing file, an unreachable model or server) is raised as an
:class:`AuditError`. The CLI prints it as one line, ``error: <what> (fix: <how>)``, and exits with code 2; no
traceback, no half-written run directory. Anything else is a bug in the harness and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

EXIT_USAGE = 2


class AuditError(Exception):
    """A problem in the user's input or environment, with the fix spelled out."""

    def __init__(self, problem: str, *, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.problem} (fix: {self.fix})" if self.fix else self.problem


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def check_readable(path: str | Path, *, fix: str) -> None:
    """One line naming ``path`` unless this process can open it for reading.

    Tried, not read off the permission bits (root reads a mode-000 file; ACLs and mounts differ from the bits), and
    before a library opens it: safetensors reports a file it may not read as ``FileNotFoundError``.
    """
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        why = (exc.strerror or type(exc).__name__).lower()
        raise AuditError(f"cannot read {path} ({why})", fix=fix) from None
