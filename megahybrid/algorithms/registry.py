"""Name -> algorithm class. A method is one file that decorates its class with `@register_algorithm("name")`."""
from __future__ import annotations

import importlib
import pkgutil

_REGISTRY: dict[str, type] = {}


def register_algorithm(name: str):
    def wrap(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"algorithm {name!r} registered twice ({_REGISTRY[name].__module__}, {cls.__module__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _import_all() -> None:
    """Import every module of megahybrid.algorithms so their registrations run."""
    import megahybrid.algorithms as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{mod.name}")


def get_algorithm(name: str) -> type:
    if name not in _REGISTRY:
        _import_all()
    return _REGISTRY[name]


def algorithm_names() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)
