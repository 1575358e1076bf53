"""This process's running counter totals, beside Beam's metrics, for the live progress view.

Beam's metrics reach the launcher only when a job ends, so every `Counters` call (lwm_data.pipelines.
common) also adds into `TALLY`. A local run executes its DoFns in the launching process (FnApiRunner,
in-memory mode), so `lwm_data.cli.progress` can show records in and out, dead letters and each stage's
running statistics while the job runs. Where workers are other processes (`--direct_running_mode
multi_processing`, Dataflow) the tally stays empty.
"""

from __future__ import annotations

import threading
from collections import defaultdict

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
