"""Silencing one known library warning for the length of a block."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


class _DropLines(logging.Filter):
    """Drops the records whose formatted message contains `fragment`."""

    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


@contextlib.contextmanager
def without_absl_lines(fragment: str) -> Iterator[None]:
    """The block without the `absl` logger's records containing `fragment`: a library's warning
    about something the caller expects or reports itself (the caller says which and why)."""
    logger, dropped = logging.getLogger("absl"), _DropLines(fragment)
    logger.addFilter(dropped)
    try:
        yield
    finally:
        logger.removeFilter(dropped)
