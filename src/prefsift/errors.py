"""The one family of errors a user can cause. The CLI prints their message as one line and exits non-zero."""


class PrefsiftError(Exception):
    """An error in the user's input or environment (bad file, missing column, unknown method, ...)."""


class DataError(PrefsiftError):
    """A preference dataset that cannot be read or normalized."""


class ModelError(PrefsiftError):
    """A model or tokenizer that cannot be loaded."""


class ConfigError(PrefsiftError):
    """An option or config value outside its allowed range."""


class TrainingMovedNothing(ConfigError):
    """A training that left the model where it started: no optimizer step, or steps whose updates were within float
    rounding (e.g. every step inside the learning-rate warm-up). A run of many trainings marks that row instead of
    stopping."""
