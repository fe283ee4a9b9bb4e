"""The project's base error: anything that should reach a person as one clear line."""


class PlugshareError(Exception):
    """An error with a message fit to show as-is (what failed and what to do)."""
