"""Model registry: a plain dict from name to constructor, and what each model is for and which inputs it takes.

Every model family registers its constructors here (``MODELS[name] = fn``); jobs build models with
``build_model(name, **kwargs)`` so that a config can name a model and an unknown name fails with the list of valid ones.
Constructors take explicit keyword arguments only (no config objects).

The registry is the one place that knows the models' names, their role (``"reid"`` feature models, ``"gan"``, parts)
and their input geometry: configs ask ``model_names(role)`` and ``check_input_size(name, (H, W))`` rather than keeping
lists of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows of a model besides its constructor.

    role: ``"reid"`` (a feature model a re-ID job trains), ``"gan"`` (a DC-GAN network) or ``"part"`` (a component).
    check_size: raises ValueError with a message a user can act on when an (H, W) input is not supported; None: any.
    """

    role: str
    check_size: Callable[[tuple[int, int]], None] | None = None


MODEL_INFO: dict[str, ModelInfo] = {}


def register_model(
    name: str, *, role: str = "part", check_size: Callable[[tuple[int, int]], None] | None = None
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: add a constructor to ``MODELS`` under ``name`` (names are unique), with its role and input check."""

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model name {name!r} is registered twice")
        MODELS[name] = fn
        MODEL_INFO[name] = ModelInfo(role=role, check_size=check_size)
        return fn

    return add


def model_names(role: str) -> tuple[str, ...]:
    """The registered models of one role, sorted (``"reid"``: what ``model.name`` of a re-ID config may be)."""
    return tuple(sorted(name for name, info in MODEL_INFO.items() if info.role == role))


def check_input_size(name: str, image_size: tuple[int, int]) -> None:
    """Raise ValueError (naming the model and the rule) unless the registered model ``name`` takes (H, W) inputs."""
    if name not in MODEL_INFO:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}")
    check = MODEL_INFO[name].check_size
    if check is not None:
        check(tuple(int(v) for v in image_size))


def build_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with its constructor's keyword arguments."""
    try:
        fn = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}") from None
    return fn(**kwargs)


# Import the model families so that they register themselves. Keep this list in one place.
from reid_core.models import condensenet, dcgan, dual_stream, resnet  # noqa: E402,F401
