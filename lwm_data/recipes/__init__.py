"""Whole pipelines: several stages as ONE Beam job (books, video), and `run`, the TOML entry."""
