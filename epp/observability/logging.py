"""JSON logging with structlog, shared by the EPP and every other component of the project.

orjson renders the events because the EPP writes one line per request on the hot path.
Verbosity follows the Go EPP's `-v`: 2 (default) = info, 3 and above = debug.
"""

from __future__ import annotations

import io
import logging
import sys
from typing import IO, Any

import orjson
import structlog


def _orjson_dumps(obj: Any, default: Any = None) -> bytes:
    return orjson.dumps(obj, default=default or str, option=orjson.OPT_NON_STR_KEYS)


def level_for_verbosity(verbosity: int) -> int:
    return logging.DEBUG if verbosity >= 3 else logging.INFO


def configure_logging(verbosity: int = 2, stream: IO[bytes] | IO[str] | None = None, component: str | None = None,
                      level: int | None = None, console: bool = False) -> None:
    """Route structlog to `stream` (default stderr) as one JSON object per line.

    Every event has `ts` (ISO-8601 UTC), `level` and `msg`; `component` is added when given.
    `level` overrides the verbosity's level; `console` renders human-readable lines instead of JSON
    (the Go EPP's --zap-encoder=console).
    """
    out = stream if stream is not None else sys.stderr
    binary = getattr(out, "buffer", None)
    target = binary if binary is not None else out
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        structlog.processors.EventRenamer("msg"),
        structlog.processors.format_exc_info,
    ]
    if component:
        processors.insert(0, _add_component(component))
    if console:
        processors.append(structlog.dev.ConsoleRenderer(colors=False))
        factory: Any = structlog.PrintLoggerFactory(out)
    elif binary is None and isinstance(out, io.TextIOBase):
        processors.append(structlog.processors.JSONRenderer(serializer=lambda o, **kw: _orjson_dumps(o).decode()))
        factory = structlog.PrintLoggerFactory(target)
    else:
        processors.append(structlog.processors.JSONRenderer(serializer=_orjson_dumps))
        factory = structlog.BytesLoggerFactory(target)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level if level is not None else level_for_verbosity(verbosity)),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )


def _add_component(component: str):
    def processor(_logger: Any, _name: str, event: dict) -> dict:
        event.setdefault("component", component)
        return event

    return processor


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name) if name else structlog.get_logger()


class _ToStructlog(logging.Handler):
    """Stdlib records (gRPC's own) as structlog events, so they reach the same JSON log."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            log = structlog.get_logger(record.name)
            fields: dict[str, Any] = {"logger": record.name}
            if record.exc_info:
                fields["exc_info"] = record.exc_info
            getattr(log, record.levelname.lower(), log.error)(record.getMessage(), **fields)
        except Exception:  # a logging failure must never break the caller
            self.handleError(record)


def forward_stdlib_logger(name: str, level: int = logging.WARNING) -> None:
    """Send a library's stdlib logger (e.g. `grpc`, which has only a NullHandler) to our log, once."""
    logger = logging.getLogger(name)
    if not any(isinstance(h, _ToStructlog) for h in logger.handlers):
        logger.addHandler(_ToStructlog(level))
        logger.setLevel(min(logger.level or level, level))
