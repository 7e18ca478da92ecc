"""``hf_vision``: Hugging Face vision towers (CLIP, SigLIP, DINOv2, any ``AutoModel`` that returns
``hidden_states``) from a local directory, an offline asset name, or a hub id when online."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from mmbridge.contracts.encoder import ModalityEncoder
from mmbridge.contracts.llava_parts import LlavaUnrepresentable, LlavaVision
from mmbridge.errors import ConfigError
from mmbridge.model.precision import parse_dtype
from mmbridge.plugins.encoders._image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RESAMPLE,
    check_pool_to,
    demote_unused_parameters,
    example_png,
    expand_to_square,
    image_to_tensor,
    load_rgb,
    pads_to_square,
    pool_grid,
    weights_fingerprint,
)
from mmbridge.registry import Registry
from mmbridge.registry.assets import resolve_model_path

#: model_type of a full image-text checkpoint -> the class holding only its vision tower.
VISION_TOWERS = {
    "clip": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip2": "Siglip2VisionModel",
}
#: Used when a model directory has no preprocessor_config.json.
DEFAULT_NORM = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def _hw(value: Any) -> tuple[int, int] | None:
    """An HF size field (int, ``{height, width}`` or ``{shortest_edge}``) -> ``(H, W)``."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        if "shortest_edge" in value:
            return int(value["shortest_edge"]), int(value["shortest_edge"])
    return None


class HFVisionEncoder(ModalityEncoder):
    """Patch tokens of an HF vision tower, from one or several of its layers.

    Preprocessing follows the model's ``preprocessor_config.json`` (resize, centre crop,
    mean/std), done with PIL + torch. With ``image_size`` set the whole image is resized to
    ``image_size x image_size`` instead (no crop; position embeddings are interpolated).

    Args:
        path: Offline asset name (``dinov2-small``), local model directory, or hub id.
        feature_layer: Index into ``hidden_states`` (0 = embeddings, i = output of layer i);
            ``-1`` is the model's own final output (``last_hidden_state``: after the final norm
            for DINOv2/SigLIP). A list concatenates the layers' features along ``D`` (earlier
            layers keep more colour and position detail). Unused later layers are removed.
        drop_cls: Drop the prefix tokens (CLS, registers).
        image_size: Override the processor's input size (DINOv2 at 112 px = 8 x 8 patches of 14).
        pool_to: Average-pool the patch grid to ``pool_to x pool_to`` tokens.
        dtype: ``float32`` | ``float16`` | ``bfloat16`` (features are returned as float32).
        image_aspect_ratio: ``square`` (the processor's resize / crop) or ``pad``: first pad the
            image to a square with the processor's mean colour (LLaVA-1.5's ``expand2square``).
        normalize_layers: Standardise each selected layer's token features (a LayerNorm without
            affine weights) before concatenating them, so layers of different scale enter the
            connector alike (DINOv2-S: the last layer after its final norm has RMS 2.4, layer 6
            RMS 0.09). Applied before ``pool_to``; part of the feature-cache key only when set.
        registry: The run's registry, which resolves an offline model name in ``path`` (given by
            :func:`mmbridge.config.build.build`, never by the config; ``None`` outside a run: a
            local directory or a hub id only).
    """

    modality = "image"

    def __init__(
        self,
        path: str,
        feature_layer: int | list[int] = -1,
        drop_cls: bool = True,
        image_size: int | None = None,
        pool_to: int | None = None,
        dtype: str = "float32",
        normalize_layers: bool = False,
        image_aspect_ratio: str = "square",
        registry: Registry | None = None,
    ) -> None:
        super().__init__()
        import transformers

        layers = (
            [feature_layer] if isinstance(feature_layer, int) else [int(f) for f in feature_layer]
        )
        self.args = {
            "path": path,
            "feature_layer": layers if len(layers) > 1 else layers[0],
            "drop_cls": drop_cls,
            "image_size": image_size,
            "pool_to": pool_to,
            "dtype": dtype,
        }
        self._set_aspect_ratio(image_aspect_ratio)
        local = resolve_model_path(path, registry, key="encoder.path")
        try:
            config = transformers.AutoConfig.from_pretrained(local)
            cls_name = VISION_TOWERS.get(config.model_type)
            model_cls = getattr(transformers, cls_name) if cls_name else transformers.AutoModel
            self.model = model_cls.from_pretrained(local, dtype=parse_dtype(dtype, "encoder.dtype"))
        except OSError as exc:
            raise ConfigError(
                f"encoder.path: cannot load '{path}' (resolved to '{local}'): {exc}. "
                f"Give an offline asset name (`mmbridge assets`), a local model "
                f"directory, or a hub id while online"
            ) from exc
        self.model.eval()
        self.weights_id = weights_fingerprint(self.model)
        self._configure(
            layers, Path(local), config.model_type, drop_cls, image_size, pool_to, normalize_layers
        )

    @classmethod
    def from_config(
        cls,
        config: str | Path,
        feature_layer: int | list[int] = -1,
        drop_cls: bool = True,
        image_size: int | None = None,
        pool_to: int | None = None,
        dtype: str = "float32",
        normalize_layers: bool = False,
        image_aspect_ratio: str = "square",
    ) -> HFVisionEncoder:
        """The vision tower of a ``config.json`` with freshly initialised weights; nothing is
        downloaded and no weight file is read.

        Built on the current default device, so ``with torch.device("meta"):`` gives an encoder
        without storage whose shapes, token counts and parameter counts are the real one's
        (``mmbridge plan``); the probe forward pass that finds the unused parameters runs on
        meta tensors too. Preprocessing follows a ``preprocessor_config.json`` next to the
        config when there is one, else the config's ``image_size``.

        Args:
            config: A directory holding ``config.json``, or that file.
            feature_layer, drop_cls, image_size, pool_to, dtype: As in the constructor.
        """
        import transformers

        source = Path(config).expanduser()
        directory = source.parent if source.is_file() else source
        if not (directory / "config.json").is_file():
            raise ConfigError(f"encoder config: no config.json at '{source}'")
        full = transformers.AutoConfig.from_pretrained(directory)
        # a full image-text config (CLIP, SigLIP) holds the tower's own under vision_config
        tower_config = (
            getattr(full, "vision_config", None) if full.model_type in VISION_TOWERS else None
        )
        layers = (
            [feature_layer] if isinstance(feature_layer, int) else [int(f) for f in feature_layer]
        )
        self = cls.__new__(cls)
        ModalityEncoder.__init__(self)
        self.args = {
            "path": str(directory),
            "feature_layer": layers if len(layers) > 1 else layers[0],
            "drop_cls": drop_cls,
            "image_size": image_size,
            "pool_to": pool_to,
            "dtype": dtype,
        }
        self._set_aspect_ratio(image_aspect_ratio)
        self.model = transformers.AutoModel.from_config(
            tower_config or full, dtype=parse_dtype(dtype, "encoder.dtype")
        )
        self.model.eval()
        self.weights_id = (
            "random-init"  # no weights were read: a cache must never reuse these features
        )
        self._configure(
            layers, directory, full.model_type, drop_cls, image_size, pool_to, normalize_layers
        )
        return self

    def _configure(
        self,
        layers: list[int],
        local: Path,
        model_type: str,
        drop_cls: bool,
        image_size: int | None,
        pool_to: int | None,
        normalize_layers: bool,
    ) -> None:
        """Feature layers, truncation, preprocessing and token counts of the loaded tower."""
        vc = self.model.config
        self.patch = int(vc.patch_size)
        self.n_layers = int(vc.num_hidden_layers)
        self.layers = []
        for f in layers:
            a = f if f >= 0 else self.n_layers + 1 + f
            if not 0 <= a <= self.n_layers:
                raise ConfigError(
                    f"encoder.feature_layer: {f} is out of range for {local.name} "
                    f"({self.n_layers} layers: valid -{self.n_layers + 1}..{self.n_layers})"
                )
            self.layers.append(a)
        if max(self.layers) < self.n_layers:
            # One block at least: transformers records hidden_states around the blocks.
            self._truncate(max(max(self.layers), 1))
        self.size, self.resize_shortest, self.mean, self.std, self.resample = self._preprocessing(
            local, vc, model_type, image_size
        )
        native = _hw(getattr(vc, "image_size", None))
        accepts = "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters
        self._extra = {"interpolate_pos_encoding": True} if accepts and self.size != native else {}
        self.drop_cls, self.pool_to = drop_cls, pool_to
        self.normalize_layers = bool(normalize_layers)
        if (
            normalize_layers
        ):  # only when set: cache entries written before the option keep their key
            self.args["normalize_layers"] = True

        probe = torch.zeros(1, 3, *self.size)
        demote_unused_parameters(self.model, lambda: self._tokens(probe))
        with torch.no_grad():
            tokens = self._tokens(probe)
        self.grid = (self.size[0] // self.patch, self.size[1] // self.patch)
        self.prefix = tokens.shape[1] - self.grid[0] * self.grid[1]
        if pool_to is not None and self.grid[0] != self.grid[1]:
            raise ConfigError(f"encoder.pool_to: needs a square patch grid, got {self.grid}")
        check_pool_to(pool_to, self.grid[0], "encoder.pool_to")
        self._dim = int(tokens.shape[-1])

    def _truncate(self, keep: int) -> None:
        """Cut the block list after ``keep`` blocks (their outputs are never read)."""
        for name, module in self.model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) == self.n_layers and name:
                parent_name, _, attr = name.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                setattr(parent, attr, module[:keep])
                return

    @staticmethod
    def _preprocessing(local: Path, vc: Any, model_type: str, image_size: int | None) -> tuple:
        file = local / "preprocessor_config.json"
        cfg = json.loads(file.read_text()) if file.is_file() else {}
        mean, std = DEFAULT_NORM.get(model_type.split("_")[0], (IMAGENET_MEAN, IMAGENET_STD))
        if cfg.get("do_normalize", True):
            mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        resample = int(cfg.get("resample", 3))
        if image_size is not None:
            return (image_size, image_size), None, mean, std, resample
        size, crop = _hw(cfg.get("size")), _hw(cfg.get("crop_size"))
        if cfg.get("do_center_crop") and crop:
            return crop, min(size or crop), mean, std, resample
        if size:
            return size, None, mean, std, resample
        native = _hw(getattr(vc, "image_size", None))
        if native is None:
            raise ConfigError(
                f"encoder.image_size: {local} has no preprocessor_config.json and its "
                f"config no image_size; set encoder.image_size"
            )
        return native, None, mean, std, resample

    @classmethod
    def for_testing(cls, tmp_dir: Path, **kwargs: Any) -> HFVisionEncoder:
        """A 2-layer, 32-wide DINOv2 (16 px, 4 px patches) saved in ``tmp_dir`` and loaded back."""
        from mmbridge.testing.tiny import build_tiny_dinov2

        out = Path(tmp_dir) / "tiny-dinov2"
        build_tiny_dinov2(out)
        return cls(path=str(out), **kwargs)

    def example_media(self, tmp_dir: Path, index: int = 0) -> str:
        return example_png(tmp_dir, index)

    @property
    def out_dim(self) -> int:
        return self._dim

    def load(self, path: str) -> Image.Image:
        return load_rgb(path)

    def _set_aspect_ratio(self, image_aspect_ratio: str) -> None:
        self.pad_to_square = pads_to_square(image_aspect_ratio)
        if (
            self.pad_to_square
        ):  # only when set: cache entries written before the option keep their key
            self.args["image_aspect_ratio"] = "pad"

    def preprocess(self, raw: Image.Image) -> torch.Tensor:
        """RGB image -> ``[3, H, W]`` normalised (padded to a square first with
        ``image_aspect_ratio: pad``)."""
        if self.pad_to_square:
            raw = expand_to_square(raw, self.mean)
        return image_to_tensor(
            raw, self.size, self.mean, self.std, self.resample, self.resize_shortest
        )

    def num_tokens(self, x: torch.Tensor) -> int:
        patches = self.pool_to**2 if self.pool_to else self.grid[0] * self.grid[1]
        return patches + (0 if self.drop_cls else self.prefix)

    def _tokens(self, batch: torch.Tensor) -> torch.Tensor:
        """``[B, prefix + N, D * len(layers)]``."""
        param = next(self.model.parameters())
        out = self.model(
            pixel_values=batch.to(param.device, param.dtype),
            output_hidden_states=True,
            **self._extra,
        )
        feats = [
            out.last_hidden_state if a == self.n_layers else out.hidden_states[a]
            for a in self.layers
        ]
        if self.normalize_layers:
            feats = [F.layer_norm(f, f.shape[-1:]) for f in feats]
        return torch.cat(feats, dim=-1) if len(feats) > 1 else feats[0]

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, 3, H, W]`` -> features ``[B, N, D]`` (float32) and mask ``[B, N]`` (all True)."""
        tokens = self._tokens(batch)
        patches = tokens[:, self.prefix :]
        if self.pool_to:
            patches = pool_grid(patches, self.pool_to)
        feats = patches if self.drop_cls else torch.cat([tokens[:, : self.prefix], patches], dim=1)
        mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        return feats.float(), mask

    def llava_parts(self) -> LlavaVision:
        """This tower as Llava's ``vision_tower`` (:mod:`mmbridge.contracts.llava_parts`), or why
        not."""
        if self.pool_to:
            raise LlavaUnrepresentable("pools the patch grid", f"pool_to={self.pool_to}")
        if self.normalize_layers:
            raise LlavaUnrepresentable(
                "standardises each layer's features, which Llava's tower does not",
                "normalize_layers=true",
            )
        if self.pad_to_square:
            raise LlavaUnrepresentable(
                "pads the image to a square, which Llava's image processor does not",
                "image_aspect_ratio=pad",
            )
        if self.drop_cls and self.prefix != 1:
            raise LlavaUnrepresentable(
                "drops more than the one CLS token Llava's 'default' strategy drops",
                f"drop_cls=true with {self.prefix} prefix tokens (registers)",
            )
        if self._extra:
            raise LlavaUnrepresentable(
                "interpolates the position embeddings, which Llava's tower call does not ask for",
                f"image_size={self.args.get('image_size')}",
            )
        param = next(self.model.parameters())
        if self.n_layers in self.layers:
            probe = torch.zeros(1, 3, *self.size, device=param.device, dtype=param.dtype)
            with torch.no_grad():
                out = self.model(pixel_values=probe, output_hidden_states=True)
            if not torch.equal(out.last_hidden_state, out.hidden_states[-1]):
                raise LlavaUnrepresentable(
                    f"is the final layer norm's output, which no vision_feature_layer selects (a "
                    f"layer 0..{self.n_layers - 1} is)",
                    f"feature_layer=-1 of {type(self.model).__name__}",
                )
        top = max(self.layers)
        h, w = self.size
        processor: dict[str, Any] = {
            "do_resize": True,
            "resample": int(self.resample),
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_convert_rgb": True,
        }
        if self.resize_shortest:
            processor.update(
                size={"shortest_edge": int(self.resize_shortest)},
                do_center_crop=True,
                crop_size={"height": h, "width": w},
            )
        else:
            processor.update(size={"height": h, "width": w}, do_center_crop=False)
        layers = [int(a) for a in self.layers]
        return LlavaVision(
            tower=self.model,
            num_hidden_layers=max(top, 1) if top < self.n_layers else self.n_layers,
            feature_layer=layers[0] if len(layers) == 1 else layers,
            select_strategy="default" if self.drop_cls else "full",
            image_processor=processor,
            patch_size=self.patch,
            prefix_tokens=self.prefix,
            num_tokens=self.num_tokens(None),
        )

    def cache_identity(self) -> dict[str, Any]:
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "args": self.args,
            "preprocess": {
                "size": list(self.size),
                "resize_shortest": self.resize_shortest,
                "mean": list(self.mean),
                "std": list(self.std),
                "resample": RESAMPLE.get(self.resample, RESAMPLE[3]).name,
            },
            "weights": self.weights_id,
        }


COMPONENTS = {"encoder": {"hf_vision": HFVisionEncoder}}
