from .loader import all_keys, apply_overrides, config_from_mapping, list_presets, load_config, load_preset_mapping, to_mapping, to_yaml, validate
from .schema import Config

__all__ = [
    "Config",
    "all_keys",
    "apply_overrides",
    "config_from_mapping",
    "list_presets",
    "load_config",
    "load_preset_mapping",
    "to_mapping",
    "to_yaml",
    "validate",
]
