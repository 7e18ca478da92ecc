"""Two files per built-in component: the class file declares its registration (``COMPONENTS``)
and ``conf/<group>/*.yaml`` names it; the two agree in both directions, registration leaves
the classes alone, and the README's tables are what the generator writes."""

from __future__ import annotations

import contextlib
import io
import sys
import textwrap
from functools import cache
from pathlib import Path

import pytest
import torch
import yaml

import mmbridge
from mmbridge.commands import plugins as plugins_cmd
from mmbridge.config import builtin_conf_dir, compose
from mmbridge.config.mixture import MIXTURE
from mmbridge.docs.generate import (
    GROUP_HELP,
    builtin_tables,
    config_groups,
    generated_files,
    update_regions,
)
from mmbridge.errors import AssetError, ConfigError, RegistrationError
from mmbridge.plugins import BUILTIN_PLUGINS
from mmbridge.registry import KINDS, Origin, Registrar, Registry, declarations, register_package
from mmbridge.registry.plugin_manager import load_registry

README = Path(__file__).resolve().parents[2] / "README.md"
#: Config group -> the kind its options name, from the registry's own table.
GROUP_KIND = {
    group: kind
    for kind, (_, group) in KINDS.items()
    if group in config_groups([builtin_conf_dir()])
}


@cache
def builtin_registry() -> Registry:
    return load_registry(autoload=False)


def _is_global(group: str, option: str) -> bool:
    head = (builtin_conf_dir() / group / f"{option}.yaml").read_text().lstrip()
    return head.startswith("# @package _global_")


@cache
def named_components() -> dict[str, dict[str, str | None]]:
    """group -> option -> the component name its composed node gives (None: no ``name``).

    Options are composed through Hydra (their defaults lists and packages apply), all options
    of a group at once under a probe key where the option allows it."""
    out: dict[str, dict[str, str | None]] = {}
    for group in GROUP_KIND:
        options = config_groups([builtin_conf_dir()])[group]
        found: dict[str, str | None] = {}
        probed = [o for o in options if not _is_global(group, o)]
        cfg = compose([f"+{group}@_probe.{o}={o}" for o in probed], builtin_registry())
        for o in probed:
            found[o] = cfg._probe[o].get("name")
        for o in sorted(set(options) - set(probed)):  # `# @package _global_`: at its own key
            node = compose([f"{group}={o}"], builtin_registry()).get(group)
            found[o] = None if node is None else node.get("name")
        out[group] = found
    return out


# -- the YAML <-> registry agreement, both ways ---------------------------------------------------
def test_every_kind_with_a_group_has_its_group_in_the_tree():
    expected = {
        "encoder",
        "connector",
        "llm",
        "tools",
        "tool_caller",
        "recipe",
        "data",
        "scorer",
        "alignment",
    }
    assert set(GROUP_KIND) == expected
    assert GROUP_KIND["data"] == "dataset" and GROUP_KIND["tools"] == "tool"


def test_every_yaml_that_names_a_component_names_a_registered_one_of_its_kind():
    registry = builtin_registry()
    problems = [
        f"conf/{group}/{option}.yaml: name '{name}' is no registered {GROUP_KIND[group]}; "
        f"registered: {', '.join(registry.names(GROUP_KIND[group]))}"
        for group, options in named_components().items()
        for option, name in options.items()
        if name is not None
        and (GROUP_KIND[group], name) not in registry
        # data=mixture: several data nodes read as one by core (mmbridge.data.mixture)
        and not (group == "data" and name == MIXTURE)
    ]
    assert problems == []
    # Spot checks on values: the file name is the option, `name` the registry entry.
    assert named_components()["encoder"]["tiny_vit"] == "timm"
    assert named_components()["data"]["shapes_tiny"] == "shapes"  # through its defaults list
    assert named_components()["alignment"]["aligngpt_n4"] == "aligngpt"  # a _global_ package
    assert named_components()["alignment"]["none"] is None


def test_every_registered_builtin_component_has_a_yaml():
    registry = builtin_registry()
    named = {GROUP_KIND[g]: set(o.values()) for g, o in named_components().items()}
    missing = [
        f"{e.kind} '{e.name}' ({e.cls.__module__}): no conf/{KINDS[e.kind][1]}/*.yaml names it"
        for e in registry.entries()
        if e.origin.package == "mmbridge" and e.kind in named and e.name not in named[e.kind]
    ]
    assert missing == []


def test_only_assets_are_builtins_without_a_config_group():
    kinds = {e.kind for e in builtin_registry().entries()} - set(GROUP_KIND.values())
    assert kinds == {"asset"}


# -- declarations: next to the class, collected by the package's one hook -------------------------
def test_every_builtin_entry_is_declared_in_the_module_of_its_class():
    declared = {(d.kind, d.name): d for pkg in BUILTIN_PLUGINS for d in declarations(pkg)}
    entries = {(e.kind, e.name): e for e in builtin_registry().entries()}
    assert set(declared) == set(entries)
    for key, d in declared.items():
        assert entries[key].cls is d.cls and d.cls.__module__ == d.module, key
        assert entries[key].origin.plugin == d.module.rsplit(".", 1)[0]


def test_declarations_of_a_package_in_module_order():
    rows = [(d.module, d.kind, d.name) for d in declarations("mmbridge.plugins.converters")]
    assert rows == [
        ("mmbridge.plugins.converters.abstractor", "connector", "abstractor"),
        ("mmbridge.plugins.converters.linear", "connector", "linear"),
        ("mmbridge.plugins.converters.mlp", "connector", "mlp"),
        ("mmbridge.plugins.converters.pool_mlp", "connector", "pool_mlp"),
    ]


def _package(root: Path, name: str, files: dict[str, str]) -> str:
    pkg = root / name
    pkg.mkdir()
    for file, text in {"__init__.py": "", **files}.items():
        (pkg / file).write_text(textwrap.dedent(text))
    return name


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("COMPONENTS = [Foo]", r"layout_bad\.foo\.COMPONENTS must be \{kind: \{name: class\}\}"),
        (
            'COMPONENTS = {"connecter": {"foo": Foo}}',
            r"layout_bad\.foo\.COMPONENTS: unknown kind 'connecter'",
        ),
        (
            'COMPONENTS = {"tool": {"foo": Foo}}',
            r"registered tool 'foo' as class .*Foo, which is not a subclass of mmbridge\.Tool",
        ),
    ],
)
def test_a_bad_declaration_names_its_module(table, message, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _package(
        tmp_path,
        "layout_bad",
        {
            "foo.py": f"""
        import torch
        from mmbridge import Converter

        class Foo(Converter):
            def out_tokens(self, n): return n
            def forward(self, features, mask): return features, mask

        {table}
        """
        },
    )
    monkeypatch.delitem(sys.modules, "layout_bad", raising=False)
    monkeypatch.delitem(sys.modules, "layout_bad.foo", raising=False)
    with pytest.raises(RegistrationError, match=message):
        register_package(Registrar(Registry(), Origin("layout_bad", "t", "0")), "layout_bad")


def test_private_and_helper_modules_are_skipped(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _package(
        tmp_path,
        "layout_skip",
        {
            "_private.py": "raise RuntimeError('a private module must not be imported')\n",
            "helper.py": "VALUE = 1\n",
        },
    )
    assert declarations("layout_skip") == []
    assert "layout_skip._private" not in sys.modules


def test_adding_a_connector_in_tree_is_a_class_file_and_a_yaml(tmp_path, monkeypatch):
    """What docs/writing-a-plugin.md shows: the package's hook is the one the built-ins have;
    the new module (with its COMPONENTS row) and the YAML are all that is written."""
    monkeypatch.syspath_prepend(str(tmp_path))
    _package(
        tmp_path,
        "layout_conv",
        {
            "__init__.py": """
            import mmbridge
            from mmbridge.registry import register_package

            @mmbridge.hookimpl
            def register_components(registry):
                register_package(registry, __name__)
                registry.add_config_dir(__path__[0] + "/conf")
            """,
            "gated_linear.py": """
            import torch
            from torch import nn
            from mmbridge import Converter

            class GatedLinear(Converter):
                \"\"\"sigmoid(W_g x) * W x per token.\"\"\"
                def __init__(self, in_dim, out_dim):
                    super().__init__(in_dim, out_dim)
                    self.proj, self.gate = nn.Linear(in_dim, out_dim), nn.Linear(in_dim, out_dim)
                def out_tokens(self, n): return n
                def forward(self, features, mask):
                    return torch.sigmoid(self.gate(features)) * self.proj(features), mask

            COMPONENTS = {"connector": {"gated_linear": GatedLinear}}
            """,
        },
    )
    (tmp_path / "layout_conv" / "conf" / "connector").mkdir(parents=True)
    (tmp_path / "layout_conv" / "conf" / "connector" / "gated_linear.yaml").write_text(
        "name: gated_linear\n"
    )
    import layout_conv

    registry = load_registry(autoload=False, extra_plugins={"layout_conv": layout_conv})
    entry = registry.get("connector", "gated_linear")
    cfg = compose(["connector=gated_linear"], registry)
    assert cfg.connector.name == "gated_linear" and entry.origin.plugin == "layout_conv"
    connector = entry.create(in_dim=3, out_dim=4)
    assert connector.out_tokens(7) == 7 and isinstance(connector, mmbridge.Converter)
    features, mask = torch.randn(2, 7, 3), torch.ones(2, 7, dtype=torch.bool)
    tokens, out_mask = connector(features, mask)
    expected = torch.sigmoid(connector.gate(features)) * connector.proj(features)
    assert tokens.shape == (2, 7, 4) and torch.equal(tokens, expected) and out_mask is mask


# -- registration leaves the classes alone ---------------------------------------------------------
class _Echo(mmbridge.Tool):
    description = "echo"

    def __call__(self, **arguments):
        return str(arguments)


def test_registration_does_not_name_the_class_and_create_names_the_instance():
    registry = Registry()
    registrar = Registrar(registry, Origin("t", "t", "0"))
    registrar.add_tool("echo", _Echo)
    registrar.add_tool("echo_again", _Echo)
    assert _Echo.name == "" and "name" not in vars(_Echo)
    first, second = (
        registry.get("tool", "echo").create(),
        registry.get("tool", "echo_again").create(),
    )
    assert (first.name, second.name) == ("echo", "echo_again")
    assert first.spec()["function"]["name"] == "echo"


def test_asset_classes_get_no_name_from_registration():
    registry = builtin_registry()
    for entry in registry.entries("asset"):
        assert "name" not in vars(entry.cls), entry.name  # the entry holds the name
        assert entry.create().name == entry.name


def test_an_asset_made_from_the_bare_class_refuses_a_cache_location(tmp_path):
    cls = builtin_registry().get("asset", "tiny-llama").cls
    with pytest.raises(AssetError, match=r"TinyLlama has no name.*\.create\(\)"):
        cls().location(tmp_path)
    assert (
        builtin_registry().get("asset", "tiny-llama").create().location(tmp_path)
        == tmp_path / "assets" / "tiny-llama"
    )


# -- the README tables come from the generator -----------------------------------------------------
def test_generated_docs_match_the_generator():
    """README.md's components table and the reference pages under docs/reference/."""
    stale = [
        str(path.relative_to(README.parent))
        for path, (old, new) in generated_files(README.parent).items()
        if old != new
    ]
    assert not stale, (
        f"{', '.join(stale)} drifted from the registry / config schema / CLI; "
        "run: python -m mmbridge.docs"
    )


def test_generated_tables_list_the_registry_and_the_tree():
    tables = builtin_tables()
    rows = {line.split(" | ")[0]: line for line in tables["components"].splitlines()}
    assert rows["| Multimodal **Converter** (§3.1)"].endswith(
        "| `abstractor`, `linear`, `mlp`, `pool_mlp` |"
    )
    assert rows["| **Tool Learning** (§3.3)"].endswith(
        "| `asr`, `calculator`, `image_info`, `ocr`; callers `llm`, `pipeline` |"
    )
    groups = {line.split(" | ")[0]: line for line in tables["config-groups"].splitlines()}
    assert (
        groups["| `hydra/sweeper`"]
        == "| `hydra/sweeper` | `optuna_search` | how sweep jobs are chosen |"
    )
    assert set(config_groups([builtin_conf_dir()])) == set(GROUP_HELP)


def test_update_regions_replaces_only_the_region_and_needs_its_markers():
    text = "a\n<!-- generated:components -->\nold\n<!-- /generated -->\nb\n"
    assert (
        update_regions(text, {"components": "new"})
        == "a\n<!-- generated:components -->\nnew\n<!-- /generated -->\nb\n"
    )
    with pytest.raises(ConfigError, match="README.md: no region <!-- generated:config-groups -->"):
        update_regions(text, {"config-groups": "x"})


def test_plugins_markdown_prints_the_generated_tables(monkeypatch):
    monkeypatch.setenv("MMBRIDGE_DISABLE_PLUGINS", "1")
    for which in ("components", "config-groups"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert plugins_cmd.main(["--markdown", which]) == 0
        assert out.getvalue() == builtin_tables()[which] + "\n"


def test_yaml_name_keys_are_plain_strings():
    """A ``name:`` YAML parses to a string (``name: no`` would be a bool and name nothing)."""
    for group in GROUP_KIND:
        for f in (builtin_conf_dir() / group).glob("*.yaml"):
            data = yaml.safe_load(f.read_text()) or {}
            if isinstance(data, dict) and "name" in data:
                assert isinstance(data["name"], str), f
