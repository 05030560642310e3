"""Samples that cannot be read (or that a filter drops) are skipped, never fatal (issue 15)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# Unreadable or filtered items in a row before the run stops (one bad file among millions is skipped).
MAX_BAD_IN_A_ROW = 100


class BadSample(ValueError):
    """An item that cannot be read (truncated or corrupt image, non-UTF-8 caption): skipped."""


class SkipsBadSamples:
    """Mixin for map-style datasets: `__getitem__` skips unreadable or filtered items (`load_item`
    raises BadSample) to the next index. Unreadable ones are logged with their file and counted
    (`skipped`, per process); filtered ones (data/filters.py) are counted by their filter."""

    skipped = 0

    def load_item(self, i: int) -> dict:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        for attempt in range(MAX_BAD_IN_A_ROW):
            try:
                return self.load_item((i + attempt) % len(self))
            except BadSample as error:
                if getattr(error, "reason", None):  # a data filter: counted in its SampleFilters
                    log.debug("Filtered: %s", error)
                    continue
                type(self).skipped += 1
                log.warning("Skipped a bad sample (%d so far in this process): %s", type(self).skipped, error)
        raise RuntimeError(
            f"{MAX_BAD_IN_A_ROW} unreadable or filtered samples in a row from index {i}: check the data and data.filters."
        )
