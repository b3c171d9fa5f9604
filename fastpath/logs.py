"""Structured, quiet-by-default logging: `key=value` lines or JSON objects on stderr."""

from __future__ import annotations

import json
import logging
import sys
import time


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (f"ts={stamp}Z level={record.levelname.lower()} logger={record.name} "
                f"msg={json.dumps(record.getMessage())}")
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup(level: str = "warning", fmt: str = "kv") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger("lrk")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # what a daemon serves when it starts and why it stops: one line each, at any level
    logging.getLogger("lrk.lifecycle").setLevel(logging.INFO)
