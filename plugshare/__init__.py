"""plugshare: a personal-cloud sharing node."""

__version__ = "0.1.0"
