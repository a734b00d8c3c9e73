"""Reading a config: dataclass defaults -> YAML file -> command-line `key=value` overrides, validated.

String keys take command-line text as typed (`train.amp=off` is the string "off", not YAML's boolean), an
unquoted YAML boolean where a string is meant is refused saying what to type, and a removed key is refused
saying why. Every error is a ValueError naming the file or the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dist_seg.config.schema import CHOICES, Config
from dist_seg.config.validation import validate
from dist_seg.data import IGNORE_INDEX

# keys that no longer exist, with what to do instead (OmegaConf's own message would only say "not in schema")
REMOVED_KEYS = {
    "loss.ignore_index": (
        f"the ignore value is fixed at {IGNORE_INDEX} by the shard format (uint8 label maps; crop and eval "
        "padding use it too), so it is no longer a config key: delete it"
    ),
}


def _refuse_removed_keys(keys: list[str], where: str) -> None:
    for key in keys:
        if key in REMOVED_KEYS:
            raise ValueError(f"config key {key}{where}: {REMOVED_KEYS[key]}")


def _dotted_keys(tree: Any, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict):
        return [prefix[:-1]] if prefix else []
    return [k for name, v in tree.items() for k in _dotted_keys(v, f"{prefix}{name}.")] or [prefix[:-1]]


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults -> YAML at `path` -> dotted `key=value` overrides, as a validated `Config`.

    Raises ValueError naming the file or the dotted key on unknown keys, wrong types or bad values.
    """
    schema = OmegaConf.structured(Config)
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        try:
            layer = OmegaConf.load(path)
        except Exception as e:  # yaml errors come in several types
            raise ValueError(f"config file {path} is not valid YAML: {e}") from e
        _refuse_removed_keys(_dotted_keys(OmegaConf.to_container(layer)), f" in {path}")
        _refuse_yaml_booleans_for_strings(OmegaConf.to_container(layer), Config, "", path)
        layers.append(layer)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"config override {item!r} must look like key=value (e.g. train.epochs=3)")
        _refuse_removed_keys([item.split("=", 1)[0].strip()], "")
    where = f" in {path}" if path is not None else ""
    try:
        merged = OmegaConf.merge(schema, *layers)
    except OmegaConfBaseException as e:
        raise ValueError(f"config key {_key_of(e)}{where}: {_first_line(e)}") from e
    for item in overrides:
        # one override at a time, so an error inside a list or dict names the override it came from
        key = item.split("=", 1)[0].strip()
        try:
            merged = OmegaConf.merge(merged, _override_layer(item))
        except OmegaConfBaseException as e:
            inner = _key_of(e)
            detail = "" if inner in ("?", key) else f" ({inner})"
            raise ValueError(f"config key {key}{detail}: {_first_line(e)}") from e
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ValueError(f"config key {_key_of(e)}{where}: {_first_line(e)}") from e
    assert isinstance(cfg, Config)
    return validate(cfg)


def _string_field(dotted: str) -> bool | None:
    """For a dotted key naming a `str` / `str | None` field: whether it may be null; None for other keys."""
    cls: Any = Config
    for part in dotted.split("."):
        hints = typing.get_type_hints(cls) if isinstance(cls, type) and dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return None
        cls = hints[part]
    if cls is str:
        return False
    args = set(typing.get_args(cls)) if isinstance(cls, types.UnionType) else set()
    return True if str in args and args <= {str, type(None)} else None


def _override_layer(item: str) -> Any:
    """One `key=value` override as an OmegaConf layer. A string-valued key takes the text as typed (OmegaConf
    would parse it as YAML 1.1: `train.amp=off` -> False); `null`/`~` mean null where allowed; outer quotes go."""
    key, raw = (part.strip() for part in item.split("=", 1))
    nullable = _string_field(key)
    if nullable is None:
        return OmegaConf.from_dotlist([item])
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        value: str | None = raw[1:-1]
    elif nullable and raw in ("null", "~", "Null", "NULL"):
        value = None
    else:
        value = raw
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return OmegaConf.create(nested)


def _refuse_yaml_booleans_for_strings(node: Any, cls: Any, prefix: str, path: Path) -> None:
    """Refuse a YAML boolean (unquoted `off`, `yes`, ...) where a string is meant, saying what to type."""
    if not isinstance(node, dict) or not dataclasses.is_dataclass(cls):
        return
    hints = typing.get_type_hints(cls)
    for name, value in node.items():
        if name not in hints:
            continue  # unknown keys are reported by the merge, naming the key
        dotted = f"{prefix}{name}"
        if isinstance(value, bool) and _string_field(dotted) is not None:
            choices = CHOICES.get(dotted)
            hint = f" (one of {', '.join(choices)})" if choices else ""
            raise ValueError(
                f"config key {dotted} in {path}: YAML reads the unquoted value as the boolean {value}, but "
                f'the key takes a string{hint}: write it in quotes, e.g. {name}: "off"'
            )
        _refuse_yaml_booleans_for_strings(value, hints[name], f"{dotted}.", path)


def _key_of(e: OmegaConfBaseException) -> str:
    return str(getattr(e, "full_key", None) or "?")


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. stored in a checkpoint)."""
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(d))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, Config)
    return validate(cfg)
