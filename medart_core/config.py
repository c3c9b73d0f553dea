"""JSON round trip shared by the dataclass configs (LoRA, HLDF, ...): config is data."""
from __future__ import annotations

import json
from dataclasses import asdict, fields
from typing import Any, ClassVar, Mapping, TypeVar

from .errors import ConfigError

C = TypeVar("C", bound="JsonConfig")


class JsonConfig:
    """Mixin for ``@dataclass`` configs: ``to_dict``/``to_json`` and strict ``from_dict``/``from_json``."""

    CONFIG_NAME: ClassVar[str] = "config"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            # A typo in a config file must not silently fall back to a default.
            raise ConfigError(f"Unknown {cls.CONFIG_NAME} keys {unknown}; valid keys are {sorted(known)}.")
        return cls(**dict(data))

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))
