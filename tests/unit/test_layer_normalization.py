"""``hf_vision``'s ``normalize_layers``: each selected layer standardised before concatenation.

DINOv2-S's layers differ ~25x in scale (the last after its final norm: RMS 2.4; layer 6: RMS
0.09, measured on the quickstart's cached features), so concatenated raw the middle layer's
colour and position detail enters the connector ~25x weaker than the last layer's.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from mmbridge.data.feature_cache import cache_key
from mmbridge.plugins.encoders.hf_vision import HFVisionEncoder


def _batch(enc: HFVisionEncoder, tmp_path, n: int = 3) -> torch.Tensor:
    paths = [enc.example_media(tmp_path / "img", k) for k in range(n)]
    return enc.collate([enc.preprocess(enc.load(p)) for p in paths])


def test_each_layer_is_standardised_per_token(tmp_path):
    raw = HFVisionEncoder.for_testing(tmp_path / "a", feature_layer=[2, 1])
    norm = HFVisionEncoder.for_testing(tmp_path / "b", feature_layer=[2, 1], normalize_layers=True)
    x = _batch(raw, tmp_path)
    with torch.inference_mode():
        f_raw, _ = raw(x)
        f_norm, _ = norm(x)
    d = f_raw.shape[-1] // 2
    assert f_norm.shape == f_raw.shape
    blocks_raw = (f_raw[..., :d], f_raw[..., d:])
    # the tiny tower's two layers differ in scale, so the test would see a missing normalisation
    assert abs(blocks_raw[0].std().item() - blocks_raw[1].std().item()) > 0.05
    for k, block in enumerate((f_norm[..., :d], f_norm[..., d:])):
        assert torch.allclose(block.mean(-1), torch.zeros(block.shape[:-1]), atol=1e-5)
        # (LayerNorm's eps keeps the variance a little under 1 on the tiny tower's small features)
        assert torch.allclose(
            block.var(-1, unbiased=False), torch.ones(block.shape[:-1]), atol=0.03
        )
        # exactly a LayerNorm without affine of that layer's raw features, and nothing else
        assert torch.allclose(block, F.layer_norm(blocks_raw[k], (d,)), atol=1e-5)


def test_pooling_averages_the_normalised_tokens(tmp_path):
    norm = HFVisionEncoder.for_testing(tmp_path / "b", feature_layer=[2, 1], normalize_layers=True)
    pooled = HFVisionEncoder.for_testing(
        tmp_path / "c", feature_layer=[2, 1], normalize_layers=True, pool_to=2
    )
    x = _batch(norm, tmp_path)
    with torch.inference_mode():
        full, _ = norm(x)
        small, _ = pooled(x)
    g = norm.grid[0]
    grid = full.transpose(1, 2).reshape(full.shape[0], full.shape[-1], g, g)
    want = F.adaptive_avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
    assert small.shape == (x.shape[0], 4, full.shape[-1])
    assert torch.allclose(small, want, atol=1e-5)


def test_the_option_is_part_of_the_cache_key_and_absent_by_default(tmp_path):
    raw = HFVisionEncoder.for_testing(tmp_path / "a", feature_layer=[2, 1])
    norm = HFVisionEncoder.for_testing(tmp_path / "b", feature_layer=[2, 1], normalize_layers=True)
    # off: the identity is the one written before the option existed (old cache entries still hit)
    assert "normalize_layers" not in raw.cache_identity()["args"]
    assert norm.cache_identity()["args"]["normalize_layers"] is True
    media = [raw.example_media(tmp_path / "img", 0)]
    assert cache_key(raw, media) != cache_key(norm, media)
