"""Load YAML into typed pydantic models, turning validation failures into errors that
name the file and the dotted field path, so a person can fix the config without
reading a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from kdcore.errors import SpecError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base for config objects: unknown keys are errors (a typo must not pass silently)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  field '{loc}': {e['msg']}")
    return "\n".join(lines)


def validate(model: type[M], data: Any, source: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise SpecError(format_validation_error(source, err)) from None


def load_yaml(model: type[M], path: str | Path) -> M:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"{path}: cannot read config file ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return validate(model, data, str(path))
