"""The ``mt`` command: train causal language models from TOML run files (see :mod:`mt.cli`)."""
