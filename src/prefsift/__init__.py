"""prefsift: score preference pairs with the model that will be aligned, keep the subset worth training on.

The Python API, the functions the CLI's commands call (`prefsift.api`, docs/python-api.md):

    prefsift.score(data, policy=..., reference=..., methods=["irm"], out="scores/")  -> datasets.Dataset
    prefsift.select("scores/", out="subset/", fraction=0.25)                        -> datasets.Dataset
    prefsift.weigh / train / evaluate / compare / export / run

They load on first use, so `import prefsift` stays light.
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Any

__version__ = "0.1.0"

from prefsift.errors import ConfigError, DataError, ModelError, PrefsiftError  # noqa: E402

API = ("score", "select", "weigh", "train", "evaluate", "compare", "export", "run")

__all__ = ["ConfigError", "DataError", "ModelError", "PrefsiftError", "__version__", *API]


def _api_function(name: str):
    from prefsift import api  # the package's entry points: the one import above the package's own layer

    return getattr(api, name)


class _EntryModule(types.ModuleType):
    """A submodule named as an API function (`prefsift/score.py` and `prefsift.score(...)`). Importing a submodule
    binds it to the package's attribute of its name, so the function cannot hold that name: the module answers the
    call instead, and keeps every attribute of its own (`prefsift.score.write_scores`)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _api_function(self.__name__.rpartition(".")[2])(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:  # what `help`, IDEs and `inspect.signature` show for the call
        return inspect.signature(_api_function(self.__name__.rpartition(".")[2]))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # the import system binds `prefsift.score` (the submodule) here once it is loaded: make it callable
        if name in API and type(value) is types.ModuleType:
            value.__class__ = _EntryModule
        super().__setattr__(name, value)


def __getattr__(name: str) -> Any:
    """`prefsift.score` and the other entry points, loaded on first use."""
    if name not in API:
        raise AttributeError(f"module 'prefsift' has no attribute {name!r}")
    import importlib.util

    if importlib.util.find_spec(f"prefsift.{name}") is not None:  # a submodule of that name: it answers the call
        importlib.import_module(f"prefsift.{name}")
        return sys.modules[__name__].__dict__[name]
    return _api_function(name)


sys.modules[__name__].__class__ = _Package
