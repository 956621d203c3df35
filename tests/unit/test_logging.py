"""JSON log lines carry context ids and extras; configure_logging is idempotent."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from fedhpc.common.logging import configure_logging, current_context, get_logger, log_context


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    buffer = io.StringIO()
    configure_logging("DEBUG", stream=buffer)
    yield buffer
    for handler in list(root.handlers):
        if handler not in saved_handlers:
            root.removeHandler(handler)
    root.setLevel(saved_level)


def _lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_json_line_has_core_fields_context_ids_and_extras(stream: io.StringIO) -> None:
    log = get_logger("fedhpc.test")
    with log_context(experiment="exp-1", round=3), log_context(site="polaris", task="t-9"):
        log.info("task done %s", "ok", extra={"num_samples": 128, "path": io})
    (line,) = _lines(stream)
    assert line["level"] == "INFO"
    assert line["logger"] == "fedhpc.test"
    assert line["msg"] == "task done ok"
    assert line["ts"].endswith("Z") and "T" in line["ts"]
    assert (line["experiment"], line["round"], line["site"], line["task"]) == ("exp-1", 3, "polaris", "t-9")
    assert line["num_samples"] == 128
    assert "module 'io'" in line["path"]  # not JSON-serializable: str() instead of losing the line


def test_context_ends_with_the_block_and_none_removes_an_id(stream: io.StringIO) -> None:
    log = get_logger("fedhpc.test")
    with log_context(experiment="e", site="s"):
        with log_context(site=None):
            log.info("inner")
            assert current_context() == {"experiment": "e"}
        log.info("outer")
    log.info("after")
    inner, outer, after = _lines(stream)
    assert "site" not in inner and inner["experiment"] == "e"
    assert outer["site"] == "s"
    assert "experiment" not in after and "site" not in after


def test_exception_goes_into_exc_and_core_fields_win_over_extras(stream: io.StringIO) -> None:
    log = get_logger("fedhpc.test")
    try:
        raise ValueError("bad tensor")
    except ValueError:
        log.exception("rejected", extra={"level": "mine"})
    (line,) = _lines(stream)
    assert line["level"] == "ERROR" and line["level_"] == "mine"
    assert "ValueError: bad tensor" in line["exc"]


def test_context_does_not_leak_into_other_threads(stream: io.StringIO) -> None:
    log = get_logger("fedhpc.test")
    with log_context(experiment="e"):
        worker = threading.Thread(target=lambda: log.info("from thread"))
        worker.start()
        worker.join()
    (line,) = _lines(stream)
    assert "experiment" not in line


def test_configure_twice_replaces_its_handler_and_levels_apply(stream: io.StringIO) -> None:
    second = io.StringIO()
    configure_logging("WARNING", stream=second)
    configure_logging("WARNING", stream=second)
    log = get_logger("fedhpc.test")
    log.info("dropped")
    log.warning("kept")
    assert stream.getvalue() == ""
    assert [line["msg"] for line in _lines(second)] == ["kept"]


def test_text_format_shows_context_as_key_values(stream: io.StringIO) -> None:
    text = io.StringIO()
    configure_logging("info", json_format=False, stream=text)
    with log_context(experiment="e1"):
        get_logger("fedhpc.test").info("hello", extra={"n": 2})
    assert text.getvalue().rstrip().endswith("fedhpc.test: hello [experiment=e1 n=2]")


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("LOUD")
