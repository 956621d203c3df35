"""Structured logging: one JSON object per line, carrying experiment/round/site/task ids.

Usage::

    configure_logging("INFO")
    log = get_logger(__name__)
    with log_context(experiment="mnist-1", round=3):
        log.info("round started", extra={"sites": 4})
    # {"ts": "2025-01-01T12:00:00.123Z", "level": "INFO", "logger": "fedhpc.x",
    #  "msg": "round started", "experiment": "mnist-1", "round": 3, "sites": 4}

The ids live in a ``contextvars.ContextVar``, so they follow the code that set them
(including every gRPC handler, which grpc runs in its own context) but not new threads:
hand them over with ``contextvars.copy_context().run`` or ``log_context(**current_context())``.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, TextIO

__all__ = [
    "JsonFormatter",
    "TextFormatter",
    "configure_logging",
    "current_context",
    "get_logger",
    "log_context",
]

ContextValue = str | int

_EMPTY: Mapping[str, ContextValue] = MappingProxyType({})
_CONTEXT: contextvars.ContextVar[Mapping[str, ContextValue]] = contextvars.ContextVar(
    "fedhpc_log_context", default=_EMPTY
)

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
    | {"message", "asctime", "taskName"}
)
_CORE_FIELDS = ("ts", "level", "logger", "msg")
# Marks the handler configure_logging installed, so a second call replaces it instead of
# stacking another one (and leaves handlers others added, e.g. pytest's, alone).
_HANDLER_MARK = "_fedhpc_handler"


@contextmanager
def log_context(**ids: str | int | None) -> Iterator[None]:
    """Add ids (experiment=..., round=..., site=..., task=...) to every line logged inside.

    Nested contexts merge; an id given as None is removed for the inner scope.
    """
    merged = dict(_CONTEXT.get())
    for key, value in ids.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    token = _CONTEXT.set(MappingProxyType(merged))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current_context() -> dict[str, ContextValue]:
    """The ids log_context has set here (to hand over to another thread)."""
    return dict(_CONTEXT.get())


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and not k.startswith("_")}


def _timestamp(record: logging.LogRecord) -> str:
    when = dt.datetime.fromtimestamp(record.created, tz=dt.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, context ids, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        # Context ids first, then extras: an explicit extra is more specific than the scope.
        # Neither may overwrite a core field; a clash keeps both, the extra with a "_" suffix.
        for key, value in [*_CONTEXT.get().items(), *_extras(record).items()]:
            entry[f"{key}_" if key in _CORE_FIELDS else key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: a stray Path, datetime or enum in `extra=` must not lose the line.
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable lines for terminals: context ids and extras as key=value at the end."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = {**_CONTEXT.get(), **_extras(record)}
        if not fields:
            return line
        tail = " ".join(f"{k}={v}" for k, v in fields.items())
        head, sep, rest = line.partition("\n")  # keep a traceback below the fields
        return f"{head} [{tail}]{sep}{rest}"


def configure_logging(level: str = "INFO", json_format: bool = True, stream: TextIO | None = None) -> None:
    """Send every log record to `stream` (stderr by default) as JSON lines or text.

    Idempotent: calling it again replaces the handler it installed before.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
            handler.close()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else TextFormatter())
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(numeric)
