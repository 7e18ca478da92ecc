"""The model a config describes, as its component nodes: the one place that knows the shape of
the model config (``llm``, ``encoder`` + ``connector``, ``branches.<modality>.encoder`` /
``.connector``, ``alignment``), each node's registry kind and the constructor arguments the
assembly injects (a connector's ``in_dim`` / ``out_dim``, a prefix's ``dim``).

Validation (:func:`mmbridge.validation.validate_config`) and the checkpoint's component record
(:func:`mmbridge.training.checkpoint.component_origins`) read it instead of listing the keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: What the assembly passes to every connector (the encoder's width, the LLM's hidden size).
CONNECTOR_ARGS = ("in_dim", "out_dim")
#: What the assembly passes to a sequence prefix (the LLM's hidden size).
PREFIX_ARGS = ("dim",)


@dataclass(frozen=True)
class ComponentNode:
    """One component node of the model config."""

    #: Its config key (``connector``, ``branches.audio.encoder``).
    key: str
    #: Its registry kind (``encoder``, ``connector``, ``llm``, ``prefix``).
    kind: str
    #: Constructor arguments the assembly injects (a config may not set them).
    injected: tuple[str, ...] = ()


def model_nodes(cfg: Mapping[str, Any]) -> list[ComponentNode]:
    """The component nodes of the model ``cfg`` describes, in assembly order: ``llm``, the main
    ``encoder`` and ``connector``, each branch's (a branch set to null is left out), then
    ``alignment`` when set. ``cfg`` is a composed config or its plain-dict form; a branch that
    is not a mapping is listed as it is (validation names what it lacks)."""
    nodes = [ComponentNode("llm", "llm"), ComponentNode("encoder", "encoder"),
             ComponentNode("connector", "connector", CONNECTOR_ARGS)]
    for name, branch in (cfg.get("branches") or {}).items():
        if branch is None:
            continue
        nodes += [ComponentNode(f"branches.{name}.encoder", "encoder"),
                  ComponentNode(f"branches.{name}.connector", "connector", CONNECTOR_ARGS)]
    if cfg.get("alignment") is not None:
        nodes.append(ComponentNode("alignment", "prefix", PREFIX_ARGS))
    return nodes


def node_at(cfg: Mapping[str, Any], key: str) -> Any:
    """The value at a dotted ``key`` of ``cfg`` (``None`` where a part is missing)."""
    value: Any = cfg
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value
