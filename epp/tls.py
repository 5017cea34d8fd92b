"""--tls-min-version and --tls-cipher-suites with Go's spellings, applied to gRPC's TLS (BoringSSL).

gRPC in Python negotiates TLS 1.2 or 1.3 and takes its TLS ≤ 1.2 cipher list from
GRPC_SSL_CIPHER_SUITES (read once per process). So: a minimum of TLS 1.0–1.2 is what gRPC
enforces anyway (1.2); TLS 1.3 as a minimum cannot be enforced and is refused at startup rather
than pretended; cipher suites map to OpenSSL names and, as in Go, only affect TLS 1.2.
"""

from __future__ import annotations

TLS_VERSIONS = ("VersionTLS10", "VersionTLS11", "VersionTLS12", "VersionTLS13")
# Go crypto/tls suite names (TLS 1.2 and below) -> OpenSSL/BoringSSL names.
GO_CIPHER_SUITES = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
}
TLS13_SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256")


def grpc_cipher_suites(min_version: str, suites: list[str]) -> str | None:
    """The GRPC_SSL_CIPHER_SUITES value for these flags (None: gRPC's defaults). ValueError says what to change."""
    if min_version:
        if min_version not in TLS_VERSIONS:
            raise ValueError(f"invalid --tls-min-version {min_version!r}; use one of {', '.join(TLS_VERSIONS)}")
        if min_version == "VersionTLS13":
            raise ValueError("--tls-min-version=VersionTLS13 cannot be enforced by gRPC in Python (it always accepts TLS 1.2); "
                             "use VersionTLS12, or terminate TLS in front of the EPP")
    if not suites:
        return None
    names = []
    for suite in suites:
        if suite in TLS13_SUITES:
            continue  # as in Go: TLS 1.3 suites are not configurable
        if suite not in GO_CIPHER_SUITES:
            raise ValueError(f"invalid --tls-cipher-suites entry {suite!r}; use Go crypto/tls names such as "
                             "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256")
        names.append(GO_CIPHER_SUITES[suite])
    return ":".join(dict.fromkeys(names)) or None
