"""Errors a user can act on.

Every error that is the user's to fix (an unknown name, a bad config value, a missing file, an
incompatible checkpoint) derives from :class:`PrismError`; the CLI prints its message and exits
non-zero instead of showing a traceback.
"""


class PrismError(Exception):
    """An error caused by user input, with a message that says what to change."""


class UnknownNameError(PrismError, KeyError):
    """A registry lookup for a name nobody registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateNameError(PrismError):
    """A plugin registered a name that is already taken without asking to override it."""


class ConfigError(PrismError):
    """A configuration value is missing, of the wrong kind, or inconsistent with another."""


class DataError(PrismError):
    """A data path is missing or a dataset cannot be read."""


class CheckpointError(PrismError):
    """A checkpoint cannot be restored into the configured run."""


class NonFiniteLossError(PrismError):
    """Training produced a NaN or infinite loss."""
