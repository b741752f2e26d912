"""Errors that the job runner turns into exit 1 with a one-line message, kept apart from the
modules that raise them so that the runner can catch them without importing torch."""


class ModelError(RuntimeError):
    """A model cannot be found or loaded; the message says what to do."""
