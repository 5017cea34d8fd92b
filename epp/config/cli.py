"""`epp profiles list | show NAME | validate FILE`.

Exit status, as `epp serve`'s for the same config: 0 valid, 2 invalid (every problem printed, one
per line with file:line and field). Deprecation warnings are printed but do not fail.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from epp.config.loader import build, list_profiles, profile_path, resolve_config, show_profile
from epp.scheduling.framework import ConfigError


def profiles_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="epp profiles", description="Named EndpointPickerConfig profiles.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the profiles with what each one runs")
    s = sub.add_parser("show", help="print a profile's YAML")
    s.add_argument("name")
    v = sub.add_parser("validate", help="load a config file (or a profile NAME) and report every problem (exit 2) or 'valid' (exit 0)")
    v.add_argument("file")
    v.add_argument("--allow-experimental-plugins", action="store_true", help="accept experimental (alpha) plugins, as the flag of `epp serve`")
    args = p.parse_args(list(argv))
    try:
        if args.cmd == "list":
            for name in list_profiles():
                desc = build(resolve_config(profile=name)).scheduler.describe()
                parts = []
                for prof in desc["profiles"].values():
                    scorers = ", ".join(f"{s['name']}×{s['weight']:g}" for s in prof["scorers"]) or "-"
                    parts.append(f"filters: {', '.join(prof['filters']) or '-'}; scorers: {scorers}; picker: {prof['picker']}")
                producers = f"; producers: {', '.join(desc['producers'])}" if desc.get("producers") else ""
                print(f"{name:32} {' | '.join(parts)}{producers}")
            return 0
        if args.cmd == "show":
            print(show_profile(args.name), end="")
            return 0
        path = args.file
        try:
            loaded = resolve_config(config_file=path)
        except ConfigError:
            if not path.endswith((".yaml", ".yml")) and profile_path(path):
                loaded = resolve_config(profile=path)
            else:
                raise
        built = build(loaded, allow_experimental=args.allow_experimental_plugins)
        for warning in built.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        desc = built.scheduler.describe()
        print(f"{loaded.source}: valid")
        for name, prof in desc["profiles"].items():
            print(f"  profile {name}: filters={prof['filters']} scorers={[(s['name'], s['weight']) for s in prof['scorers']]} picker={prof['picker']}")
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # as `epp serve` exits on a config error (docs/configuration.md)
