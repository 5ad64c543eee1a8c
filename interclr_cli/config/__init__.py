from .loader import (
    all_keys,
    apply_overrides,
    choice_keys,
    choices,
    config_from_mapping,
    key_table,
    list_presets,
    load_config,
    load_preset_mapping,
    to_mapping,
    to_yaml,
    validate,
)
from .schema import Config

__all__ = [
    "Config",
    "all_keys",
    "apply_overrides",
    "choice_keys",
    "choices",
    "config_from_mapping",
    "key_table",
    "list_presets",
    "load_config",
    "load_preset_mapping",
    "to_mapping",
    "to_yaml",
    "validate",
]
