"""``instruct_mix``: the instruction-tuning stage as a mixture of tasks and sources
(Data-Driven family, 2311.07594 §3.4; LLaVA-1.5, 2310.03744, §3.2 mixes captioning, VQA with a
short-answer format prompt, and conversations).

Per sample, a task is drawn with the sample's ``rng`` by the ``mix`` weights (among the tasks
the sample supports), and each instruction is rewritten with a template drawn for that task.
``sources`` re-weights whole data sources (``meta["source"]``) in ``annotate``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from mmbridge.contracts.types import ROLES, Sample, placeholder
from mmbridge.errors import ConfigError
from mmbridge.plugins.recipes.caption_pretrain import (
    CaptionPretrainRecipe,
    check_templates,
    media_prefix,
)

TASKS: tuple[str, ...] = ("caption", "qa")
#: Question templates (``{question}`` = the sample's question); the first one is the plain
#: question, as the evaluation asks it.
QA_TEMPLATES: tuple[str, ...] = (
    "{question}",
    "{question}\nAnswer the question using a single word or phrase.",
    "Answer briefly. {question}",
    "{question} Reply with one word.",
    "Look at the image and answer: {question}",
)


def _weights(value: Mapping[str, float], key: str, valid: Sequence[str] | None) -> dict[str, float]:
    out = {}
    for name, w in dict(value).items():
        if valid is not None and name not in valid:
            raise ConfigError(f"{key}.{name}: unknown; valid: {', '.join(valid)}")
        if isinstance(w, bool) or not isinstance(w, int | float) or w < 0:
            raise ConfigError(f"{key}.{name}: {w!r} must be a weight >= 0")
        out[str(name)] = float(w)
    if sum(out.values()) <= 0:
        raise ConfigError(f"{key}: the weights {dict(value)} sum to 0")
    return out


class InstructMixRecipe(CaptionPretrainRecipe):
    """A mixture of caption and question-answering instructions, and of data sources.

    Args:
        mix: Task -> weight (normalised), e.g. ``{caption: 0.3, qa: 0.7}``. ``caption``: the
            one-turn caption conversation (needs ``meta[caption_key]`` and media); ``qa``: the
            sample's own conversation, each question rewritten with a drawn template. A sample
            that supports only some tasks draws among those (weights renormalised); one that
            supports none is left as it is. ``meta["task"]`` records the draw.
        templates: Task -> templates: ``caption`` instructions (default: the brief-description
            prompts) and ``qa`` templates with a ``{question}`` field (default:
            :data:`QA_TEMPLATES`).
        sources: Source (``meta["source"]``; ``"default"`` when missing) -> weight: the split is
            resampled (same length, seeded) so that the sources make these shares of it;
            ``null`` keeps the split as it is.
        caption_key: The ``Sample.meta`` key of the caption.
        seed: Seeds the source resampling.
    """

    def __init__(
        self,
        mix: Mapping[str, float] | None = None,
        templates: Mapping[str, list[str]] | None = None,
        sources: Mapping[str, float] | None = None,
        caption_key: str = "caption",
        seed: int = 0,
    ) -> None:
        templates = dict(templates or {})
        for task in templates:
            if task not in TASKS:
                raise ConfigError(
                    f"recipe.templates.{task}: unknown task; valid: {', '.join(TASKS)}"
                )
        super().__init__(instructions=templates.get("caption"), caption_key=caption_key)
        self.mix = _weights(
            mix if mix is not None else {"caption": 0.3, "qa": 0.7}, "recipe.mix", TASKS
        )
        qa = (
            check_templates(templates["qa"], "recipe.templates.qa")
            if "qa" in templates
            else list(QA_TEMPLATES)
        )
        for t in qa:
            if "{question}" not in t:
                raise ConfigError(f"recipe.templates.qa: template {t!r} has no {{question}} field")
        self.qa_templates = qa
        self.sources = _weights(sources, "recipe.sources", None) if sources is not None else None
        self.seed = int(seed)

    # -- sources --------------------------------------------------------------------------------
    def annotate(self, samples: Sequence[Sample]) -> list[Sample]:
        """Resample the split to the ``sources`` shares (largest remainders; a source with
        fewer samples than its share is drawn with replacement)."""
        if self.sources is None or not samples:
            return list(samples)
        by_source: dict[str, list[Sample]] = {}
        for s in samples:
            by_source.setdefault(str(s.meta.get("source", "default")), []).append(s)
        unknown = sorted(set(by_source) - set(self.sources))
        if unknown:
            raise ConfigError(
                f"recipe.sources: the data has sources {', '.join(sorted(by_source))}; "
                f"give each a weight (missing: {', '.join(unknown)})"
            )
        present = {k: w for k, w in self.sources.items() if k in by_source and w > 0}
        if not present:
            raise ConfigError(
                "recipe.sources: no weighted source in the data "
                f"(sources: {', '.join(sorted(by_source))})"
            )
        total, n = sum(present.values()), len(samples)
        exact = {k: n * w / total for k, w in present.items()}
        counts = {k: int(v) for k, v in exact.items()}
        for k in sorted(exact, key=lambda k: counts[k] - exact[k])[: n - sum(counts.values())]:
            counts[k] += 1
        rng = random.Random(f"instruct_mix:{self.seed}")
        out: list[Sample] = []
        for k, c in counts.items():
            pool = by_source[k]
            out += rng.sample(pool, c) if c <= len(pool) else [rng.choice(pool) for _ in range(c)]
        rng.shuffle(out)
        return out

    # -- tasks ----------------------------------------------------------------------------------
    def tasks_of(self, sample: Sample) -> list[str]:
        """The tasks ``sample`` supports, in :data:`TASKS` order."""
        out = []
        text = sample.meta.get(self.caption_key)
        if sample.media and isinstance(text, str) and text.strip():
            out.append("caption")
        if any(ROLES.get(t.get("from", "")) == "assistant" for t in sample.conversations):
            out.append("qa")
        return out

    def qa_sample(self, sample: Sample, rng: random.Random) -> Sample:
        """The sample's conversation with every question rewritten by a drawn template."""
        turns, first = [], True
        for turn in sample.conversations:
            if ROLES.get(turn.get("from", "")) != "user":
                turns.append(dict(turn))
                continue
            q = turn["value"]
            for m in sample.media:
                q = q.replace(placeholder(m) + "\n", "").replace(placeholder(m), "")
            text = rng.choice(self.qa_templates).format(question=q.strip())
            turns.append({**turn, "value": (media_prefix(sample) if first else "") + text})
            first = False
        return sample.replace(conversations=turns, meta={**sample.meta, "task": "qa"})

    def __call__(self, sample: Sample, rng: random.Random) -> Sample | None:
        tasks = [t for t in self.tasks_of(sample) if self.mix.get(t, 0) > 0]
        if not tasks:
            return sample
        task = rng.choices(tasks, weights=[self.mix[t] for t in tasks])[0]
        if task == "caption":
            return self.caption_sample(sample, rng)
        return self.qa_sample(sample, rng)


COMPONENTS = {"recipe": {"instruct_mix": InstructMixRecipe}}
