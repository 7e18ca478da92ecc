"""A config node read into its schema dataclass (:mod:`mmbridge.config.schema`): the typed
sections a run's consumers take instead of the raw config.

:func:`section` gives each field the node sets (a nested section as its own dataclass: a
stage's ``train``, ``lora``, ``optimizer``) and the schema's default for each it does not, so a
config stored by an older version (missing keys) reads as the current defaults;
:func:`mmbridge.config.validation.validate_config` has already checked the keys that are there.
:class:`mmbridge.runtime.config.RunConfig` assembles a whole run's sections from here; the
layers below the run (``training``, ``model``) read a stored config's stages with
:func:`stages_of`.

The ``trainer`` node is not a schema section: it goes to Lightning's ``Trainer`` as written.
The few Trainer arguments mmbridge reads itself are read through :func:`trainer_arg`, whose
:data:`TRAINER_DEFAULTS` say what a node that leaves one out means.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, TypeVar, cast, get_type_hints

from mmbridge.config import to_container
from mmbridge.config.schema import Stage

T = TypeVar("T")

#: What mmbridge reads a Trainer argument as when the ``trainer`` node leaves it out
#: (``conf/trainer/default.yaml``'s values; ``precision: auto`` is decided per machine,
#: :mod:`mmbridge.model.precision`). The node itself goes to Lightning as written.
TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "auto",
    "devices": 1,
    "num_nodes": 1,
    "strategy": "auto",
    "precision": "auto",
    "accumulate_grad_batches": 1,
    "enable_progress_bar": True,
}


def trainer_arg(trainer: Mapping[str, Any] | None, key: str) -> Any:
    """The Trainer argument ``key`` (one of :data:`TRAINER_DEFAULTS`) of a ``trainer`` node:
    its value, or the default where the node leaves it out or sets it to null."""
    value = (trainer or {}).get(key)
    return TRAINER_DEFAULTS[key] if value is None else value


@functools.cache
def _nested(schema: type) -> dict[str, type]:
    """Field name -> dataclass, for the fields of ``schema`` that are sections themselves."""
    hints = get_type_hints(schema)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(schema)
        if isinstance(hints.get(f.name), type) and dataclasses.is_dataclass(hints[f.name])
    }


def section(node: Mapping[str, Any] | None, schema: type[T]) -> T:
    """``node`` (a config node, resolved, or a plain mapping) as an instance of the dataclass
    ``schema``: each field the node sets, the schema's default for each it does not; a field
    that is a section itself is read the same way. Keys the schema does not know are left out
    (validation reports them), except where the schema passes keys through as written
    (``extra_keys``: a LoRA section's other ``peft.LoraConfig`` keys): those become attributes
    of the instance (``vars(section)`` lists them with the fields)."""
    data = to_container(node) if node is not None else {}
    fields = {f.name for f in dataclasses.fields(schema)}  # type: ignore[arg-type]
    nested = _nested(cast(type, schema))
    values = {
        k: section(v, nested[k]) if k in nested and isinstance(v, Mapping) else v
        for k, v in data.items()
        if k in fields
    }
    out = schema(**values)
    if hasattr(schema, "extra_keys"):  # passed through as written (checked by validation)
        for k, v in data.items():
            if k not in fields:
                setattr(out, k, v)
    return out


def stages_of(cfg: Mapping[str, Any]) -> dict[str, Stage]:
    """Every ``stages.<name>`` of a config (composed or stored, or its plain form) as a
    :class:`Stage`."""
    return {str(name): section(node, Stage) for name, node in (cfg.get("stages") or {}).items()}
