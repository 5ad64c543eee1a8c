"""Presets (YAML with inheritance) and typed ``key.sub=value`` overrides.

A preset is a YAML file in the package's ``presets/`` folder (or any path). ``base: NAME`` makes
it inherit from another preset: mappings merge key by key, everything else is replaced. The merged
mapping is validated against :class:`~interclr_cli.config.schema.Config`: an unknown key is an
error that suggests the nearest valid key, a value of the wrong type names the key and the
expected type, and a value outside a ``Literal[...]`` key's choices lists them (with the nearest
one). :func:`choices` and :func:`key_table` read the allowed values and defaults from the schema,
the only place they are declared.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import typing
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from .schema import Config

log = logging.getLogger("interclr")

PRESET_DIRS = [
    Path(__file__).resolve().parent.parent / "presets",  # installed: interclr_cli/presets
    Path(__file__).resolve().parent.parent.parent / "presets",  # source tree: ./presets
]


def preset_dir() -> Path:
    for d in PRESET_DIRS:
        if d.is_dir() and any(d.glob("*.yaml")):
            return d
    raise UserError("no presets folder found; reinstall interclr (pip install -e .)")


def list_presets() -> dict[str, str]:
    """Preset name -> one-line description."""
    out = {}
    for p in sorted(preset_dir().glob("*.yaml")):
        data = _read_yaml(p)
        if p.stem.startswith("_"):
            continue
        out[p.stem] = str(data.get("description", "")).strip().splitlines()[0] if data.get("description") else ""
    return out


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(
            f"preset {path} is not valid YAML ({getattr(e, 'problem', 'parse error')}{where}); fix the file"
        ) from None
    except OSError as e:
        raise UserError(f"cannot read preset {path}: {e.strerror}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"preset {path} must be a YAML mapping of keys to values")
    return data


def _find_preset(name: str) -> Path:
    p = Path(name)
    if name.endswith((".yaml", ".yml")) or p.is_file():
        if not p.is_file():
            raise UserError(
                f"preset file {name} does not exist; give a path to a YAML file or a name from `interclr presets`"
            )
        return p
    cand = preset_dir() / f"{name}.yaml"
    if cand.is_file():
        return cand
    names = list(list_presets())
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UserError(f"unknown preset {name!r}; {hint}see `interclr presets` for the list")


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_preset_mapping(name: str, _seen: tuple = ()) -> dict:
    """The preset's mapping with its ``base`` chain merged in (base first)."""
    path = _find_preset(name)
    key = str(path.resolve())
    if key in _seen:
        raise UserError(f"preset {path.name} inherits from itself (cycle through 'base'); fix the 'base' key")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base:
        parent_name = str(base)
        # a relative path in 'base' is resolved next to the child preset
        if parent_name.endswith((".yaml", ".yml")) and not Path(parent_name).is_absolute():
            parent_name = str(path.parent / parent_name)
        data = _deep_merge(load_preset_mapping(parent_name, _seen + (key,)), data)
    return data


# --- typed conversion -------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        (arg,) = typing.get_args(tp)
        return f"list of {_type_name(arg)}"
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    return {int: "integer", float: "number", bool: "boolean (true/false)", str: "string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value (or a string from the command line) to the schema type."""

    def bad():
        return UserError(f"{key} expects {_type_name(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "")):
            return None
        return _coerce(value, args[0], key)
    if origin is typing.Literal:
        if isinstance(value, (dict, list)):
            raise bad()
        allowed = tuple(typing.get_args(tp))
        if "true" in allowed and "false" in allowed:  # an auto|true|false switch reads booleans too
            value = _switch_value(value)
        return _check_choice(key, "" if value is None else str(value), allowed)
    if origin is list:
        (arg,) = typing.get_args(tp)
        if isinstance(value, str):
            s = value.strip()
            if s.startswith("["):
                try:
                    value = yaml.safe_load(s)
                except yaml.YAMLError:
                    raise bad() from None
            else:
                value = [v for v in s.split(",") if v.strip()] if s else []
        if not isinstance(value, (list, tuple)):
            raise bad()
        return [_coerce(v, arg, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
            return False
        raise bad()
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    raise bad() from None
                if f.is_integer():
                    return int(f)
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if isinstance(value, (dict, list)):
            raise bad()
        return "" if value is None else str(value)
    raise bad()


def _switch_value(value: Any) -> Any:
    """YAML true/false and true/yes/on/1, false/no/off/0 (any case) -> "true"/"false"; others unchanged."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and value in (0, 1):
        return "true" if value else "false"
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return "true" if value.lower() in ("true", "yes", "on", "1") else "false"
    return value


def _check_choice(key: str, v: str, allowed: tuple) -> str:
    if v not in allowed:
        close = difflib.get_close_matches(str(v), [str(c) for c in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"{key} must be one of {', '.join(map(str, allowed))}; got {v!r}{hint}")
    return v


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # cached: resolving the string annotations is slow


def _field(key: str) -> tuple[Any, Any]:
    """(type annotation, default) of a dotted schema key; an unknown key is a UserError."""
    cls: Any = Config
    parts = key.split(".")
    for i, p in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if p not in fields:
            raise _unknown_key(key)
        tp = _hints(cls)[p]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise _unknown_key(key)  # a section, not a key
            f = fields[p]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            return tp, default
        cls = tp
    raise _unknown_key(key)


def _literal_args(tp: Any) -> tuple:
    if typing.get_origin(tp) is typing.Union:  # Optional[Literal[...]]
        tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
    return tuple(typing.get_args(tp)) if typing.get_origin(tp) is typing.Literal else ()


def choices(key: str) -> tuple[str, ...]:
    """The allowed values of a dotted key (its ``Literal[...]`` args in the schema), in schema
    order; ``()`` for a key without a fixed set of values. An unknown key is a UserError."""
    return _literal_args(_field(key)[0])


def choice_keys() -> dict[str, tuple[str, ...]]:
    """Every key with a fixed set of values -> its allowed values (from the schema)."""
    return {k: c for k in all_keys() if (c := choices(k))}


def key_table() -> list[dict[str, Any]]:
    """One row per settable key, in schema order: ``key``, ``type`` (a readable name: ``choice``
    for a key with a fixed set of values), ``default`` and ``choices`` (a list, empty when free)."""
    rows = []
    for k in all_keys():
        tp, default = _field(k)
        allowed = _literal_args(tp)
        rows.append(
            {"key": k, "type": "choice" if allowed else _type_name(tp), "default": default, "choices": list(allowed)}
        )
    return rows


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every settable dotted key of the schema."""
    keys = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key(key: str) -> UserError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    if not close:  # try matching the last component anywhere in the tree
        last = key.rsplit(".", 1)[-1]
        close = [k for k in all_keys() if k.rsplit(".", 1)[-1] == last][:1]
    hint = f"; did you mean {close[0]!r}?" if close else "; see `interclr presets show NAME` for valid keys"
    return UserError(f"unknown config key {key!r}{hint}")


def _build(cls, data: dict, prefix: str) -> Any:
    kwargs = {}
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise _unknown_key(key)
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                raise UserError(f"{key} is a section; set its keys, e.g. {key}.{dataclasses.fields(tp)[0].name}=...")
            kwargs[k] = _build(tp, v, key + ".")
        else:
            kwargs[k] = _coerce(v, tp, key)
    return cls(**kwargs)


def config_from_mapping(data: dict) -> Config:
    return _build(Config, data, "")


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise UserError(f"override {text!r} must look like key.sub=value (e.g. optim.lr=0.06)")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"override {text!r} has no key; write key.sub=value")
    return key, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set ``key.sub=value`` strings into a mapping; each key is checked against the schema."""
    data = _deep_copy(data)
    valid = set(all_keys())
    for text in overrides:
        key, value = parse_override(text)
        if key not in valid:
            # a section name given a scalar, or a plain typo
            raise _unknown_key(key)
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value  # converted (and type-checked) by _build
    _check_batch_keys(data, {parse_override(t)[0] for t in overrides})
    return data


def _check_batch_keys(data: dict, given: set[str]) -> None:
    """An explicit ``train.batch_size`` override means a per-process batch: it turns the preset's
    ``train.global_batch`` off (with a log line) unless ``train.global_batch`` is given too."""
    train = data.get("train") or {}
    g = train.get("global_batch", 0)
    if "train.batch_size" in given and "train.global_batch" not in given and isinstance(g, int) and g > 0:
        train["global_batch"] = 0
        log.info(
            f"train.batch_size={train['batch_size']} given: a per-process batch (the preset's train.global_batch={g} "
            "is turned off; set train.global_batch=N for images per step over all processes)"
        )


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def load_config(preset: str | None, overrides: list[str] | None = None) -> Config:
    """Resolve a preset (name or path; None = schema defaults) and overrides into a Config."""
    data = load_preset_mapping(preset) if preset else {}
    data = apply_overrides(data, overrides or [])
    cfg = config_from_mapping(data)
    if not cfg.name and preset:
        cfg.name = Path(preset).stem
    validate(cfg)
    return cfg


def get_key(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for p in key.split("."):
        node = getattr(node, p)
    return node


def validate(cfg: Config) -> None:
    """Value checks beyond types: ranges and cross-key rules. Choices are checked when a value
    is parsed (``_coerce``); they are re-checked here, from the schema, for a Config changed in code."""
    for key, allowed in choice_keys().items():
        _check_choice(key, get_key(cfg, key), allowed)
    dev = cfg.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise UserError(f"device must be auto, cpu, cuda or cuda:N; got {dev!r}")
    positive = [
        "train.batch_size",
        "train.epochs",
        "data.image_size",
        "model.embed_dim",
        "train.keep_last",
        "train.log_every",
    ]
    for key in positive:
        if get_key(cfg, key) <= 0:
            raise UserError(f"{key} must be positive; got {get_key(cfg, key)!r}")
    nonneg = [
        "train.max_steps",
        "data.num_workers",
        "optim.lr",
        "optim.weight_decay",
        "optim.warmup_epochs",
        "train.ckpt_every",
        "train.ckpt_every_steps",
        "method.queue_size",
    ]
    for key in nonneg:
        if get_key(cfg, key) < 0:
            raise UserError(f"{key} must be >= 0; got {get_key(cfg, key)!r}")
    if not 0.0 <= cfg.method.momentum <= 1.0:
        raise UserError(f"method.momentum must be in [0, 1]; got {cfg.method.momentum}")
    if not 0.0 < cfg.data.crop_min_scale <= 1.0:
        raise UserError(f"data.crop_min_scale must be in (0, 1]; got {cfg.data.crop_min_scale}")
    if not 0.0 < cfg.data.label_fraction <= 1.0:
        raise UserError(f"data.label_fraction must be in (0, 1]; got {cfg.data.label_fraction}")
    if cfg.data.in_memory and cfg.data.augment_on == "workers":
        raise UserError(
            "data.in_memory=true augments on the device; add data.augment_on=device (or set data.in_memory=false)"
        )
    if len(cfg.data.mean) != 3 or len(cfg.data.std) != 3:
        raise UserError("data.mean and data.std need 3 values, e.g. data.mean=[0.485,0.456,0.406]")


def to_mapping(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_mapping(cfg), sort_keys=False, default_flow_style=None)
