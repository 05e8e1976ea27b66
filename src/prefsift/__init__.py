"""prefsift: score preference pairs with the model that will be aligned, keep the subset worth training on."""

__version__ = "0.1.0"

from prefsift.errors import ConfigError, DataError, ModelError, PrefsiftError  # noqa: E402

__all__ = ["ConfigError", "DataError", "ModelError", "PrefsiftError", "__version__"]
