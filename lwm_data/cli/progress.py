"""Live progress of a local run: what each stage's counters say so far, redrawn twice a second.

The numbers come from this process's tally (lwm_data.pipelines.tally), which every counter of a
local run adds into while the job runs. Where workers are other processes (`--direct_running_mode
multi_processing`, Dataflow) the tally stays empty, the display says so, and Dataflow's UI shows the
same counters.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.live import Live
from rich.table import Table

from lwm_data.pipelines.tally import IN_FLIGHT, TALLY, Tally

RATES = ("tokens", "frames", "requests", "chunks", "examples", "pairs")  # shown per second when a stage has them


def table(snapshot: dict[str, dict[str, int]], seconds: float) -> Table:
    """One row per stage: in, out, dead-lettered, and its statistics with rates."""
    view = Table(title=f"lwm-data: {seconds:.0f}s", title_justify="left")
    for column in ("stage", "in", "out", "dead-lettered", "progress"):
        view.add_column(column, justify="left" if column in ("stage", "progress") else "right")
    if not snapshot:
        view.add_row("(workers in other processes: counts at the end)", "", "", "", "")
    for stage, counts in snapshot.items():
        dead = sum(v for k, v in counts.items() if k.startswith("dead_lettered."))
        stats = [
            f"{name} {counts[name]:,} ({counts[name] / max(seconds, 1e-9):,.0f}/s)" for name in RATES if name in counts
        ]
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
