"""relay: one live world-model stream, many spectators."""

__version__ = "0.1.0"
