"""lwm-data: the data side of Large World Model training, on Apache Beam."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lwm-data")  # pyproject.toml holds the one version
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
