"""`lwm-data stats DIR`: an output's stats, by the collector its stage registers.

The collectors (lwm_data.stats) sit below the registry that names them; this dispatcher sits above it.
"""

from __future__ import annotations

from lwm_data import outputs
from lwm_data.pipelines.registry import stage_of
from lwm_data.stats import DatasetStats


def collect_stats(directory: str) -> DatasetStats:
    """The stats of a stage's output, by the collector its stage registers."""
    manifest = outputs.read_manifest(directory)
    stats = DatasetStats(manifest["stage"], manifest["counts"])
    stage_of(manifest).stats(directory, stats)
    return stats
