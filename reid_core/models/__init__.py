"""Model registry: a plain dict from name to constructor.

Every model family registers its constructors here (``MODELS[name] = fn``); jobs build models with
``build_model(name, **kwargs)`` so that a config can name a model and an unknown name fails with the list of valid ones.
Constructors take explicit keyword arguments only (no config objects).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: add a constructor to ``MODELS`` under ``name`` (names are unique)."""

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model name {name!r} is registered twice")
        MODELS[name] = fn
        return fn

    return add


def build_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with its constructor's keyword arguments."""
    try:
        fn = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}") from None
    return fn(**kwargs)


# Import the model families so that they register themselves. Keep this list in one place.
from reid_core.models import condensenet, dcgan, dual_stream  # noqa: E402,F401
