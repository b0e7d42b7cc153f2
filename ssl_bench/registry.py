"""Method registry: ``@register_method`` on a class, built-ins found in ``methods/``, third-party
methods through the entry-point group ``ssl_bench.methods``."""
from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from ssl_bench.errors import UserError

ENTRY_POINT_GROUP = "ssl_bench.methods"
_METHODS: dict[str, type] = {}
_discovered = False


def register_method(cls: type) -> type:
    """Class decorator: make ``cls`` available as ``--method cls.name``."""
    for attr in ("name", "description"):
        if not getattr(cls, attr, None):
            raise TypeError(f"{cls.__qualname__} must define a class attribute '{attr}'")
    existing = _METHODS.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise TypeError(f"method name '{cls.name}' is taken by {existing.__module__}.{existing.__qualname__}")
    _METHODS[cls.name] = cls
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    import methods

    for info in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"methods.{info.name}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()  # importing the module runs its @register_method
        if isinstance(obj, type) and getattr(obj, "name", None) and obj.name not in _METHODS:
            register_method(obj)


def available_methods() -> dict[str, type]:
    _discover()
    return dict(sorted(_METHODS.items()))


def get_method(name: str) -> type:
    known = available_methods()
    if name not in known:
        raise UserError(f"unknown method '{name}'; known methods: {', '.join(known)} (see `ssl-bench methods`)")
    return known[name]
