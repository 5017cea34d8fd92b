"""What one request's end says about the endpoint that served it.

Classified from what ext_proc sees. Behind a real Envoy a refused connection, a reset before the
response and a route timeout reach ext_proc as Envoy's own 503/504 reply (checked with Envoy
1.40), so they are gateway failures by status, as in Envoy's outlier detection. A stream that
ends without its end-of-stream cannot be told apart from a client that went away; it is not held
against the endpoint, but it makes the EPP check the endpoint's readiness at once. A 200 stream
that ends with an SSE error event (how vLLM and the P/D proxy end a stream whose backend failed
after it started) counts with the event's status.
"""

from __future__ import annotations

import orjson

SUCCESS = "success"
HTTP_5XX = "http_5xx"  # 500, 501, 505, …: the endpoint answered with an error
GATEWAY_FAILURE = "gateway_failure"  # 502, 503, 504: unreachable, overloaded or timed out
FIRST_BYTE_TIMEOUT = "first_byte_timeout"  # no response within the request's deadline (the EPP's watchdog)
STREAM_STALLED = "stream_stalled"  # a started response that stopped sending
CLIENT_ERROR = "client_error"  # 4xx: the request's fault, not the endpoint's
ABORTED = "aborted_before_first_byte"  # the stream ended before any response
RESET = "reset_after_first_byte"  # the stream ended after the response started, before its end
EXPIRED = "expired"  # the EPP's request-timeout safety net released it
INTERNAL = "epp_error"  # the EPP itself failed the stream

KINDS = (SUCCESS, HTTP_5XX, GATEWAY_FAILURE, FIRST_BYTE_TIMEOUT, STREAM_STALLED, CLIENT_ERROR, ABORTED, RESET, EXPIRED, INTERNAL)
FAILURES = frozenset({HTTP_5XX, GATEWAY_FAILURE, FIRST_BYTE_TIMEOUT, STREAM_STALLED})
GATEWAY_FAILURES = frozenset({GATEWAY_FAILURE, FIRST_BYTE_TIMEOUT, STREAM_STALLED})  # Envoy maps timeouts to 504
SUSPICIOUS = frozenset({ABORTED, RESET})  # ambiguous: check the endpoint's readiness now


def stream_error_status(data: bytes) -> int:
    """The status of an SSE error event (`data: {"error": {…, "code": 503}}`, as vLLM and the P/D proxy end
    a stream that failed after it started); 500 when the event is cut off or names no code."""
    start = data.find(b'data: {"error"')
    line = data[start + 6:].split(b"\n", 1)[0]
    try:
        code = orjson.loads(line)["error"].get("code")
    except (orjson.JSONDecodeError, TypeError, AttributeError, KeyError):
        return 500
    return code if isinstance(code, int) and 400 <= code < 600 else 500


def classify(end: str, status: int, first_byte: bool) -> str:
    """`end` is how the stream ended (success | error | cancelled | timeout); `status` the response status (0 = none)."""
    if end == "timeout":
        return EXPIRED
    if status >= 500:
        return GATEWAY_FAILURE if status in (502, 503, 504) else HTTP_5XX
    if end == "cancelled":
        return RESET if first_byte else ABORTED
    if 400 <= status < 500:
        return CLIENT_ERROR
    if end == "error":  # an error end with no error status: the EPP failed the stream, not the endpoint
        return INTERNAL
    return SUCCESS


def plugin_outcome(kind: str) -> str:
    """The `outcome` ResponseComplete plugins get: success | error | client_error | cancelled | timeout."""
    if kind == SUCCESS:
        return "success"
    if kind in FAILURES:
        return "error"
    if kind == CLIENT_ERROR:
        return "client_error"
    if kind == EXPIRED:
        return "timeout"
    return "cancelled"
