"""`epp profiles list | show NAME | validate FILE`."""

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
    v = sub.add_parser("validate", help="load a config file (or a profile NAME) and report the first error")
    v.add_argument("file")
    args = p.parse_args(list(argv))
    try:
        if args.cmd == "list":
            for name in list_profiles():
                desc = build(resolve_config(profile=name)).scheduler.describe()
                parts = []
                for prof in desc["profiles"].values():
                    scorers = ", ".join(f"{s['name']}×{s['weight']:g}" for s in prof["scorers"]) or "-"
                    parts.append(f"filters: {', '.join(prof['filters']) or '-'}; scorers: {scorers}; picker: {prof['picker']}")
                print(f"{name:32} {' | '.join(parts)}")
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
        desc = build(loaded).scheduler.describe()
        print(f"{loaded.source}: valid")
        for name, prof in desc["profiles"].items():
            print(f"  profile {name}: filters={prof['filters']} scorers={[(s['name'], s['weight']) for s in prof['scorers']]} picker={prof['picker']}")
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # as `epp serve` exits on a config error (docs/configuration.md)
