"""kdray's version (one place; ``kdray.__version__`` and the records of every run read it)."""

__version__ = "0.1.0"
