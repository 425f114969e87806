"""The works source registry: a name (or ``folder:PATH``) -> a list of :class:`Work`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from audit.core.errors import AuditError, did_you_mean
from audit.data.works.work import Work

SOURCES = ("shakespeare", "kjv", "synthetic", "folder:PATH")


def load_source(source: str, *, sampler: Any = None, synthetic: dict[str, Any] | None = None, seed: int = 0,
                progress: bool = False) -> list[Work]:
    """Load every work of ``source``. ``synthetic`` holds the synthetic source's settings; ``sampler`` the model."""
    from audit.data.works.pypi import PYPI_SOURCES, pypi_works

    if source in PYPI_SOURCES:
        return pypi_works(source, progress=progress)
    if source == "synthetic":
        from audit.data.works.synthetic import synthetic_works

        if sampler is None:
            raise AuditError("the synthetic works source samples from the base model, but no model was given",
                             fix="run it through `audit run` / `audit inject`, or pass --model to `audit canaries`")
        s = dict(synthetic or {})
        return synthetic_works(sampler, n_works=int(s.get("works", 8)), tokens_per_work=int(s.get("tokens", 256)),
                               temperature=float(s.get("temperature", 0.9)), prompt=str(s.get("prompt", "")), seed=seed)
    path = source.removeprefix("folder:")
    if source.startswith("folder:") or Path(path).expanduser().is_dir():
        from audit.data.works.folder import folder_works

        return folder_works(path)
    raise AuditError(f"unknown works source '{source}'." + did_you_mean(source, SOURCES),
                     fix=f"use one of: {', '.join(SOURCES)}")
