"""A full disk while weights are saved, turned back into the ``OSError`` the kernel raised: torch and safetensors each
report it their own way, so :func:`audit.pipeline.resume.disk_full` (which reads errno) would see a bug and print a traceback.

    RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598
        torch.save: the Trainer's checkpoint (optimizer.pt, scheduler.pt, rng_state.pth); errno is lost
    SafetensorError: Error while serializing: I/O error: No space left on device (os error 28)
        save_pretrained, safetensors' save_file: the weights and adapters; errno is in the text

Both messages were taken on a full 256 KiB tmpfs (torch 2.13, safetensors 0.8). torch's writer keeps no errno (its
context is ``basic_ios::clear: iostream error``), so a failed torch write counts as a full disk only when the disk
it wrote to has (almost) no space left now; any other failure keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from audit.core.errors import AuditError

TORCH_WRITER = ("inline_container.cc", "PytorchStreamWriter failed writing")
"""What torch's zip writer (``caffe2::serialize::PyTorchStreamWriter``) says when a write comes up short."""
OS_ERROR = re.compile(r"\(os error (\d+)\)")
"""How Rust's ``std::io::Error`` (safetensors) prints the errno."""
NEARLY_FULL_BYTES = 64 << 20
"""Free space under which a failed torch write is taken for a full disk: the write fails once no block is left, and
the part it wrote stays on the disk, so the space is still gone when the error is handled."""


def write_error(exc: BaseException, where: Path) -> OSError | None:
    """The ``OSError`` behind ``exc`` (itself, or a torch / safetensors write failure, following ``__cause__`` and
    ``__context__``) while writing under ``where``, or None. Whether it is a full disk is the caller's question
    (:func:`audit.pipeline.resume.disk_full` answers it from errno)."""
    if not isinstance(exc, Exception) or isinstance(exc, AuditError):  # Ctrl-C, a signal; already one line
        return None
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        text = str(current)
        found = OS_ERROR.search(text)
        if found:
            code = int(found.group(1))
            return OSError(code, os.strerror(code))
        if any(marker in text for marker in TORCH_WRITER):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if _free_bytes(where) < NEARLY_FULL_BYTES else None
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return None


def _free_bytes(where: Path) -> int:
    """Bytes this user may still write on the disk that holds ``where`` (a quota is not seen here)."""
    try:
        return shutil.disk_usage(where).free
    except OSError:
        return NEARLY_FULL_BYTES  # not known: not taken for full
