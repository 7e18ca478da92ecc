"""One pass over a composed config that reports every problem at once, before anything is built.

Checks the non-component sections against :mod:`mmbridge.config.schema` (types, ranges, unknown keys
with a did-you-mean), the schedule, the Lightning ``trainer`` arguments, and every component
node against its constructor (unknown names, unknown / missing arguments, values whose type
does not match the parameter's annotation). Each line of the error names the key, the bad
value and what is valid.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Container, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union, cast, get_args, get_origin

from omegaconf import DictConfig, OmegaConf

from mmbridge.config import group_options
from mmbridge.config.build import check_arguments
from mmbridge.config.mixture import is_mixture, mixture_errors
from mmbridge.config.model_spec import BRANCHES_KEY, branch_problems, model_nodes, node_at
from mmbridge.config.preflight import output_errors
from mmbridge.config.schema import COMPONENTS, SECTIONS, Conversation, Root, Rule, Stage
from mmbridge.errors import ConfigError, did_you_mean
from mmbridge.registry import Entry, Registry

# Trainer arguments the stage runner sets itself (from stages.<name>); a `trainer.` copy clashes.
RUNNER_TRAINER_ARGS = ("max_steps", "val_check_interval", "default_root_dir", "callbacks", "logger")


# -- values against types -------------------------------------------------------------------------
def describe(hint: Any) -> str:
    """Words for a type hint: ``int`` -> "an integer", ``list[str]`` -> "a list of strings"."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        inner = describe(args[0]).split(" ", 1)[-1] + "s" if args else "values"
        return f"a list of {inner}" if args else "a list"
    if origin in (dict, Mapping) or hint is dict:
        return "a mapping"
    return {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        type(None): "null",
    }.get(hint, getattr(hint, "__name__", str(hint)))


def type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` (plain, resolved) fits ``hint``; hints this cannot judge pass."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any or hint is object:
        return True
    if origin in (Union, types.UnionType):
        return any(type_ok(value, a) for a in args)
    if origin is Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        inner = (
            args[0]
            if args and (origin is not tuple or len(args) == 2 and args[1] is Ellipsis)
            else Any
        )
        return all(type_ok(v, inner) for v in value)
    if origin in (dict, Mapping) or hint is dict:
        return isinstance(value, dict)
    return True  # a class this check does not know (a Path, a module): the constructor judges


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def expected(hint: Any, rule: Rule | None = None) -> str:
    """What is valid: "an integer >= 1", "one of frozen, lora, full",
    "a list of strings, not empty"."""
    if rule is None:
        return describe(hint)
    if rule.valid.startswith((">", "<", "in ")):
        return f"{describe(hint)} {rule.valid}"
    if rule.valid.startswith(("one of", "two", "null")):
        return rule.valid
    return f"{describe(hint)}, {rule.valid}"


def check_value(key: str, value: Any, hint: Any, rule: Rule | None = None) -> str | None:
    """The problem with ``key=value`` against ``hint`` and ``rule``, or ``None``."""
    if value == "???":
        return f"{key}: not set (expected {expected(hint, rule)})"
    if isinstance(value, float) and not math.isfinite(value):  # nan fails no comparison
        return f"{key}={value}: expected a finite number" + (f" {rule.valid}" if rule else "")
    if not type_ok(value, hint) or (rule is not None and value is not None and not rule.ok(value)):
        return f"{key}={_show(value)}: expected {expected(hint, rule)}"
    return None


def check_section(key: str, data: Any, schema: type) -> list[str]:
    """Problems of the mapping ``data`` at ``key`` against the dataclass ``schema`` (recursive)."""
    if not isinstance(data, dict):
        return [
            f"{key}={_show(data)}: expected a mapping of "
            f"{', '.join(f.name for f in dataclasses.fields(schema))}"
        ]
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    errors = []
    for name, value in data.items():
        sub = f"{key}.{name}" if key else str(name)
        if name not in fields:
            # a schema open to a library's keys (Lora: peft.LoraConfig's) lists them on demand
            extra = schema.extra_keys() if hasattr(schema, "extra_keys") else {}
            if name in extra:
                continue
            where = key or "the top level"
            more = (
                f"; or a key of {getattr(schema, 'extra_source', 'its library')}" if extra else ""
            )
            errors.append(
                f"{sub}={_show(value)}: not a key of {where}"
                f"{did_you_mean(str(name), [*fields, *extra])}; valid: {', '.join(fields)}{more}"
            )
            continue
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            errors += check_section(sub, value, hint)
            continue
        problem = check_value(sub, value, hint, fields[name].metadata.get("rule"))
        if problem:
            errors.append(problem)
    return errors


# -- component nodes ------------------------------------------------------------------------------
def _hints(cls: type[Any]) -> dict[str, Any]:
    """The constructor's annotations, evaluated; one that names a missing optional dependency
    is left out (that argument is not type-checked)."""
    init = cls.__init__
    try:
        return typing.get_type_hints(init)
    except Exception:
        pass
    namespace = getattr(inspect.getmodule(init), "__dict__", {})
    hints = {}
    for name, p in inspect.signature(init).parameters.items():
        if p.annotation is p.empty:
            continue
        try:  # what typing.get_type_hints does, one parameter at a time
            hints[name] = (
                eval(p.annotation, namespace) if isinstance(p.annotation, str) else p.annotation
            )
        except Exception:
            continue
    return hints


def check_types(
    entry: Entry, key: str, args: Mapping[str, Any], injected: Container[str] = ()
) -> list[str]:
    """Arguments of ``entry`` whose value does not fit the constructor's annotation."""
    hints = _hints(entry.cls)
    errors = []
    for name, value in args.items():
        if name in injected or name not in hints:
            continue
        if not type_ok(value, hints[name]):
            errors.append(
                f"{key}.{name}={_show(value)}: expected {describe(hints[name])} "
                f"(argument of {entry.kind} '{entry.name}')"
            )
    return errors


def check_node(
    registry: Registry, kind: str, node: Any, key: str, injected: Container[str] = ()
) -> list[str]:
    """Problems of one component node ``{name: ..., **args}``: its name, arguments and their
    types."""
    if not isinstance(node, dict) or "name" not in node:
        return [f"{key}={_show(node)}: expected a mapping with a 'name' key (a registered {kind})"]
    args = {k: v for k, v in node.items() if k != "name"}
    try:
        entry = registry.get(kind, str(node["name"]))
    except KeyError as exc:
        return [f"{key}.name: {exc}"]
    return check_arguments(entry, key, args, injected) + check_types(entry, key, args, injected)


def _trainer_errors(trainer: Any) -> list[str]:
    if not isinstance(trainer, dict):
        return [f"trainer={_show(trainer)}: expected a mapping of Lightning Trainer arguments"]
    import lightning as L  # heavy: only a whole training config needs it, not option parsing

    params = [p for p in inspect.signature(L.Trainer.__init__).parameters if p != "self"]
    hints = _hints(L.Trainer)
    errors = []
    for name, value in trainer.items():
        if name in RUNNER_TRAINER_ARGS:
            errors.append(
                f"trainer.{name}={_show(value)}: set by the stage runner (stages.<name>.max_steps, "
                f"val_every); remove it from trainer"
            )
        elif name not in params:
            errors.append(
                f"trainer.{name}={_show(value)}: not an argument of lightning.Trainer"
                f"{did_you_mean(str(name), params)}"
            )
        elif problem := _trainer_value_error(name, value, hints):
            errors.append(problem)
    return errors


# Trainer values the project resolves itself before Lightning sees them (training/trainer.py);
# ``strategy`` is built by training/strategies.py (a name or a mapping), so Lightning's
# annotation does not judge it.
PROJECT_TRAINER_VALUES: dict[str, tuple[Any, ...]] = {"precision": ("auto",)}
UNTYPED_TRAINER_ARGS = ("strategy", "plugins", "profiler")


def _trainer_value_error(name: str, value: Any, hints: Mapping[str, Any]) -> str | None:
    """The problem of ``trainer.<name>=value`` against ``lightning.Trainer``'s annotation (and,
    for ``accelerator``, its registry of names), or ``None``: caught here, before the data and
    the model are built, instead of as Lightning's ``ValueError`` when the first stage starts."""
    hint = hints.get(name)
    if (
        hint is None
        or name in UNTYPED_TRAINER_ARGS
        or value in PROJECT_TRAINER_VALUES.get(name, ())
    ):
        return None
    if not type_ok(value, hint):
        extra = "".join(f"{v!r} or " for v in PROJECT_TRAINER_VALUES.get(name, ()))
        return (
            f"trainer.{name}={_show(value)}: expected {extra}{describe(hint)} "
            f"(argument of lightning.Trainer)"
        )
    if name == "accelerator" and isinstance(value, str):
        from lightning.pytorch.accelerators import AcceleratorRegistry

        names = ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())]
        if value not in names:
            return (
                f"trainer.accelerator={value!r}: not an accelerator{did_you_mean(value, names)}; "
                f"valid: {', '.join(names)}"
            )
    return None


def data_errors(registry: Registry, node: Any, key: str) -> list[str]:
    """Problems of a data node at ``key``: one data set, or a mixture of several
    (:mod:`mmbridge.data.mixture`: its own keys, then each source as ``{key}.sources.<i>``)."""
    if not is_mixture(node):
        return check_node(registry, "dataset", node, key)
    errors = mixture_errors(node, key)
    for i, src in enumerate(node.get("sources") or []):
        if isinstance(src, dict):
            errors += check_node(
                registry,
                "dataset",
                {k: v for k, v in src.items() if k != "weight"},
                f"{key}.sources.{i}",
            )
    return errors


def _component_errors(data: dict, registry: Registry) -> list[str]:
    errors = branch_problems(data)
    for comp in model_nodes(
        data
    ):  # the model config's shape and injections: mmbridge.config.model_spec
        value = node_at(data, comp.key)
        if value is None and (comp.key.startswith(f"{BRANCHES_KEY}.") or comp.key not in data):
            continue  # a missing main node is the schema's to report; a broken branch is above
        errors += check_node(registry, comp.kind, value, comp.key, dict.fromkeys(comp.injected, 0))
    if "data" in data:
        errors += data_errors(registry, data["data"], "data")
    stages = s if isinstance(s := data.get("stages"), dict) else {}
    for name in data.get("schedule") or []:
        stage = stages.get(name)
        if isinstance(stage, dict) and stage.get("recipe") is not None:
            errors += check_node(registry, "recipe", stage["recipe"], f"stages.{name}.recipe")
        if isinstance(stage, dict) and stage.get("data") is not None:
            errors += data_errors(registry, stage["data"], f"stages.{name}.data")
    ev = e if isinstance(e := data.get("evaluation"), dict) else {}
    for name, node in (ev.get("tool_callers") or {}).items():
        errors += check_node(
            registry, "tool_caller", node, f"evaluation.tool_callers.{name}", {"tools": {}}
        )
    for name, node in (ev.get("extra_data") or {}).items():
        errors += data_errors(registry, node, f"evaluation.extra_data.{name}")
    return errors


# -- single overrides (command options that change a stored config) -----------------------------
TOP_LEVEL_KEYS = tuple(
    sorted(
        {f.name for f in dataclasses.fields(Root)} | set(SECTIONS) | set(COMPONENTS) | {"stages"}
    )
)


def key_errors(key: str, value: Any) -> list[str]:
    """Problems of one ``key=value`` override against the schema (component keys, group
    choices and keys under free-form mappings pass: they are checked when the config is whole)."""
    parts = key.split(".")
    head = parts[0]
    if head in SECTIONS:
        schema, rest, where = SECTIONS[head], parts[1:], head
    elif head == "stages" and len(parts) >= 2:
        schema, rest, where = Stage, parts[2:], ".".join(parts[:2])
    elif head in {f.name for f in dataclasses.fields(Root)}:
        schema, rest, where = Root, parts, ""
    else:  # a component node or a config group choice; an unknown key is the caller's to judge
        return []
    for i, name in enumerate(rest):
        fields = {f.name: f for f in dataclasses.fields(schema)}
        if name not in fields:
            return [
                f"{key}={_show(value)}: not a key of "
                f"{where or 'the config'}{did_you_mean(name, fields)}; "
                f"valid: {', '.join(fields)}"
            ]
        hint = typing.get_type_hints(schema)[name]
        where = f"{where}.{name}" if where else name
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            schema = hint
            continue
        if (
            i < len(rest) - 1
        ):  # a key inside a free-form mapping (a component node, a prefix setting)
            return []
        problem = check_value(key, value, hint, fields[name].metadata.get("rule"))
        return [problem] if problem else []
    return check_section(key, value, schema)


def override_errors(overrides: Sequence[str]) -> list[str]:
    """Problems of command-line overrides (``key=value``, Hydra syntax, comma lists included)
    against the schema, before any config is loaded."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    errors = []
    for line in overrides:
        try:
            (o,) = OverridesParser.create().parse_overrides([line])
        except HydraException as exc:
            errors.append(f"{line}: not a valid override ({str(exc).splitlines()[0]})")
            continue
        if o.is_hydra_override() or o.is_delete() or o.package is not None or o.value_type is None:
            continue
        values = (
            list(o.sweep_iterator())
            if o.is_sweep_override() and hasattr(o, "sweep_iterator")
            else [o.value()]
        )
        for value in values:
            # a DictConfig converts to a dict
            plain = cast(dict[str, Any], OmegaConf.to_container(OmegaConf.create({"v": value})))[
                "v"
            ]
            errors += key_errors(o.key_or_group, plain)
    return list(dict.fromkeys(errors))


# -- the whole config -----------------------------------------------------------------------------
def _resolve(cfg: DictConfig | Mapping) -> tuple[dict, list[str]]:
    """A resolved plain copy; a key whose interpolation fails is reported and left out."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    try:
        return OmegaConf.to_container(cfg, resolve=True), []  # type: ignore[return-value]
    except Exception:
        pass
    out, errors = {}, []

    def walk(node: Any, prefix: str) -> Any:
        plain = {}
        for k in node:
            key = f"{prefix}{k}"
            try:
                value = node[k]
                plain[k] = (
                    walk(value, f"{key}.")
                    if isinstance(value, DictConfig)
                    else (
                        OmegaConf.to_container(value, resolve=True)
                        if OmegaConf.is_config(value)
                        else value
                    )
                )
            except Exception as exc:
                errors.append(f"{key}: cannot be resolved: {str(exc).splitlines()[0]}")
        return plain

    out = walk(cfg, "")
    return out, errors


def schedule_errors(data: Mapping[str, Any]) -> list[str]:
    """Problems of ``schedule``: empty, or naming a stage that ``stages`` does not define."""
    stages = s if isinstance(s := data.get("stages"), dict) else {}
    schedule = data.get("schedule")
    if not schedule:
        return ["schedule: empty; list the stages to run, e.g. schedule=[align]"]
    if not isinstance(schedule, list):
        return [
            f"schedule={_show(schedule)}: expected a list of stage names, e.g. schedule=[align]"
        ]
    return [
        f"schedule: stage '{name}' is not defined under stages{did_you_mean(str(name), stages)}; "
        f"defined: {', '.join(stages) or '(none)'}"
        for name in schedule
        if name not in stages
    ]


def config_errors(
    cfg: DictConfig | Mapping, registry: Registry | None = None, extra_top_level: Sequence[str] = ()
) -> list[str]:
    """Every problem of a composed config (see :func:`validate_config`), one line each."""
    data, errors = _resolve(cfg)
    root = {k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(Root)}}
    errors += check_section("", root, Root)
    known = (
        {f.name for f in dataclasses.fields(Root)}
        | set(SECTIONS)
        | set(COMPONENTS)
        | {"stages", "hydra"}
    )
    if registry is not None:
        known |= set(group_options(registry))
    known |= set(extra_top_level)
    for key, value in data.items():
        if key not in known:
            errors.append(
                f"{key}={_show(value)}: not a config key{did_you_mean(str(key), sorted(known))}; "
                f"top-level keys: {', '.join(sorted(known - {'hydra'}))}"
            )
    for key, schema in SECTIONS.items():
        if key in data:
            errors += check_section(key, data[key], schema)
    stages = data.get("stages", {})
    if not isinstance(stages, dict):
        errors.append(f"stages={_show(stages)}: expected a mapping of stage name -> stage config")
    else:
        for name, stage in stages.items():
            errors += check_section(f"stages.{name}", stage, Stage)
            if isinstance(stage, dict) and stage.get("conversation") is not None:
                errors += check_section(
                    f"stages.{name}.conversation", stage["conversation"], Conversation
                )
    if not any(e.startswith("schedule") for e in errors):
        errors += schedule_errors(data)
    if "trainer" in data:
        errors += _trainer_errors(data["trainer"])
    if registry is not None:
        errors += _component_errors(data, registry)
    return list(dict.fromkeys(errors))


def validate_config(
    cfg: DictConfig | Mapping,
    registry: Registry | None = None,
    output_dir: str | Path | None = None,
) -> None:
    """Check a composed config before anything is built; raise one :class:`ConfigError` listing
    every problem (key, bad value, what is valid).

    Args:
        cfg: the composed config (``mmbridge train``'s, or a checkpoint's with overrides).
        registry: the run's registry; with it, component nodes are checked against their
            constructors too (without it, only the schema sections and the schedule).
        output_dir: a training run's directory: then it and the caches (``paths.cache_dir``,
            ``paths.feature_cache_dir``) are checked writable too (and created).
    """
    errors = config_errors(cfg, registry)
    if output_dir is not None:
        errors += output_errors(_resolve(cfg)[0], output_dir)
    if errors:
        raise ConfigError(
            f"invalid config ({len(errors)} problem{'s' * (len(errors) > 1)}):\n  "
            + "\n  ".join(errors)
        )
