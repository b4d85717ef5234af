"""Progress lines with an ETA for the long loops of a stage that are not optimizer steps.

Why: a stage's step-0 and final test evaluations, the probe pass that fills the prefix store and a
varpro step over every training row each run for minutes on a CPU, and a user watching ``ray job logs``
cannot tell a slow loop from a hung one. Lines are rate-limited by time (``train.progress_s``), not by
count, so a fast loop prints nothing and a slow one prints one line every ``progress_s`` seconds.
Only rank 0 prints (every rank runs the same loop on its share).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

log = logging.getLogger("tagray")
T = TypeVar("T")


def fmt_eta(seconds: float) -> str:
    """``1h05m`` / ``3m07s``."""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Counts units of a loop of known length and logs ``what: done/total unit (pct%), ETA`` at most
    every ``every_s`` seconds, then one closing line if any progress line was printed.

    Args:
        what: what the loop does, e.g. ``stage single: test evaluation (qed)``.
        total: units in the loop (batches, rows).
        every_s: seconds between lines (0: a line after every unit; None or < 0: silent).
        unit: what a unit is, for the line.
        enabled: False on ranks other than 0.
    """

    def __init__(self, what: str, total: int, every_s: float | None, unit: str = "batches", enabled=True):
        self.what, self.total, self.unit = what, total, unit
        self.every_s = every_s if (enabled and every_s is not None and every_s >= 0) else None
        self.done, self.printed = 0, 0
        self.t0 = self.last = time.time()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.time()
        if self.every_s is None or self.done >= self.total or now - self.last < self.every_s:
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        log.info(
            "%s: %d/%d %s (%d%%), ETA %s",
            self.what,
            self.done,
            self.total,
            self.unit,
            100 * self.done // max(1, self.total),
            fmt_eta((self.total - self.done) / max(rate, 1e-9)),
        )
        self.printed += 1

    def close(self) -> None:
        if self.printed:
            log.info("%s: %d %s in %s", self.what, self.done, self.unit, fmt_eta(time.time() - self.t0))


def progress(
    items: Iterable[T], what: str, every_s: float | None, unit: str = "batches", enabled: bool = True
) -> Iterator[T]:
    """Iterate ``items`` (a sized collection), counting one unit per item (see :class:`Progress`)."""
    items = list(items)
    p = Progress(what, len(items), every_s, unit, enabled)
    for x in items:
        yield x
        p.update()
    p.close()
