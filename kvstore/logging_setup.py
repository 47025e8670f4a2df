"""Logging for the daemon's processes: one line per event on stderr.

Called by the CLI, never on import: a library that configures the root logger takes that
choice away from whoever embeds it.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s [%(process)d]: %(message)s"
DATEFMT = "%Y-%m-%dT%H:%M:%S"


def configure(level: str) -> None:
    """Route the root logger to stderr at `level` (a name such as "info")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    root = logging.getLogger()
    for old in list(root.handlers):  # a second call (tests, the demo) must not double every line
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # grpc's Python layer logs every loop lookup at DEBUG; that drowns our own debug lines.
    logging.getLogger("grpc").setLevel(max(root.level, logging.INFO))
