"""The example plugin's own tests, written the way any plugin author would write theirs: the
connector is checked with mmbridge's contract kit, and the installed entry point is checked to
register everything under the expected names.

Run after installing the package: ``pip install -e . && pytest``.
"""

from __future__ import annotations

import pytest
import torch
from mmbridge.config import compose
from mmbridge.config.build import build
from mmbridge.registry.plugin_manager import load_registry
from mmbridge.testing.contracts import check_connector

from mmbridge_example.token_merge import TokenMergeMLP, bipartite_merge
from mmbridge_example.unit_convert import UnitConvertTool


@pytest.mark.parametrize(("keep", "n_in"), [(0.5, 5), (0.25, 16), (1.0, 3), (0.1, 7)])
def test_tome_mlp_passes_the_connector_contract(keep, n_in):
    torch.manual_seed(0)
    check_connector(TokenMergeMLP(in_dim=24, out_dim=32, keep=keep, hidden_dim=16), n_in=n_in)


def test_the_for_testing_instance_passes_the_contract(tmp_path):
    # `mmbridge plugins check` builds connectors with for_testing(tmp_dir, in_dim=24, out_dim=32)
    check_connector(TokenMergeMLP.for_testing(tmp_path, in_dim=24, out_dim=32))


def test_similar_tokens_merge_first_into_a_size_weighted_mean():
    # 4 background patches (two shades of one colour) and 2 different objects: keeping 3 tokens
    # must merge the background, and leave the objects alone.
    bg1, bg2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.9, 0.1, 0.0])
    obj1, obj2 = torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    x = torch.stack([bg1, bg2, bg1, obj1, bg2, obj2])
    out, size, pos = bipartite_merge(x[None], torch.ones(1, 6), torch.arange(6)[None], target=3)
    out, size, pos = out[0], size[0], pos[0]
    assert out.shape == (3, 3) and size.tolist() == [4, 1, 1]
    assert pos.tolist() == [1, 3, 5]  # reading order is kept
    torch.testing.assert_close(out[0], (2 * bg1 + 2 * bg2) / 4)
    assert torch.equal(out[1], obj1) and torch.equal(out[2], obj2)


def test_token_budget_and_padding():
    conn = TokenMergeMLP(in_dim=4, out_dim=6, keep=0.25)
    assert [conn.out_tokens(n) for n in (1, 4, 5, 64, 576)] == [1, 1, 2, 16, 144]
    assert (
        TokenMergeMLP(4, 6, keep=0.7).out_tokens(90) == 63
    )  # not 64: 0.7 * 90 is 62.999... in floats
    feats = torch.randn(2, 8, 4)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False  # 5 real features -> ceil(1.25) = 2 real tokens
    tokens, out_mask = conn(feats, mask)
    assert tokens.shape == (2, 2, 6) and out_mask.tolist() == [[True, True], [True, True]]
    merged, _, size = conn.merge(feats, mask)
    assert size.sum(dim=1).tolist() == [8.0, 5.0]


def test_bad_arguments_name_the_config_key():
    with pytest.raises(ValueError, match=r"connector\.keep"):
        TokenMergeMLP(4, 6, keep=0.0)
    with pytest.raises(ValueError, match=r"connector\.depth"):
        TokenMergeMLP(4, 6, depth=0)


def test_the_installed_plugin_registers_its_components_and_config():
    registry = load_registry()
    conn = registry.get("connector", "tome_mlp")
    assert conn.cls is TokenMergeMLP and conn.origin.plugin == "mmbridge-example"
    assert conn.origin.package == "mmbridge-example-plugin"
    assert registry.get("tool", "unit_convert").cls is UnitConvertTool
    # The config option composes by name and builds through mmbridge's own builder.
    cfg = compose(["connector=tome_mlp", "connector.keep=0.5"], registry)
    built = build(registry, "connector", cfg.connector, "connector", in_dim=8, out_dim=16)
    assert isinstance(built, TokenMergeMLP) and built.keep == 0.5 and built.out_tokens(64) == 32
