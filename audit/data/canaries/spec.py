"""Canary specs: versioned YAML files in ``canaries/`` that say how to draw a pool of canaries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from audit.core.errors import AuditError, did_you_mean
from audit.core.resources import data_dir
from audit.core.schema import Frozen
from audit.data.canaries.params import parse_params


class CanarySpec(Frozen):
    name: str
    version: int = Field(ge=1)
    generator: str
    description: str = ""
    params: dict[str, Any] = Field(default_factory=dict)
    tiers: list[int] = Field(default_factory=lambda: [1, 4, 16])
    members_per_tier: int = Field(default=2, ge=1)
    references: int = Field(default=6, ge=1)

    def with_params(self, overrides: dict[str, Any] | None) -> CanarySpec:
        """This spec with some ``params`` replaced (a recipe's ``canaries.params``); nested dicts are merged."""
        if not overrides:
            return self
        params = dict(self.params)
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(params.get(key), dict):
                value = {**params[key], **value}
            params[key] = value
        return self.model_copy(update={"params": params})


def shipped_specs() -> list[str]:
    return sorted(p.stem for p in data_dir("canaries").glob("*.yaml"))


def load_spec(name_or_path: str, params: dict[str, Any] | None = None) -> CanarySpec:
    """Load a spec by shipped name (``digits``) or path; ``params`` override the spec's own.

    The merged params are checked against the generator's params model (:mod:`audit.data.canaries.params`)."""
    from audit.core.config import read_yaml

    path = Path(name_or_path)
    if not path.is_file():
        path = data_dir("canaries") / f"{name_or_path}.yaml"
    if not path.is_file():
        names = shipped_specs()
        raise AuditError(f"canary spec '{name_or_path}' not found." + did_you_mean(name_or_path, names),
                         fix=f"set canaries.spec to a YAML path or one of: {', '.join(names)}")
    try:
        spec = CanarySpec.model_validate(read_yaml(path)).with_params(params)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise AuditError(f"canary spec {path}: '{key}': {err['msg']}", fix="correct the spec file") from None
    parse_params(spec.generator, spec.params, spec=spec.name)  # unknown or bad params: one line, with did-you-mean
    return spec
