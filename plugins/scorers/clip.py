"""``clip``: image-text similarity from CLIP weights the user has (Radford et al., 2103.00020);
AlignGPT (2405.14129, §3.2) scores its pre-training pairs this way."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmbridge.contracts.scorer import Scorer
from mmbridge.contracts.types import Sample
from mmbridge.errors import ConfigError
from mmbridge.plugins.scorers._features import media_paths, pair_text


class ClipScorer(Scorer):
    """Cosine similarity of CLIP's image and text embeddings of each pair.

    Args:
        path: An HF CLIP model directory (``CLIPModel`` weights, a tokenizer and an image
            processor), or an asset name / hub id (hub ids only when online).
        batch_size: Pairs per forward pass.
        device: Where CLIP runs (``null``: CUDA when available, else CPU).
    """

    def __init__(self, path: str, batch_size: int = 64, device: str | None = None) -> None:
        if not path:
            raise ConfigError(
                "recipe.scorer.path: the clip scorer needs the path of a CLIP model directory"
            )
        self.path = str(path)
        self.batch_size = int(batch_size)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._parts = None
        self._registry = None

    def setup(self, context) -> None:
        self._registry = context.registry  # resolves an asset name in `path`

    def _load(self):
        if self._parts is None:
            from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

            from mmbridge.registry.assets import resolve_model_path

            path = resolve_model_path(self.path, registry=self._registry, key="recipe.scorer.path")
            model = AutoModel.from_pretrained(path).to(self.device).eval()
            if not hasattr(model, "get_image_features"):
                raise ConfigError(
                    f"recipe.scorer.path: {path} holds a {type(model).__name__}, "
                    f"not a CLIP-style dual encoder"
                )
            self._parts = (
                model,
                AutoTokenizer.from_pretrained(path),
                AutoImageProcessor.from_pretrained(path),
            )
        return self._parts

    @torch.no_grad()
    def score(self, samples: Sequence[Sample]) -> torch.Tensor:
        from PIL import Image

        model, tokenizer, processor = self._load()
        paths = media_paths(samples, "image")
        texts = [pair_text(s) for s in samples]
        max_len = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", 77)
        out = []
        for i in range(0, len(samples), self.batch_size):
            images = []
            for p in paths[i : i + self.batch_size]:
                with Image.open(p) as im:
                    images.append(im.convert("RGB"))
            pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
            tok = tokenizer(
                texts[i : i + self.batch_size],
                padding=True,
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            )
            res = model(
                input_ids=tok["input_ids"].to(self.device),
                attention_mask=tok["attention_mask"].to(self.device),
                pixel_values=pixels,
            )
            img = torch.nn.functional.normalize(res.image_embeds.float(), dim=-1)
            txt = torch.nn.functional.normalize(res.text_embeds.float(), dim=-1)
            out.append((img * txt).sum(-1).cpu())
        return torch.cat(out)


COMPONENTS = {"scorer": {"clip": ClipScorer}}
