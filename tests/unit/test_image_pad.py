"""``image_aspect_ratio: pad`` (LLaVA-1.5's ``expand2square``) against hand-computed pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmbridge.errors import ConfigError
from mmbridge.plugins.encoders._image import expand_to_square, image_to_tensor
from mmbridge.plugins.encoders.hf_vision import HFVisionEncoder
from mmbridge.plugins.encoders.timm_encoder import TimmEncoder

MEAN = (0.485, 0.456, 0.406)  # ImageNet's: the pad colour is (123, 116, 103)
STD = (0.229, 0.224, 0.225)


def ramp(w: int, h: int) -> Image.Image:
    """A w x h RGB image whose pixel (x, y) is (10 x + y, 200, 7 y)."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    for y in range(h):
        for x in range(w):
            a[y, x] = (10 * x + y, 200, 7 * y)
    return Image.fromarray(a)


def test_wide_image_centred_vertically():
    out = np.asarray(expand_to_square(ramp(4, 2), MEAN))
    assert out.shape == (4, 4, 3)
    pad = [123, 116, 103]  # int(0.485 * 255), int(0.456 * 255), int(0.406 * 255)
    # (w - h) // 2 = 1: rows 1 and 2 hold the image, rows 0 and 3 the mean colour
    assert out[0].tolist() == [pad] * 4 and out[3].tolist() == [pad] * 4
    assert out[1].tolist() == [[0, 200, 0], [10, 200, 0], [20, 200, 0], [30, 200, 0]]
    assert out[2].tolist() == [[1, 200, 7], [11, 200, 7], [21, 200, 7], [31, 200, 7]]


def test_tall_image_centred_horizontally_offset_rounded_down():
    out = np.asarray(expand_to_square(ramp(2, 5), (0.5, 0.0, 1.0)))
    assert out.shape == (5, 5, 3)
    pad = [127, 0, 255]
    # (h - w) // 2 = 1: columns 1 and 2 hold the image; columns 0, 3, 4 the mean colour
    for y in range(5):
        assert out[y, 0].tolist() == pad and out[y, 3].tolist() == pad and out[y, 4].tolist() == pad
        assert out[y, 1].tolist() == [y, 200, 7 * y] and out[y, 2].tolist() == [10 + y, 200, 7 * y]


def test_square_image_unchanged():
    img = ramp(3, 3)
    assert expand_to_square(img, MEAN) is img


def expected_tensor(rows: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(rows.astype(np.float32)).permute(2, 0, 1) / 255.0
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    from mmbridge.testing.tiny import build_tiny_dinov2

    out = tmp_path_factory.mktemp("pad") / "tiny-dinov2"
    build_tiny_dinov2(out)
    return out


def test_hf_vision_pads_before_its_resize(dinov2_dir):
    enc = HFVisionEncoder(str(dinov2_dir), image_size=16, image_aspect_ratio="pad")
    x = enc.preprocess(ramp(16, 10))  # padded to 16 x 16: no resize, the values by hand
    canvas = np.empty((16, 16, 3), dtype=np.uint8)
    canvas[:] = (123, 116, 103)
    canvas[3:13] = np.asarray(ramp(16, 10))  # (16 - 10) // 2 = 3
    assert torch.allclose(x, expected_tensor(canvas), atol=1e-6)
    # the pad normalises to about 0 (int() rounds the mean colour down)
    assert x[:, 0, 0].abs().max() < 0.02
    plain = HFVisionEncoder(str(dinov2_dir), image_size=16)
    assert not torch.allclose(plain.preprocess(ramp(16, 10)), x)
    assert plain.cache_identity() != enc.cache_identity()  # features cached apart
    assert "image_aspect_ratio" not in plain.cache_identity()["args"]  # old cache keys kept
    # with the processor's resize + centre crop: pad first, then the same resize / crop
    cropping = HFVisionEncoder(str(dinov2_dir), image_aspect_ratio="pad")
    want = image_to_tensor(
        Image.fromarray(canvas),
        cropping.size,
        cropping.mean,
        cropping.std,
        cropping.resample,
        cropping.resize_shortest,
    )
    assert torch.equal(cropping.preprocess(ramp(16, 10)), want)


def test_timm_pads_and_bad_value_is_refused():
    enc = TimmEncoder(
        "vit_tiny_patch16_224",
        image_size=16,
        model_args={"depth": 1, "patch_size": 8},
        image_aspect_ratio="pad",
    )
    x = enc.preprocess(ramp(10, 16))
    canvas = np.empty((16, 16, 3), dtype=np.uint8)
    assert enc.mean == (0.5, 0.5, 0.5) and enc.std == (0.5, 0.5, 0.5)  # this timm ViT's data config
    canvas[:] = (127, 127, 127)  # int(0.5 * 255)
    canvas[:, 3:13] = np.asarray(ramp(10, 16))  # (16 - 10) // 2 = 3
    want = (torch.from_numpy(canvas.astype(np.float32)).permute(2, 0, 1) / 255.0 - 0.5) / 0.5
    assert torch.allclose(x, want, atol=1e-6)
    with pytest.raises(
        ConfigError, match="encoder.image_aspect_ratio: 'letterbox'.*valid: square, pad"
    ):
        TimmEncoder(
            "vit_tiny_patch16_224",
            image_size=16,
            model_args={"depth": 1, "patch_size": 8},
            image_aspect_ratio="letterbox",
        )
