"""lwm-data: the data side of Large World Model training, on Apache Beam."""

__version__ = "0.1.0"
