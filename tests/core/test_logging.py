import io
import json

from epp.observability.logging import configure_logging, get_logger


def test_json_lines_with_ts_level_msg_and_component():
    out = io.StringIO()
    configure_logging(verbosity=2, stream=out, component="epp")
    log = get_logger()
    log.info("Scoring decision", request_id="r1", selected="10.0.0.1:8000", scores={"a": 0.5})
    log.debug("hidden at -v=2")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 1
    event = lines[0]
    assert event["msg"] == "Scoring decision"
    assert event["level"] == "info"
    assert event["component"] == "epp"
    assert event["request_id"] == "r1" and event["scores"] == {"a": 0.5}
    assert event["ts"].endswith("Z") or "+00:00" in event["ts"]


def test_verbosity_3_enables_debug_and_binary_streams_work():
    out = io.BytesIO()
    configure_logging(verbosity=3, stream=out)
    get_logger().debug("detail", n=1)
    event = json.loads(out.getvalue().decode().strip())
    assert event["level"] == "debug" and event["n"] == 1


def test_grpc_library_errors_reach_the_json_log():
    import logging

    from structlog.testing import capture_logs

    from epp.observability.logging import forward_stdlib_logger

    forward_stdlib_logger("grpc")
    forward_stdlib_logger("grpc")  # idempotent
    with capture_logs() as logs:
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("grpc._cython.cygrpc").exception("Unexpected [ValueError] raised by servicer method")
        logging.getLogger("grpc.aio").debug("noise")
    assert [e["event"] for e in logs] == ["Unexpected [ValueError] raised by servicer method"]
    assert logs[0]["log_level"] == "error" and logs[0]["logger"] == "grpc._cython.cygrpc" and logs[0]["exc_info"]
