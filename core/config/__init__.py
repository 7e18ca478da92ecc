"""The config: Hydra composition with the plugins' config dirs on the search path (here), the
typed schema of the sections (``schema``) with their defaults, registered with Hydra as the
structured configs that ``conf/`` starts from (``store``), the model's component nodes
(``model_spec``), building a component from its node (``build``) and whole-config validation
(``validation``, ``preflight``)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from mmbridge.config import schema
from mmbridge.errors import ConfigError, did_you_mean
from mmbridge.registry import Registry

CONFIG_MODULE = "mmbridge.conf"
PRIMARY = "train"


def builtin_conf_dir() -> Path:
    """The directory of the built-in config tree (inside the installed package)."""
    return Path(str(files(CONFIG_MODULE)))


def searchpath_override(registry: Registry) -> list[str]:
    """The ``hydra.searchpath=[...]`` override that adds every plugin's config dir."""
    if not registry.config_dirs:
        return []
    entries = [d if d.startswith("pkg://") else f"file://{d}" for d, _ in registry.config_dirs]
    return ["hydra.searchpath=[" + ",".join(entries) + "]"]


def _config_dirs(registry: Registry | None) -> list[Path]:
    dirs = [builtin_conf_dir()]
    for d, _ in registry.config_dirs if registry else []:
        if d.startswith("pkg://"):
            dirs.append(Path(str(files(d[len("pkg://") :]))))
        else:
            dirs.append(Path(d))
    return dirs


def group_options(registry: Registry | None = None) -> dict[str, list[str]]:
    """Config group -> its options, from the built-in tree and every plugin's config dir."""
    groups: dict[str, set[str]] = {}
    for root in _config_dirs(registry):
        for sub in sorted(
            p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))
        ):
            for f in sub.rglob("*.yaml"):
                rel = f.relative_to(sub).with_suffix("")
                groups.setdefault(sub.name, set()).add(rel.as_posix())
    return {g: sorted(o) for g, o in sorted(groups.items())}


def compose(
    overrides: Sequence[str] = (),
    registry: Registry | None = None,
    config_name: str = PRIMARY,
    return_hydra_config: bool = False,
) -> DictConfig:
    """Compose the config as ``mmbridge train`` would, outside a Hydra app.

    Raises :class:`ConfigError` with the valid options when an override names an unknown
    group option.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    from mmbridge.config.store import register

    register()  # the schema's nodes (`_schema/root`, `_schema/stage`) that conf/ starts from
    extra = searchpath_override(registry) if registry else []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            return hydra_compose(
                config_name, overrides=[*overrides, *extra], return_hydra_config=return_hydra_config
            )
    except HydraException as exc:
        # Hydra's own words, then OmegaConf's (which name the key)
        causes: list[BaseException] = [exc]
        while causes[-1].__cause__ is not None and len(causes) < 4:
            causes.append(causes[-1].__cause__)
        message = "\n".join(dict.fromkeys(str(e) for e in causes))
        raise ConfigError(explain_hydra_error(message, registry)) from exc


def explain_hydra_error(message: str, registry: Registry | None) -> str:
    """Add the valid options (and a close match) to Hydra's "could not find" errors; word a key
    that a schema section lacks (set in a config file) as validation does, with the valid keys."""
    m = re.search(r"Could not find '([\w/]+)/([\w.\-/]+)'", message)
    if m:
        group, option = m.group(1).split("/")[-1], m.group(2)
        options = group_options(registry).get(group, [])
        return (
            f"unknown option '{option}' of config group '{group}'{did_you_mean(option, options)}; "
            f"available: {', '.join(options) or '(none)'}"
        )
    source = re.match(r"In '([^']+)'", message)
    where_set = f" (set in {source.group(1)}.yaml)" if source else ""
    m = re.search(r"Key '([^']+)' not in '(\w+)'\s+full_key: (\S+)", message)
    section = getattr(schema, m.group(2), None) if m else None
    if m and isinstance(section, type) and dataclasses.is_dataclass(section):
        name, key = m.group(1), m.group(3)
        where = key.rsplit(".", 1)[0] if "." in key else "the top level"
        valid = [f.name for f in dataclasses.fields(section)]
        return (
            f"{key}: not a key of {where}{did_you_mean(name, valid)}; valid: {', '.join(valid)}"
            + where_set
        )
    m = re.search(r"is not a subclass of (\w+)\. value: (.*)\s+full_key: (\S*)", message)
    section = getattr(schema, m.group(1), None) if m else None
    if m and isinstance(section, type) and dataclasses.is_dataclass(section):
        name, value, key = m.groups()
        head = f"{key}={value}" if key else f"a {name} section set to {value}"
        keys = ", ".join(f.name for f in dataclasses.fields(section))
        return f"{head}: expected a mapping of {keys}{where_set}"
    return message


def to_container(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """A resolved plain-dict copy of a config (for kwargs, JSON and checkpoints)."""
    if isinstance(cfg, DictConfig):  # a DictConfig converts to a dict
        return cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    return dict(cfg)


def merge_overrides(
    cfg: DictConfig, overrides: Sequence[str], registry: Registry | None = None
) -> DictConfig:
    """``cfg`` (a stored run config) with command-line overrides applied: ``group=option`` for a
    top-level config group (``data=vqa``) replaces that whole node by the option's config, as
    at composition; every other ``key=value`` is merged on top (``data.path=...`` after it).

    Raises :class:`ConfigError` with the valid options for an unknown group option.
    """
    groups = group_options(registry)
    swaps: list[str] = []
    rest: list[str] = []
    for o in overrides:
        key = o.split("=", 1)[0]
        (swaps if key in groups and isinstance(cfg.get(key), DictConfig) else rest).append(o)
    if swaps:
        fresh = compose([*swaps, "~experiment"], registry)  # no preset may edit the new node
        cfg = cfg.copy()
        for o in swaps:
            key = o.split("=", 1)[0]
            cfg[key] = OmegaConf.to_container(fresh[key], resolve=False)
    if not rest:
        return cfg
    # merging onto a DictConfig gives a DictConfig
    return cast(DictConfig, OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(rest))))
