"""lwm-data: the data side of Large World Model training, on Apache Beam."""

import logging
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lwm-data")  # pyproject.toml holds the one version
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"


class _BeamNoise(logging.Filter):
    """Drops two warnings Beam logs on every local run that say nothing to a user: BigQuery clients
    missing (lwm-data reads no BigQuery) and RunInference's memory probe being unavailable."""

    MESSAGES = ("apitools not found, and bigquery client libraries", "Resource module is not available")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.MESSAGES)


logging.getLogger().addFilter(_BeamNoise())
