"""Configuration: EndpointPickerConfig files and the named profiles in `profiles/`."""

from epp.config.loader import (
    BuiltConfig,
    ConfigErrors,
    LoadedConfig,
    build,
    build_scheduler,
    list_profiles,
    parse,
    profile_path,
    resolve_config,
    show_profile,
    validate_file,
)

__all__ = [
    "BuiltConfig",
    "ConfigErrors",
    "LoadedConfig",
    "build",
    "build_scheduler",
    "list_profiles",
    "parse",
    "profile_path",
    "resolve_config",
    "show_profile",
    "validate_file",
]
