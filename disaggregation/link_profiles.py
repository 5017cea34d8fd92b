"""kv-link-profiles and topology-extractor: what the EPP knows about the links between pods.

kv-link-profiles loads per-link KV-transfer profiles from a file (and follows its changes);
topology-extractor (llm-d's) names the pod labels that place an endpoint on a host, rack, zone
and region — the link classes and the topology-affinity plugins use the same labels.

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

from epp.datastore.links import LinkProfileError
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
    links.topology_labels.update({LABEL_PARAMETERS[k]: v for k, v in labels.items()})
    try:
        links.watch_file(path, interval)
    except LinkProfileError as e:
        raise ConfigError(f"plugin {name!r}: {e}") from None
    return KVLinkProfiles(name, path)


class TopologyExtractor:
    """llm-d's topology-extractor: which pod labels name an endpoint's host, rack, zone and region."""

    type_name = "topology-extractor"

    def __init__(self, name: str) -> None:
        self.name = name


@register("topology-extractor", experimental=True)
def _topology(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> TopologyExtractor:
    reject_unknown(name, parameters, tuple(LABEL_PARAMETERS))
    links = links_of(ctx)
    for key, level in LABEL_PARAMETERS.items():
        value = parameters.get(key)
        if value is not None:
            if not isinstance(value, str) or not value:
                raise ConfigError(f"plugin {name!r}: {key} must be a pod label name, got {value!r}")
            links.topology_labels[level] = value
    return TopologyExtractor(name)
