"""Building components from config nodes: ``{name: <registry name>, **arguments}``.

Arguments are checked against the constructor's signature before anything is built, and every
problem is reported at once, naming the config key (torchtune-style validation).

A component that resolves names itself (an offline model name in ``path``, the tools a recipe
lists) declares a ``registry`` argument: :func:`build` passes it the registry it builds from,
the run's one registry, so nothing is looked up in a registry of its own making and an
in-process plugin is visible everywhere.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Container, Mapping
from typing import Any

from omegaconf import DictConfig

from mmbridge.config import to_container
from mmbridge.errors import ConfigError, did_you_mean
from mmbridge.registry import Entry, Registry

#: Constructor arguments that :func:`build` fills from the run, never from the config.
RUN_ARGUMENTS = ("registry",)


def _params(cls: type[Any]) -> tuple[dict[str, inspect.Parameter], bool]:
    sig = inspect.signature(cls.__init__)
    params = {
        n: p
        for n, p in sig.parameters.items()
        if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    return params, var_kw


def check_arguments(
    entry: Entry, key: str, args: Mapping[str, Any], injected: Container[str]
) -> list[str]:
    """Problems with building ``entry`` from ``args`` (plus ``injected`` by the assembly)."""
    params, var_kw = _params(entry.cls)
    from_run = {n for n in RUN_ARGUMENTS if n in params}
    errors = []
    for arg in args:
        if arg in from_run:
            errors.append(
                f"{key}.{arg}: set by the run (its registry), not by the config; remove it"
            )
            continue
        if arg in injected:
            continue
        if arg not in params and not var_kw:
            valid = [p for p in params if p not in injected and p not in from_run]
            errors.append(
                f"{key}.{arg}: not an argument of {entry.kind} '{entry.name}'"
                f"{did_you_mean(arg, valid)}; valid: {', '.join(valid) or '(none)'}"
            )
    for name, p in params.items():
        if (
            p.default is p.empty
            and name not in args
            and name not in injected
            and name not in from_run
        ):
            errors.append(f"{key}.{name}: required by {entry.kind} '{entry.name}' but not set")
    return errors


def split_node(node: Mapping[str, Any] | DictConfig | None, key: str) -> tuple[str, dict[str, Any]]:
    """``{name: x, **args}`` -> ``("x", args)``; a clear error if the node has no name."""
    if node is None:
        raise ConfigError(f"{key}: missing (expected a mapping with 'name' and arguments)")
    data = to_container(node)
    if not isinstance(data, dict) or "name" not in data:
        raise ConfigError(
            f"{key}: expected a mapping with a 'name' key (a registered component), got {data!r}"
        )
    name = data.pop("name")
    return str(name), data


def build(
    registry: Registry, kind: str, node: Mapping[str, Any] | DictConfig, key: str, **injected: Any
) -> Any:
    """Instantiate the component ``node.name`` of ``kind`` with the node's other keys as
    arguments (``injected`` ones, such as dimensions, win over the config's).

    A constructor with a ``registry`` argument receives ``registry`` (see :data:`RUN_ARGUMENTS`).
    ``obj.init_args`` records the name and the config's arguments (what a checkpoint stores).
    """
    name, args = split_node(node, key)
    try:
        entry = registry.get(kind, name)
    except KeyError as exc:
        raise ConfigError(f"{key}.name: {exc}") from None
    errors = check_arguments(entry, key, args, injected)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    kwargs = {k: v for k, v in args.items() if k not in injected}
    if "registry" in _params(entry.cls)[0]:
        injected = {**injected, "registry": registry}
    obj = entry.create(**kwargs, **injected)
    with contextlib.suppress(AttributeError):  # a slotted component: no identity to record
        obj.init_args = {"name": name, **kwargs}
    return obj
