"""Hyperparameter dataclasses saved as JSON beside model weights."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, TypeVar

C = TypeVar("C")


def config_to_dict(config: Any) -> dict[str, object]:
    return asdict(config)


def config_from_dict(cls: type[C], raw: dict[str, object], stage: str) -> C:
    """Build ``cls`` from a saved dict, refusing keys it does not know (a newer artifact)."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{stage}: expected config keys {sorted(known)}, got extra {unknown}")
    return cls(**raw)
