"""The model a config describes, as its component nodes: the one place that knows the shape of
the model config (``llm``, ``encoder`` + ``connector``, ``branches.<modality>.encoder`` /
``.connector``, ``alignment``), each node's registry kind and the constructor arguments the
assembly injects (a connector's ``in_dim`` / ``out_dim``, a prefix's ``dim``).

Its readers take the nodes from here instead of listing the keys: validation
(:func:`mmbridge.config.validation.validate_config`), the checkpoint's component record
(:func:`mmbridge.training.checkpoint.component_origins`), the assembly
(:func:`mmbridge.model.assemble`, by :func:`branch_nodes`), the plan's meta model, the dtype
resolution (:func:`weight_nodes`), and the export (bundle files, model card, float32 rebuild).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from mmbridge.errors import ConfigError

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

    @property
    def parent(self) -> str:
        """The key of the node holding it (``branches.audio``; ``""`` at the top level)."""
        return self.key.rpartition(".")[0]


#: The nodes every model config has, at the top level.
MAIN_NODES: tuple[ComponentNode, ...] = (
    ComponentNode("llm", "llm"),
    ComponentNode("encoder", "encoder"),
    ComponentNode("connector", "connector", CONNECTOR_ARGS),
)
#: The top-level key of the extra branches (``branches.<name>``).
BRANCHES_KEY = "branches"
#: The nodes of each ``branches.<name>`` (keys relative to the branch).
BRANCH_NODES: tuple[ComponentNode, ...] = (
    ComponentNode("encoder", "encoder"),
    ComponentNode("connector", "connector", CONNECTOR_ARGS),
)
#: Nodes listed only when the config sets them.
OPTIONAL_NODES: tuple[ComponentNode, ...] = (ComponentNode("alignment", "prefix", PREFIX_ARGS),)


def model_nodes(cfg: Mapping[str, Any]) -> list[ComponentNode]:
    """The component nodes of the model ``cfg`` describes, in assembly order: the main
    :data:`MAIN_NODES` (``llm``, ``encoder``, ``connector``), each branch's
    :data:`BRANCH_NODES` (a branch set to null is left out), then the :data:`OPTIONAL_NODES`
    that are set (``alignment``). ``cfg`` is a composed config or its plain-dict form; a branch
    that is not a mapping is listed as it is (validation names what it lacks)."""
    nodes = list(MAIN_NODES)
    for name, branch in (cfg.get(BRANCHES_KEY) or {}).items():
        if branch is None:
            continue
        nodes += [
            ComponentNode(f"{BRANCHES_KEY}.{name}.{n.key}", n.kind, n.injected)
            for n in BRANCH_NODES
        ]
    nodes += [n for n in OPTIONAL_NODES if node_at(cfg, n.key) is not None]
    return nodes


def node_at(cfg: Mapping[str, Any], key: str) -> Any:
    """The value at a dotted ``key`` of ``cfg`` (``None`` where a part is missing)."""
    value: Any = cfg
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


#: Registry kinds whose nodes hold weights of their own with a ``dtype`` (``auto`` is resolved
#: per run, :func:`mmbridge.model.precision.component_dtypes`).
WEIGHT_KINDS = ("llm", "encoder")


@dataclass(frozen=True)
class BranchNodes:
    """An encoder node and the connector node beside it: one branch of the model."""

    #: The key of the node holding both (``""`` for the main branch, ``branches.audio``).
    parent: str
    encoder: ComponentNode
    connector: ComponentNode

    @property
    def prefix(self) -> str:
        """Its nodes' key prefix (``""``, ``branches.audio.``)."""
        return f"{self.parent}." if self.parent else ""


def branch_nodes(cfg: Mapping[str, Any]) -> list[BranchNodes]:
    """The branches among :func:`model_nodes`: each encoder node with the connector node of the
    same parent, in order.

    Raises:
        ConfigError: an encoder node without a connector beside it or the other way round,
            naming the key.
    """
    if problems := branch_problems(cfg):
        raise ConfigError(problems[0])
    nodes = model_nodes(cfg)
    encoders = {n.parent: n for n in nodes if n.kind == "encoder"}
    connectors = {n.parent: n for n in nodes if n.kind == "connector"}
    for parent in encoders.keys() ^ connectors.keys():
        lacking = "connector" if parent in encoders else "encoder"
        raise ConfigError(
            f"{parent or 'the model config'}: needs both 'encoder' and 'connector' (no '{lacking}')"
        )
    out = []
    for parent, enc in encoders.items():
        if node_at(cfg, enc.key) is None or node_at(cfg, connectors[parent].key) is None:
            raise ConfigError(
                f"{parent or 'the model config'}: needs both 'encoder' and 'connector'"
            )
        out.append(BranchNodes(parent, enc, connectors[parent]))
    return out


def weight_nodes(cfg: Mapping[str, Any]) -> list[ComponentNode]:
    """The nodes of :func:`model_nodes` whose kind is one of :data:`WEIGHT_KINDS`."""
    return [n for n in model_nodes(cfg) if n.kind in WEIGHT_KINDS]


def nodes_of(cfg: Mapping[str, Any], kind: str) -> list[ComponentNode]:
    """The nodes of :func:`model_nodes` of registry kind ``kind``, in order."""
    return [n for n in model_nodes(cfg) if n.kind == kind]


def branch_at(cfg: Mapping[str, Any], parent: str) -> BranchNodes:
    """The branch whose nodes sit under ``parent`` (a built ``Branch``'s ``key``: ``""`` for the
    main branch).

    Raises:
        KeyError: no branch of ``cfg`` sits there.
    """
    for branch in branch_nodes(cfg):
        if branch.parent == parent:
            return branch
    raise KeyError(f"no encoder / connector branch at '{parent}'")


def top_level_nodes() -> dict[str, str | None]:
    """The model config's top-level keys -> registry kind (``None``: :data:`BRANCHES_KEY`, a
    mapping of branches): what the schema's top-level ``COMPONENTS`` takes from here."""
    return {**{n.key: n.kind for n in (*MAIN_NODES, *OPTIONAL_NODES)}, BRANCHES_KEY: None}


def branch_problems(cfg: Mapping[str, Any]) -> list[str]:
    """One line per ``branches.<name>`` that is set but is not a mapping holding every node of
    :data:`BRANCH_NODES` (validation reports them all at once)."""
    keys = [n.key for n in BRANCH_NODES]
    return [
        f"{BRANCHES_KEY}.{name}: needs both " + " and ".join(f"'{k}'" for k in keys)
        for name, node in (cfg.get(BRANCHES_KEY) or {}).items()
        if node is not None and (not isinstance(node, Mapping) or any(k not in node for k in keys))
    ]


class ModelConfig(Mapping[str, Any]):
    """The model part of a run's config, read-only: its top-level nodes
    (:func:`top_level_nodes`: ``llm``, ``encoder``, ``connector``, ``branches``, ``alignment``)
    as resolved plain mappings, what :attr:`mmbridge.runtime.config.RunConfig.model` holds.

    :func:`model_nodes`, :func:`node_at`, :func:`branch_nodes` and the assembly read it as they
    read a composed config; a node reaches its component's constructor through
    :func:`mmbridge.config.build.build`. Reading a key gives a copy (nothing changes it in
    place); :meth:`with_dtypes` is a copy with some nodes' ``dtype`` decided.
    """

    def __init__(self, nodes: Mapping[str, Any]) -> None:
        self._nodes = copy.deepcopy(dict(nodes))

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> ModelConfig:
        """The model nodes of a config's resolved plain-dict form
        (:func:`mmbridge.config.to_container`); the keys it does not set are left out."""
        roots = dict.fromkeys(k.partition(".")[0] for k in top_level_nodes())  # in order
        return cls({k: data[k] for k in roots if k in data})

    def __getitem__(self, key: str) -> Any:
        return copy.deepcopy(self._nodes[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def __repr__(self) -> str:
        return f"ModelConfig({self._nodes!r})"

    def as_dict(self) -> dict[str, Any]:
        """A plain-dict copy."""
        return copy.deepcopy(self._nodes)

    def with_dtypes(self, dtypes: Mapping[str, str]) -> ModelConfig:
        """A copy with ``dtype`` set on the node at each key of ``dtypes`` (``encoder``,
        ``branches.audio.encoder``)."""
        out = ModelConfig(self._nodes)
        for key, dtype in dtypes.items():
            node = node_at(out._nodes, key)
            if not isinstance(node, dict):
                raise KeyError(f"no component node at '{key}'")
            node["dtype"] = dtype
        return out
