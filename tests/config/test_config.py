"""The Hydra config tree: every option of every group composes; errors name the options."""

from __future__ import annotations

import pytest
from helpers import shared_registry
from omegaconf import OmegaConf

from mmbridge.config import compose, group_options
from mmbridge.config.build import build, check_arguments
from mmbridge.config.mixture import is_mixture
from mmbridge.errors import ConfigError
from mmbridge.registry.plugin_manager import load_registry

# Groups whose options are placed at a different package than the group name.
PLACED = {
    "stage": "stages.align",
    "recipe": "stages.align.recipe",
    "scorer": "stages.align.recipe.scorer",
}
# Groups chosen inside another option's defaults list: the overrides that bring them in.
NEEDS = {"scorer": ["recipe@stages.align.recipe=align_levels"]}
GROUP_KIND = {
    "encoder": "encoder",
    "connector": "connector",
    "llm": "llm",
    "data": "dataset",
    "recipe": "recipe",
    "scorer": "scorer",
    "tool_caller": "tool_caller",
    "tools": "tool",
    "alignment": "prefix",
}
# Groups the primary config selects by default; others are added with `+group=option`.
IN_DEFAULTS = {
    "paths",
    "encoder",
    "connector",
    "llm",
    "data",
    "stage",
    "recipe",
    "trainer",
    "conversation",
    "experiment",
    "alignment",
}
INJECTED = {
    "connector": {"in_dim": 1, "out_dim": 1},
    "tool_caller": {"tools": {}},
    "prefix": {"dim": 1},
}


def _all_options():
    for group, options in group_options(shared_registry()).items():
        for option in options:
            yield group, option


def _override(group: str, option: str) -> str:
    if group in PLACED:
        return f"{group}@{PLACED[group]}={option}"
    if group == "tools":  # a mapping of tools: each option goes under its own name
        return f"+tools@tools.{option}={option}"
    if group == "hydra":  # Hydra's own groups (launcher/..., sweeper/...)
        sub, opt = option.split("/", 1)
        return f"hydra/{sub}={opt}"
    return f"{group}={option}" if group in IN_DEFAULTS else f"+{group}={option}"


def _node_key(group: str, option: str) -> str:
    return f"tools.{option}" if group == "tools" else PLACED.get(group, group)


def pytest_generate_tests(metafunc):
    # at collection, not import: importing this module builds no registry
    if metafunc.definition.name == "test_every_option_composes":
        metafunc.parametrize(("group", "option"), list(_all_options()))


def test_every_option_composes(group, option):
    cfg = compose([*NEEDS.get(group, []), _override(group, option)], shared_registry())
    assert cfg is not None
    OmegaConf.to_container(cfg, resolve=False)
    node = OmegaConf.select(cfg, _node_key(group, option))
    kind = GROUP_KIND.get(group)
    if group == "data" and is_mixture(node):
        # a mixture is read by core (mmbridge.data.mixture), its sources are data nodes
        assert OmegaConf.is_missing(node, "sources") or len(node.sources) > 0
        return
    if kind and node is not None and "name" in node:
        # The option names a registered component and only arguments its constructor takes.
        entry = shared_registry().get(kind, node.name)
        args = {k: v for k, v in OmegaConf.to_container(node).items() if k != "name"}
        injected = INJECTED.get(kind, {})
        assert check_arguments(entry, group, args, injected) == []


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        compose(["connector=mpl"], shared_registry())
    msg = str(err.value)
    assert "connector" in msg and "did you mean 'mlp'" in msg and "linear" in msg


def test_stages_are_one_group_used_twice():
    cfg = compose([], shared_registry())
    assert set(cfg.stages) >= {"align", "instruct"}
    assert cfg.stages.align.train.llm == "frozen"
    assert cfg.stages.align.recipe.name == "caption"
    assert cfg.stages.instruct.recipe.name == "conversations"
    cfg = compose(["stage@stages.align=instruct"], shared_registry())
    assert cfg.stages.align.train.llm == "lora"


def test_plugin_config_dir_joins_the_groups(fake_dist, tmp_path):
    conf = tmp_path / "pconf" / "connector"
    conf.mkdir(parents=True)
    (conf / "from_plugin.yaml").write_text("name: linear\n")
    fake_dist(
        "mmb-conf",
        "mmb_conf",
        f"""
import mmbridge
@mmbridge.hookimpl
def register_components(registry):
    registry.add_config_dir({str(tmp_path / "pconf")!r})
""",
    )
    reg = load_registry()
    assert "from_plugin" in group_options(reg)["connector"]
    cfg = compose(["connector=from_plugin"], reg)
    assert cfg.connector.name == "linear"


def test_bad_argument_is_reported_with_key_and_valid_names():
    with pytest.raises(ConfigError) as err:
        build(
            shared_registry(),
            "connector",
            {"name": "mlp", "depht": 2, "bogus": 1},
            "connector",
            in_dim=4,
            out_dim=8,
        )
    msg = str(err.value)
    assert "connector.depht" in msg and "did you mean 'depth'" in msg and "connector.bogus" in msg
