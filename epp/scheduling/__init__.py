"""Scheduling framework: ProfileHandler → Filter → Scorer → Picker, plugins by type name."""
