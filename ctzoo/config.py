"""YAML configs validated by pydantic, with errors that name the file and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class ConfigError(ValueError):
    """A config file that cannot be used; the message says which file, which field and why."""


class StrictConfig(BaseModel):
    """Base for ctzoo configs: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def read_yaml(path: str | Path) -> Any:
    """The YAML document in ``path``, unvalidated; any file that is not one raises :class:`ConfigError` naming it.

    A binary file given by mistake (a CT volume as the config) fails to decode as UTF-8, which says neither the
    file's name nor what was expected of it.
    """
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a YAML config file (byte {exc.start} is 0x{exc.object[exc.start]:02x}: "
                          "not UTF-8 text)") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def load_config(path: str | Path, model: type[ConfigT]) -> ConfigT:
    """Read a YAML file and validate it against ``model``.

    Raises :class:`ConfigError` listing every bad field as ``file: a.b.c: message``.
    """
    path = Path(path)
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = [f"{path}: {'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()]
        raise ConfigError("invalid config\n" + "\n".join(problems)) from exc


def recorded_fields(kind: type[ConfigT], recorded: dict[str, Any], fallback: ConfigT) -> ConfigT:
    """A ``kind`` config from the fields of ``kind`` that ``recorded`` holds (a checkpoint's dumped config section,
    which may hold more), each field it lacks taken from ``fallback`` (an older checkpoint recorded fewer)."""
    fields = kind.model_fields
    return kind.model_validate({**{k: getattr(fallback, k) for k in fields},
                                **{k: v for k, v in recorded.items() if k in fields}})


def field_differences(config: BaseModel, own: BaseModel) -> str:
    """Where ``config`` differs from ``own`` (the same model type), as "field: own (config: value); ..."; "" when
    nowhere. For the warning that a model is scored with its own preprocessing, not the config's."""
    mine, theirs = own.model_dump(mode="json"), config.model_dump(mode="json")
    return "; ".join(f"{k}: {mine[k]} (config: {theirs[k]})" for k in type(own).model_fields if mine[k] != theirs[k])
