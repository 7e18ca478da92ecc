"""The schema's sections as Hydra structured configs: the defaults of the top-level keys, of
``loader``, ``evaluation``, ``paths``, ``debug``, ``conversation`` and of each ``stages.<name>``
entry are those of the dataclasses in :mod:`mmbridge.config.schema`, written nowhere else.

:func:`register` stores two nodes in Hydra's ConfigStore, in the internal group ``_schema`` (not
a config folder: ``mmbridge config --groups`` does not list it):

- ``_schema/root``, first in the defaults list of ``conf/train.yaml``: the keys of
  :class:`~mmbridge.config.schema.Root` and one node per section of
  :data:`~mmbridge.config.schema.SECTIONS`;
- ``_schema/stage``, first in the defaults list of each ``conf/stage/*.yaml``, which then sets
  only what its stage changes.

A section is a structured node: composing a key that its dataclass lacks is an error
(``Key 'max_stepz' not in 'Stage'``, worded by :func:`mmbridge.config.explain_hydra_error`);
a ``+key=value`` on the command line still adds one, and validation reports it with the valid
keys. The values are typed ``Any``: OmegaConf would convert a wrong value (``3`` to ``true``,
``3`` to ``"3"``; a ``bool | str`` it refuses outright) and stop at the first, where
:mod:`mmbridge.config.validation` names every bad value with what is valid. A section open to a
library's keys (``lora``: the keys of ``peft.LoraConfig``) is a plain mapping of its defaults,
and the top level stays open (a plugin's config group adds a top-level key).
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

import mmbridge.config.schema as schema

GROUP = "_schema"

_BUILT: dict[str, Any] = {}


def _open(cls: type) -> bool:
    """A section that takes keys beyond its fields (``Lora``: peft.LoraConfig's)."""
    return hasattr(cls, "extra_keys")


def _factory(value: Any) -> Any:
    return lambda: copy.deepcopy(value)


def node_class(cls: type, value: Any = None) -> type:
    """A dataclass with the fields of the schema dataclass ``cls``, typed ``Any``, whose defaults
    are those of ``value`` (default: ``cls()``); a nested section becomes a nested node class.

    It is defined in this module under ``cls``'s name, so that a composed config (which holds
    its class) pickles (joblib and submitit launchers send it to other processes)."""
    value = cls() if value is None else value
    hints = typing.get_type_hints(cls)
    specs: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(cls):
        hint, default = hints[f.name], getattr(value, f.name)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint) and not _open(hint):
            sub = node_class(hint, default)
            specs.append((f.name, sub, dataclasses.field(default_factory=sub)))
        elif dataclasses.is_dataclass(default):
            plain = dataclasses.asdict(default)  # type: ignore[arg-type]
            specs.append((f.name, Any, dataclasses.field(default_factory=_factory(plain))))
        elif isinstance(default, list | dict):
            specs.append((f.name, Any, dataclasses.field(default_factory=_factory(default))))
        else:
            specs.append((f.name, Any, dataclasses.field(default=default)))
    node = dataclasses.make_dataclass(cls.__name__, specs, namespace={"__module__": __name__})
    globals()[cls.__name__] = node
    return node


def _defaults() -> str:
    """The schema's sections and their defaults, in words: the nodes are built again when this
    changes (a test that changes a default), else kept (so a composed config's class stays the
    one pickle finds here)."""
    values = {
        "root": schema.Root(),
        "stage": schema.Stage(),
        **{key: cls() for key, cls in schema.SECTIONS.items()},
    }
    return repr({k: (type(v), dataclasses.asdict(v)) for k, v in values.items()})


def nodes() -> tuple[DictConfig, type]:
    """``(root, stage)``: the top level with its sections, and the node of one stage."""
    key = _defaults()
    if _BUILT.get("key") != key:
        root = OmegaConf.create(dataclasses.asdict(schema.Root()))
        for name, cls in schema.SECTIONS.items():
            root[name] = OmegaConf.structured(node_class(cls))
        _BUILT.update(key=key, root=root, stage=node_class(schema.Stage))
    return _BUILT["root"], _BUILT["stage"]


def register() -> None:
    """Store ``_schema/root`` and ``_schema/stage`` in Hydra's ConfigStore (before a config is
    composed: :func:`mmbridge.config.compose` and ``mmbridge train`` call it)."""
    root, stage = nodes()
    store = ConfigStore.instance()
    store.store(group=GROUP, name="root", node=root, provider="mmbridge")
    store.store(group=GROUP, name="stage", node=stage, provider="mmbridge")


nodes()  # at import: a pickled config's node classes are found here in a fresh process
