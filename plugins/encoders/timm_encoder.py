"""``timm``: any timm image model (ViTs, convnets) as a patch-token encoder, with local weights."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mmbridge.contracts.encoder import ModalityEncoder
from mmbridge.errors import ConfigError, did_you_mean
from mmbridge.plugins.encoders._image import (
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

_INTERPOLATION = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}


class TimmEncoder(ModalityEncoder):
    """A timm model's patch tokens ``[B, N, D]``; weights from a local file, never downloaded.

    Images are resized (whole image, no crop) to ``image_size`` and normalised with the mean/std
    of the model's timm data config.

    Args:
        model_name: A timm model name (``timm.list_models()``), e.g. ``vit_small_patch14_dinov2``.
        pretrained_path: Local checkpoint (``.pth``/``.safetensors`` state dict) loaded into the
            model; ``None`` keeps the seeded random initialisation.
        image_size: Input side in pixels (models that take ``img_size`` are built for it).
        model_args: Extra ``timm.create_model`` arguments (``depth``, ``patch_size``, ...).
        feature_layer: ``-1`` = the final features (after the model's last norm); otherwise the
            output of that block/stage (0-based; negative counts from the end), without the
            final norm. Later blocks are removed, so they cost nothing.
        drop_cls: Drop the prefix tokens (CLS, registers: ``model.num_prefix_tokens``).
        pool_to: Average-pool the patch grid to ``pool_to x pool_to`` tokens (``None``: keep).
        init_seed: Seed of the random initialisation (so random-weight runs are reproducible).
        image_aspect_ratio: ``square`` (resize the whole image) or ``pad``: first pad it to a
            square with the mean colour (LLaVA-1.5's ``expand2square``).
    """

    modality = "image"

    def __init__(
        self,
        model_name: str,
        pretrained_path: str | None = None,
        image_size: int = 224,
        model_args: dict[str, Any] | None = None,
        feature_layer: int = -1,
        drop_cls: bool = True,
        pool_to: int | None = None,
        init_seed: int = 0,
        image_aspect_ratio: str = "square",
    ) -> None:
        super().__init__()
        import timm
        import timm.data

        self.args = {
            "model_name": model_name,
            "pretrained_path": pretrained_path,
            "image_size": image_size,
            "model_args": dict(model_args or {}),
            "feature_layer": feature_layer,
            "drop_cls": drop_cls,
            "pool_to": pool_to,
            "init_seed": init_seed,
        }
        self.pad_to_square = pads_to_square(image_aspect_ratio)
        if (
            self.pad_to_square
        ):  # only when set: cache entries written before the option keep their key
            self.args["image_aspect_ratio"] = "pad"
        if not timm.is_model(model_name):
            raise ConfigError(
                f"encoder.model_name: unknown timm model '{model_name}'"
                f"{did_you_mean(model_name, timm.list_models())}"
            )
        if pretrained_path is not None and not Path(pretrained_path).is_file():
            raise ConfigError(f"encoder.pretrained_path: '{pretrained_path}' is not a file")
        self.model = self._create(timm, model_name, image_size, dict(model_args or {}), init_seed)
        if pretrained_path is not None:
            self._load_weights(str(pretrained_path))
        self.weights_id = weights_fingerprint(self.model)
        if feature_layer != -1:
            if not hasattr(self.model, "prune_intermediate_layers"):
                raise ConfigError(
                    f"encoder.feature_layer: {model_name} has no intermediate-layer "
                    f"support in timm; use feature_layer: -1"
                )
            # After pruning, forward_features returns that block's output (norm removed).
            try:
                self.model.prune_intermediate_layers(
                    [feature_layer], prune_norm=True, prune_head=True
                )
            except (IndexError, AssertionError) as exc:
                raise ConfigError(
                    f"encoder.feature_layer: {feature_layer} is out of range for "
                    f"{model_name}: {exc}"
                ) from None
        cfg = timm.data.resolve_data_config({}, model=self.model)
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])
        self.resample = _INTERPOLATION.get(cfg.get("interpolation", "bicubic"), 3)
        self.image_size = int(image_size)
        self.feature_layer, self.drop_cls, self.pool_to = feature_layer, drop_cls, pool_to

        probe = torch.zeros(1, 3, image_size, image_size)
        demote_unused_parameters(self.model, lambda: self._tokens(probe)[0])
        with torch.no_grad():
            tokens, prefix = self._tokens(probe)
        self.prefix, n_patches = prefix, tokens.shape[1] - prefix
        self.grid = int(round(n_patches**0.5))
        if self.grid**2 != n_patches:
            raise ConfigError(
                f"encoder: {model_name} at image_size {image_size} gives {n_patches} "
                f"patch tokens, not a square grid"
            )
        check_pool_to(pool_to, self.grid, "encoder.pool_to")
        self._dim = int(tokens.shape[-1])

    @staticmethod
    def _create(
        timm: Any, name: str, image_size: int, model_args: dict[str, Any], seed: int
    ) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                return timm.create_model(
                    name, pretrained=False, num_classes=0, img_size=image_size, **model_args
                )
            except TypeError as exc:
                if "img_size" not in str(exc):
                    raise ConfigError(f"encoder.model_args: {exc}") from None
            torch.manual_seed(seed)
            # A convnet: it takes any input size.
            return timm.create_model(name, pretrained=False, num_classes=0, **model_args)

    def _load_weights(self, path: str) -> None:
        from timm.models import load_checkpoint

        # timm's own filter adapts original-format checkpoints and resamples position embeddings.
        filter_fn = getattr(sys.modules[type(self.model).__module__], "checkpoint_filter_fn", None)
        try:
            result = load_checkpoint(self.model, path, strict=False, filter_fn=filter_fn)
        except Exception as exc:
            raise ConfigError(
                f"encoder.pretrained_path: cannot load '{path}' into "
                f"{self.args['model_name']}: {type(exc).__name__}: {exc}"
            ) from exc
        classifier = str(getattr(self.model, "pretrained_cfg", {}).get("classifier", "head"))
        unexpected = [k for k in result.unexpected_keys if not k.startswith(classifier)]
        if result.missing_keys or unexpected:
            raise ConfigError(
                f"encoder.pretrained_path: '{path}' does not fit "
                f"{self.args['model_name']}: missing {result.missing_keys[:5]}, "
                f"unexpected {unexpected[:5]}"
            )

    @classmethod
    def for_testing(cls, tmp_dir: Path, **kwargs: Any) -> TimmEncoder:
        """A 2-block ViT (32 px, 8 px patches, width 32) saved as safetensors in ``tmp_dir`` and
        loaded back through ``pretrained_path``."""
        import timm
        from safetensors.torch import save_file

        args = {
            "model_name": "vit_tiny_patch16_224",
            "image_size": 32,
            "model_args": {"depth": 2, "patch_size": 8, "embed_dim": 32, "num_heads": 2},
        }
        args.update(kwargs)
        source = cls._create(
            timm, args["model_name"], args["image_size"], args["model_args"], seed=1
        )
        path = Path(tmp_dir) / "tiny_vit.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
        return cls(pretrained_path=str(path), **args)

    def example_media(self, tmp_dir: Path, index: int = 0) -> str:
        return example_png(tmp_dir, index)

    @property
    def out_dim(self) -> int:
        return self._dim

    def load(self, path: str) -> Image.Image:
        return load_rgb(path)

    def preprocess(self, raw: Image.Image) -> torch.Tensor:
        """RGB image -> ``[3, S, S]`` normalised, ``S = image_size`` (padded to a square first
        with ``image_aspect_ratio: pad``)."""
        if self.pad_to_square:
            raw = expand_to_square(raw, self.mean)
        return image_to_tensor(
            raw, (self.image_size, self.image_size), self.mean, self.std, self.resample
        )

    def num_tokens(self, x: torch.Tensor) -> int:
        patches = self.pool_to**2 if self.pool_to else self.grid**2
        return patches + (0 if self.drop_cls else self.prefix)

    def _tokens(self, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``[B, prefix + N, D]`` tokens and the prefix count."""
        param = next(self.model.parameters())
        out = self.model.forward_features(batch.to(param.device, param.dtype))
        if out.dim() == 4:  # convnet feature map [B, C, H, W]
            return out.flatten(2).transpose(1, 2), 0
        return out, int(getattr(self.model, "num_prefix_tokens", 0))

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, 3, S, S]`` -> features ``[B, N, D]`` (float32) and mask ``[B, N]`` (all True)."""
        tokens, prefix = self._tokens(batch)
        patches = tokens[:, prefix:]
        if self.pool_to:
            patches = pool_grid(patches, self.pool_to)
        feats = patches if self.drop_cls else torch.cat([tokens[:, :prefix], patches], dim=1)
        mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        return feats.float(), mask

    def cache_identity(self) -> dict[str, Any]:
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "args": self.args,
            "preprocess": {
                "size": self.image_size,
                "mean": list(self.mean),
                "std": list(self.std),
                "resample": RESAMPLE[self.resample].name,
            },
            "weights": self.weights_id,
        }


COMPONENTS = {"encoder": {"timm": TimmEncoder}}
