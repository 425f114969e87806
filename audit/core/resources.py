"""Where the shipped data folders (``recipes/``, ``canaries/``) live.

In a source checkout or an editable install they sit beside the package; in a built wheel they are packed into
``audit/_data/`` (see ``[tool.hatch.build.targets.wheel.force-include]`` in pyproject.toml). They are data, not
Python packages, so installing canary-audit never adds a top-level ``recipes`` module to site-packages.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent  # audit/, above audit/core/


def data_dir(name: str) -> Path:
    """Return the shipped data folder ``name`` (``recipes`` or ``canaries``)."""
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"shipped data folder '{name}' not found beside {_PACKAGE}")


DEFAULT_RECIPE = "smollm2/lora_cpu"
