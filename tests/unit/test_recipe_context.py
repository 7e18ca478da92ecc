"""RecipeContext: the typed fields a recipe uses; ``cfg`` is deprecated but still readable."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mmbridge.contracts.recipe import RecipeContext
from mmbridge.registry import Registry


def test_fields_by_keyword_without_cfg(tmp_path):
    registry = Registry()
    ctx = RecipeContext(registry=registry, model=None, tables={}, cache_dir=str(tmp_path))
    assert ctx.registry is registry and ctx.model is None and ctx.tables == {}
    assert ctx.cache_dir == tmp_path and isinstance(ctx.cache_dir, Path)
    with pytest.warns(DeprecationWarning, match="RecipeContext.cfg is deprecated"):
        assert ctx.cfg is None
    assert "cfg" not in repr(ctx)


def test_old_positional_order_and_cfg_keyword_still_work(tmp_path):
    cfg = OmegaConf.create({"seed": 3})
    registry = Registry()
    old = RecipeContext(cfg, registry, None, {"image": "t"}, tmp_path)
    new = RecipeContext(registry, None, {"image": "t"}, tmp_path, cfg=cfg)
    assert old == new  # cfg takes no part in equality
    assert (old.registry, old.tables, old.cache_dir) == (registry, {"image": "t"}, tmp_path)
    for ctx in (old, new):
        with pytest.warns(DeprecationWarning):
            assert ctx.cfg.seed == 3


def test_too_many_positional_arguments_name_the_signature(tmp_path):
    with pytest.raises(TypeError, match=r"RecipeContext\(registry, model, tables, cache_dir"):
        RecipeContext(None, Registry(), None, {}, tmp_path, "extra")
    with pytest.raises(TypeError, match="6 positional"):
        RecipeContext(None, Registry(), None, {}, tmp_path, "extra")
