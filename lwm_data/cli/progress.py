"""Live progress of a local run: what each stage's counters say so far, redrawn twice a second.

Beam's metrics reach the launcher only when a job ends, so the counters also add into this
process's `TALLY` (lwm_data.pipelines.common.Counters). A local run executes its DoFns in this
process (FnApiRunner, in-memory mode), so `live()` can show records in and out, dead letters and
each stage's running statistics (tokens, frames, requests, ...) with rates while the job runs. Where
workers are other processes (`--direct_running_mode multi_processing`, Dataflow) the tally stays
empty, the display says so, and Dataflow's UI shows the same counters.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.live import Live
from rich.table import Table

RATES = ("tokens", "frames", "requests", "chunks", "examples", "pairs")  # shown per second when a stage has them
IN_FLIGHT = "in_flight"  # a gauge, not a total: requests sent and not yet answered (QA)


class Tally:
    """Counter totals of this process, by (stage, name); thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._totals: dict[tuple[str, str], int] = defaultdict(int)

    def add(self, stage: str, name: str, n: int) -> None:
        with self._lock:
            self._totals[(stage, name)] += n

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            items = list(self._totals.items())
        stages: dict[str, dict[str, int]] = {}
        for (stage, name), value in items:
            stages.setdefault(stage, {})[name] = value
        return stages

    def clear(self) -> None:
        with self._lock:
            self._totals.clear()


TALLY = Tally()


def table(snapshot: dict[str, dict[str, int]], seconds: float) -> Table:
    """One row per stage: in, out, dead-lettered, and its statistics with rates."""
    view = Table(title=f"lwm-data: {seconds:.0f}s", title_justify="left")
    for column in ("stage", "in", "out", "dead-lettered", "progress"):
        view.add_column(column, justify="left" if column in ("stage", "progress") else "right")
    if not snapshot:
        view.add_row("(workers in other processes: counts at the end)", "", "", "", "")
    for stage, counts in snapshot.items():
        dead = sum(v for k, v in counts.items() if k.startswith("dead_lettered."))
        stats = [f"{name} {counts[name]:,} ({counts[name] / max(seconds, 1e-9):,.0f}/s)" for name in RATES if name in counts]
        if IN_FLIGHT in counts:
            stats.append(f"in flight {counts[IN_FLIGHT]:,}")
        view.add_row(stage, f"{counts.get('in', 0):,}", f"{counts.get('out', 0):,}", f"{dead:,}", "  ".join(stats))
    return view


@contextmanager
def live(console: Console | None = None, enabled: bool | None = None) -> Iterator[Tally]:
    """Show the tally while the block runs (on a terminal, unless told otherwise)."""
    console = console or Console(stderr=True)
    enabled = sys.stderr.isatty() if enabled is None else enabled
    TALLY.clear()
    if not enabled:
        yield TALLY
        return
    start = time.monotonic()
    with Live(table({}, 0), console=console, refresh_per_second=2, transient=True) as display:
        stop = threading.Event()

        def redraw() -> None:
            while not stop.wait(0.5):
                display.update(table(TALLY.snapshot(), time.monotonic() - start))

        thread = threading.Thread(target=redraw, daemon=True)
        thread.start()
        try:
            yield TALLY
        finally:
            stop.set()
            thread.join()
