"""Parameters that published Go EPP configs carry and the Go EPP itself does not read.

Go decodes plugin parameters with `json.Unmarshal` (unknown fields dropped), and some factories
ignore their parameters altogether, so such configs run there. Here every other unknown parameter
is an error (a typo must not pass silently); these, and only these, load with a warning that says
what this EPP does instead. Keys are plugin types; paths are dotted parameter paths.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

IGNORED: dict[str, dict[str, str]] = {
    # llm-d's v0.3-era P/D guide gives queue-scorer the prefix-cache scorer's parameters; queue-scorer's
    # Go factory never reads its parameters.
    "queue-scorer": {
        key: "queue-scorer has no parameters (the Go factory ignores them too); set it on prefix-cache-scorer"
        for key in ("hashBlockSize", "maxPrefixBlocksToMatch", "lruCapacityPerServer")
    },
    "precise-prefix-cache-scorer": (_PRECISE := {
        # llm-d moved tokenization out of the indexer (a tokenizer sidecar, then the token producer)
        "indexerConfig.tokenizersPoolConfig": "llm-d later dropped it; tokenization is the token-producer's job here "
        "(created for this scorer with its defaults; add a token-producer plugin with tokenizerPath to encode as the model does)",
        "indexerConfig.kvBlockIndexConfig.maxPrefixBlocksToMatch": "not a field of llm-d's index config (Go drops it); "
        "the index here matches the whole prompt, bounded by the EPP's parse limits",
    }),
    "precise-prefix-cache-producer": _PRECISE,
}


def strip_ignored(type_name: str, parameters: Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[tuple[str, ...], str]]]:
    """`parameters` without the ignored paths present in it, and (path, reason) for each one removed."""
    table = IGNORED.get(type_name)
    if not table:
        return dict(parameters), []
    out = copy.deepcopy(dict(parameters))
    removed = []
    for dotted, reason in table.items():
        *parents, leaf = dotted.split(".")
        node: Any = out
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            del node[leaf]
            removed.append((tuple(dotted.split(".")), reason))
    return out, removed
