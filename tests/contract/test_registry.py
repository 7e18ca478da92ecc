"""The plugin system: registration, every error it names, the switch-off variable."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import mmbridge
from mmbridge.errors import PluginError, RegistrationError, UnknownComponentError
from mmbridge.registry import Origin, Registrar, Registry
from mmbridge.registry.plugin_manager import DISABLE_ENV, build_plugin_manager, load_registry

CONNECTOR_PLUGIN = """
import torch
import mmbridge

class Doubler(mmbridge.Converter):
    '''Doubles, then projects.'''
    def __init__(self, in_dim, out_dim):
        super().__init__(in_dim, out_dim)
        self.proj = torch.nn.Linear(in_dim, out_dim)
    def out_tokens(self, n_in):
        return n_in
    def forward(self, features, mask):
        return self.proj(2 * features), mask

@mmbridge.hookimpl
def register_components(registry):
    registry.add_connector("doubler", Doubler)
"""


class _Lin(mmbridge.Converter):
    def out_tokens(self, n_in: int) -> int:
        return n_in

    def forward(self, features, mask):
        return features, mask


def _registrar(reg: Registry, name: str) -> Registrar:
    return Registrar(reg, Origin(name, f"pkg-{name}", "1.0"))


def test_builtins_register_through_the_plugin_manager():
    pm, origins = build_plugin_manager(autoload=False)
    from mmbridge.plugins import BUILTIN_PLUGINS

    assert [n for n in origins] == list(BUILTIN_PLUGINS)
    assert all(pm.has_plugin(n) for n in BUILTIN_PLUGINS)
    reg = load_registry(autoload=False)
    entry = reg.get("connector", "mlp")
    assert entry.origin.package == "mmbridge"
    assert entry.origin.plugin == "mmbridge.plugins.converters"
    assert issubclass(entry.cls, mmbridge.Converter)


def test_each_run_gets_its_own_registry():
    a, b = load_registry(autoload=False), load_registry(autoload=False)
    assert a is not b
    _registrar(a, "x").add_connector("only_in_a", _Lin)
    assert ("connector", "only_in_a") in a and ("connector", "only_in_a") not in b


def test_duplicate_name_names_both_plugins():
    reg = Registry()
    _registrar(reg, "first").add_connector("same", _Lin)
    with pytest.raises(RegistrationError) as err:
        _registrar(reg, "second").add_connector("same", _Lin)
    assert (
        "'first'" in str(err.value) and "'second'" in str(err.value) and "'same'" in str(err.value)
    )


def test_explicit_override_replaces_and_logs(caplog):
    reg = Registry()
    _registrar(reg, "first").add_connector("same", _Lin)

    class Other(_Lin):
        pass

    with caplog.at_level("WARNING"):
        _registrar(reg, "second").add_connector("same", Other, override=True)
    assert reg.get("connector", "same").cls is Other
    assert "overridden" in caplog.text and "first" in caplog.text


def test_wrong_kind_is_refused_at_registration():
    reg = Registry()
    with pytest.raises(RegistrationError) as err:
        _registrar(reg, "p").add_encoder("lin", _Lin)
    msg = str(err.value)
    assert "'p'" in msg and "encoder 'lin'" in msg and "ModalityEncoder" in msg
    with pytest.raises(RegistrationError, match="not a subclass"):
        _registrar(reg, "p").add_connector("obj", object())


def test_abstract_class_is_refused():
    reg = Registry()
    with pytest.raises(RegistrationError, match="abstract.*out_tokens"):
        _registrar(reg, "p").add_connector("abs", mmbridge.Converter)


def test_unknown_name_lists_options_and_close_match():
    reg = load_registry(autoload=False)
    with pytest.raises(UnknownComponentError) as err:
        reg.get("connector", "mpl")
    msg = str(err.value)
    assert "unknown connector 'mpl'" in msg and "did you mean 'mlp'" in msg
    assert "linear" in msg and "conf group: connector" in msg


def test_entry_point_plugin_is_loaded(fake_dist):
    fake_dist("mmb-doubler", "mmb_doubler", CONNECTOR_PLUGIN)
    reg = load_registry()
    entry = reg.get("connector", "doubler")
    assert entry.origin.plugin == "mmb-doubler" and entry.origin.package == "mmb-doubler"
    assert entry.origin.version == "0.1"
    conn = entry.cls(in_dim=3, out_dim=4)
    x = torch.ones(1, 2, 3)
    out, _ = conn(x, torch.ones(1, 2, dtype=torch.bool))
    torch.testing.assert_close(out, conn.proj(2 * x))


def test_import_error_names_the_plugin(fake_dist):
    fake_dist("mmb-broken", "mmb_broken", "import not_a_module_anywhere\n")
    with pytest.raises(PluginError) as err:
        load_registry()
    msg = str(err.value)
    assert "plugin 'mmb-broken'" in msg and "failed to import" in msg and DISABLE_ENV in msg


def test_misspelled_hook_names_the_plugin(fake_dist):
    fake_dist(
        "mmb-typo",
        "mmb_typo",
        """
import mmbridge
@mmbridge.hookimpl
def register_component(registry):
    pass
""",
    )
    with pytest.raises(PluginError) as err:
        load_registry()
    assert "plugin 'mmb-typo'" in str(err.value) and "register_component" in str(err.value)


def test_wrong_kind_from_an_entry_point_names_the_plugin(fake_dist):
    fake_dist(
        "mmb-wrong",
        "mmb_wrong",
        """
import mmbridge
class NotAnEncoder:
    pass
@mmbridge.hookimpl
def register_components(registry):
    registry.add_encoder("bad", NotAnEncoder)
""",
    )
    with pytest.raises(RegistrationError, match="plugin 'mmb-wrong'.*encoder 'bad'"):
        load_registry()


def test_failure_inside_the_hook_names_the_plugin(fake_dist):
    fake_dist(
        "mmb-raises",
        "mmb_raises",
        """
import mmbridge
@mmbridge.hookimpl
def register_components(registry):
    raise RuntimeError("boom")
""",
    )
    with pytest.raises(
        PluginError, match="plugin 'mmb-raises' failed in register_components.*boom"
    ):
        load_registry()


def test_duplicate_of_a_builtin_is_an_error(fake_dist):
    fake_dist("mmb-dup", "mmb_dup", CONNECTOR_PLUGIN.replace('"doubler"', '"mlp"'))
    with pytest.raises(RegistrationError) as err:
        load_registry()
    assert "mmbridge.plugins.converters" in str(err.value) and "mmb-dup" in str(err.value)


def test_switch_off_all_and_one(fake_dist, monkeypatch):
    fake_dist("mmb-doubler", "mmb_doubler", CONNECTOR_PLUGIN)
    fake_dist("mmb-broken", "mmb_broken", "raise ImportError('nope')\n")
    monkeypatch.setenv(DISABLE_ENV, "1")
    reg = load_registry()
    assert ("connector", "doubler") not in reg and ("connector", "mlp") in reg
    monkeypatch.setenv(DISABLE_ENV, "mmb-broken")
    reg = load_registry()  # the broken one is skipped, the other still loads
    assert ("connector", "doubler") in reg


def test_plugins_command_shows_entry_point_plugin(fake_dist, tmp_path):
    root = fake_dist("mmb-doubler", "mmb_doubler", CONNECTOR_PLUGIN)
    env = {
        "PYTHONPATH": str(root),
        "HF_HUB_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
        "COLUMNS": "200",
    }
    out = subprocess.run(
        [sys.executable, "-m", "mmbridge.cli", "plugins", "--kind", "connector"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if "doubler" in line)
    assert "mmb-doubler" in row and "0.1" in row and "converter" in row
