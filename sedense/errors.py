"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""


class SedenseError(Exception):
    """A problem with the user's input that they can fix; the message says what to do."""


class DataError(SedenseError, ValueError):
    """A problem with an image folder or a data option."""


class ConfigError(SedenseError, ValueError):
    """A problem with a model or trainer option, or with a checkpoint."""


class TrainingError(SedenseError):
    """Training cannot go on (e.g. the loss is no longer a number)."""
