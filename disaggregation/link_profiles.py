"""kv-link-profiles: load per-link KV-transfer profiles from a file into the EPP (and follow its changes).

The file (`file`, else $EPP_KV_LINK_PROFILES, else /etc/epp/kv-link-profiles.json) is what
`kv-bandwidth-profiler --links` writes, or a ConfigMap holding it: a profile per measured
(prefill, decode) pair and/or per link class. The EPP re-reads it when it changes, checked every
`reloadInterval`; a broken edit keeps the last good profiles and logs why, a missing file means
no data yet (pairs fall back to load). Live per-peer profiles that decode sidecars export on
/metrics take precedence over the file.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from epp.datastore.links import DEFAULT_TOPOLOGY_LABELS, LinkProfileError
from epp.scheduling.estimates import links_of
from epp.scheduling.framework import ConfigError
from epp.scheduling.registry import PluginContext, positive_duration, register, reject_unknown

FILE_ENV = "EPP_KV_LINK_PROFILES"  # the file when the config names none
DEFAULT_FILE = "/etc/epp/kv-link-profiles.json"  # where the Kubernetes manifests mount the profiler's ConfigMap
# llm-d topology-extractor's parameter names -> the levels they label
LABEL_PARAMETERS = {"hostname": "host", "rack": "rack", "zone": "zone", "region": "region"}


class KVLinkProfiles:
    """A data source: no extension point, it fills the datastore's link table."""

    type_name = "kv-link-profiles"

    def __init__(self, name: str, path: str) -> None:
        self.name, self.path = name, path


@register("kv-link-profiles")
def _factory(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> KVLinkProfiles:
    reject_unknown(name, parameters, ("file", "reloadInterval", "topologyLabels"))
    path = parameters.get("file", os.environ.get(FILE_ENV, DEFAULT_FILE))
    if not isinstance(path, str) or not path:
        raise ConfigError(f"plugin {name!r}: file must be the path of a link-profiles file (kv-bandwidth-profiler --links writes one)")
    interval = positive_duration(name, parameters, "reloadInterval", "5s")
    labels = parameters.get("topologyLabels") or {}
    if not isinstance(labels, Mapping) or any(k not in LABEL_PARAMETERS or not isinstance(v, str) for k, v in labels.items()):
        raise ConfigError(f"plugin {name!r}: topologyLabels maps {', '.join(LABEL_PARAMETERS)} to pod label names")
    links = links_of(ctx)
    links.topology_labels = {**DEFAULT_TOPOLOGY_LABELS, **{LABEL_PARAMETERS[k]: v for k, v in labels.items()}}
    try:
        links.watch_file(path, interval)
    except LinkProfileError as e:
        raise ConfigError(f"plugin {name!r}: {e}") from None
    return KVLinkProfiles(name, path)
