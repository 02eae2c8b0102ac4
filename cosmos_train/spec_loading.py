"""Reading a spec: TOML files with `base` chains, dotted `key.path=value` overrides, one-line errors.

A wrong field fails here, before any process group exists, with the dotted path of the field and a
"did you mean" where one is close (`optimizer.lr: Input should be greater than 0 (got -1)`).
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from cosmos_train.errors import SpecError
from cosmos_train.spec import ExperimentSpec

def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a directory; expected a TOML spec file") from None
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not a UTF-8 text file (byte {e.start}); expected a TOML spec file") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: TOML syntax error: {e}") from None


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_raw(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a spec file and its `base` files (relative paths, recursive), merged, `base` removed."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise SpecError(f"{path}: base files form a cycle: {cycle}")
    data = _read_toml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise SpecError(f"{path}: base: must be a path string (got {base!r})")
    return _deep_merge(load_raw(path.parent / base, (*_chain, path)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=VALUE` -> (["a","b","c"], value); VALUE is parsed as TOML, else kept as a string."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise SpecError(f"override {text!r}: expected key.path=value, e.g. optimizer.lr=3e-5")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key.split("."), parsed


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each `key.path=value` in a nested dict (a new dict is returned)."""
    out = _deep_merge({}, data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {} if child is None else child
                if not isinstance(child, dict):
                    raise SpecError(f"override {text!r}: {part} is not a section")
                node[part] = child
            node = child
        node[parts[-1]] = value
    return out


def _model_at(loc: tuple, model: type[BaseModel] = ExperimentSpec) -> type[BaseModel] | None:
    """The Pydantic model class that owns the field at `loc[-1]`, following loc."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        inner = getattr(ann, "__args__", None)
        candidates = [ann, *(inner or ())]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


def _format_error(err: dict, source: str) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
    path = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[") or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        owner = _model_at(loc)
        valid = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        msg = "unknown key" + (f"; did you mean '{close[0]}'?" if close else "")
        if valid:
            msg += f" (valid: {', '.join(valid)})"
        return f"{source}: {path}: {msg}"
    if not loc and ": " in msg and " " not in msg.split(": ", 1)[0]:
        return f"{source}: {msg}"  # cross-section check: the message starts with its own path
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{source}: {path}: {msg}{shown}"


def validate_spec(data: dict[str, Any], source: str = "<spec>") -> ExperimentSpec:
    """Validate a raw dict; raise SpecError with one line per problem."""
    try:
        return ExperimentSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError("\n".join(_format_error(err, source) for err in e.errors())) from None


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentSpec:
    """Load a TOML spec (with its `base` chain) and apply `key.path=value` overrides."""
    data = apply_overrides(load_raw(path), list(overrides))
    return validate_spec(data, str(path))


def load_spec_text(text: str, source: str = "<string>") -> ExperimentSpec:
    """Validate a spec given as TOML text (no `base` support)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{source}: TOML syntax error: {e}") from None
    return validate_spec(data, source)


def json_schema() -> dict[str, Any]:
    """JSON schema of the spec."""
    return ExperimentSpec.model_json_schema()
