"""Protocol registry: the one list of evaluation protocols that ``ssl-bench eval``, ``bench``, sweeps and
the leaderboard use.

A protocol is a function ``evaluate(ctx: evals.run.EvalContext) -> dict`` returning at least ``top1``
(test split, percent), ``selected`` (what was chosen on the held-out split) and ``details``, registered
with ``@register_protocol``. The built-ins (``BUILTIN``: modules ``evals/<name>.py``) register themselves
when imported; a third-party package adds one through the entry-point group ``ssl_bench.protocols``
(``name = "package.module:function"``, the entry-point name being the protocol's name):

    @register_protocol("nearest_centroid", presets={"smoke": {"train_size": 500}}, feature_kinds=("cls",))
    def evaluate(ctx): ...

Its settings are a section of the eval preset named after it (overridable as ``name.key=value``): the
preset's train / held-out / test split sizes, then ``presets[preset]`` on top. Listing names needs no
import (the leaderboard stays torch-free); getting a protocol imports its module.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points

from ssl_bench.errors import UserError

ENTRY_POINT_GROUP = "ssl_bench.protocols"
BUILTIN = ("knn", "linear", "attentive", "finetune")  # evals/<name>.py; also the display order


@dataclass(frozen=True)
class Protocol:
    name: str
    evaluate: Callable[..., dict]
    presets: Mapping[str, dict] | None = None  # preset -> settings; None: the built-in section of evals.presets
    # frozen-encoder features to extract in one pass ("cls", "mean", "patches"), for every split; or a function
    # of the protocol's settings -> {split: kinds} (the built-in probes: what each mode reads from the cache)
    feature_kinds: tuple[str, ...] | Callable[[dict], dict[str, tuple[str, ...]]] = ()
    description: str = field(default="", compare=False)


_PROTOCOLS: dict[str, Protocol] = {}
_loaded: set[str] = set()


def register_protocol(name: str, *, presets: Mapping[str, dict] | None = None, feature_kinds: tuple[str, ...] | Callable = (),
                      description: str = "") -> Callable:
    """Function decorator: make ``fn(ctx) -> dict`` available as the protocol ``name``."""
    if not name or not name.replace("_", "").isalnum():
        raise TypeError(f"protocol name '{name}' must be letters, digits and underscores")

    def decorate(fn: Callable) -> Callable:
        existing = _PROTOCOLS.get(name)
        if existing is not None and existing.evaluate.__qualname__ != fn.__qualname__:
            raise TypeError(f"protocol name '{name}' is taken by {existing.evaluate.__module__}.{existing.evaluate.__qualname__}")
        doc = description or (fn.__doc__ or "").strip().split("\n")[0]
        kinds = feature_kinds if callable(feature_kinds) else tuple(feature_kinds)
        _PROTOCOLS[name] = Protocol(name, fn, None if presets is None else dict(presets), kinds, doc)
        return fn

    return decorate


def _plugin_entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in BUILTIN}


def protocol_names() -> list[str]:
    """Every protocol's name, built-ins first in display order, then plug-ins by name; imports nothing."""
    return [*BUILTIN, *sorted(set(_plugin_entry_points()) | (set(_PROTOCOLS) - set(BUILTIN)))]


def get_protocol(name: str) -> Protocol:
    """The registered protocol ``name`` (importing its module); unknown or broken: UserError."""
    if name not in _PROTOCOLS and name not in _loaded:
        _loaded.add(name)
        if name in BUILTIN:
            try:
                importlib.import_module(f"evals.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"evals.{name}":
                    raise
                raise UserError(f"protocol '{name}' is not available in this checkout (evals/{name}.py is missing)") from None
        elif name in (eps := _plugin_entry_points()):
            eps[name].load()  # importing the module runs its @register_protocol
    if name not in _PROTOCOLS:
        if name in BUILTIN or name in _plugin_entry_points():
            raise UserError(f"protocol '{name}' is declared but its module registers no protocol of that name; "
                            f"decorate its evaluate function with @register_protocol('{name}')")
        raise UserError(f"unknown protocol '{name}'; choose from {', '.join(protocol_names())}")
    return _PROTOCOLS[name]


def kinds_per_split(protocol: Protocol, params: dict) -> dict[str, tuple[str, ...]]:
    """{split: the cached feature kinds ``protocol`` reads from it} under the settings ``params``."""
    if callable(protocol.feature_kinds):
        return protocol.feature_kinds(params)
    return dict.fromkeys(("train", "heldout", "test"), protocol.feature_kinds)


def protocol_order(name: str) -> int:
    """Display position: built-ins in ``BUILTIN`` order, every other protocol after them."""
    return BUILTIN.index(name) if name in BUILTIN else len(BUILTIN)
