"""Named EndpointPickerConfig files, selected with --config-profile NAME (or EPP_CONFIG_PROFILE)."""
