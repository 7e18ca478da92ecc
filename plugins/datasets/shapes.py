"""``shapes``: generated images of 1-3 coloured shapes with known ground truth.

No caption data set ships offline, so alignment is measured on data whose answers are known
exactly: each image holds a few shapes (colour, kind, grid cell), its caption lists them and a
multi-turn conversation asks one-word questions of four types (colour, shape, position, count).
Generation is deterministic per (arguments, split, index) and written once per argument set into
``cache_dir/shapes/<key>``, atomically (temp dir + rename, under a file lock).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from mmbridge.contracts.dataset import DatasetFiles, DatasetSource
from mmbridge.contracts.types import ROLES, Sample, placeholder
from mmbridge.data.generated import publish_once
from mmbridge.data.llava import write_llava
from mmbridge.errors import ConfigError, did_you_mean

log = logging.getLogger(__name__)

#: Bump when drawing or questions change: it is part of the cache key.
GENERATOR_VERSION = 1
#: Colour name -> RGB. Saturated and far apart in hue/brightness, so an encoder can tell them apart.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 80, 235),
    "yellow": (245, 225, 30),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "cyan": (30, 210, 220),
    "pink": (250, 130, 200),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star")
DEFAULT_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
DEFAULT_SHAPES = ["circle", "square", "triangle", "cross"]
BACKGROUND = (120, 120, 120)
#: layout -> rows of cell names (the position answers).
LAYOUTS: dict[str, list[list[str]]] = {
    "grid": [
        ["top left", "top", "top right"],
        ["left", "centre", "right"],
        ["bottom left", "bottom", "bottom right"],
    ],
    "row": [["left", "centre", "right"]],
}
QTYPES: tuple[str, ...] = ("colour", "shape", "position", "count")
QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": (
        "What colour is the {shape}?",
        "Which colour is the {shape}?",
        "What is the colour of the {shape}?",
        "What colour does the {shape} have?",
    ),
    "shape": (
        "What shape is the {colour} object?",
        "Which shape is {colour}?",
        "What is the {colour} shape?",
        "What kind of shape is drawn in {colour}?",
    ),
    "position": (
        "Where is the {colour} {shape}?",
        "Where is the {colour} {shape} located?",
        "In which part of the image is the {colour} {shape}?",
        "Where can you see the {colour} {shape}?",
    ),
    "count": (
        "How many shapes are there?",
        "How many shapes are in the image?",
        "How many objects can you see?",
        "Count the shapes in the image.",
    ),
    "count_colour": (
        "How many {colour} shapes are there?",
        "How many shapes are {colour}?",
        "Count the {colour} shapes.",
    ),
}
#: Caption corruptions of the ``caption_noise`` knob (ground truth for alignment levels), with
#: their severity: one attribute of one object wrong, or a caption of another image.
NOISE_KINDS: dict[str, int] = {"wrong_colour": 1, "wrong_shape": 1, "unrelated": 2}
_SUPERSAMPLE = 4  # draw large, then box-downsample: smooth edges, exact interior colours
_PROGRESS_MIN = 300


def _preposition(position: str) -> str:
    if position == "centre":
        return "in the centre"
    return f"on the {position}" if position in ("left", "right") else f"at the {position}"


def _outline(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon of ``kind`` centred at (cx, cy) with half-size ``r`` (circle/square: none)."""
    if kind == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if kind == "cross":
        w = 0.38 * r
        pts = [
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
            (-w, -r),
        ]
        return [(cx + x, cy + y) for x, y in pts]
    if kind == "star":
        return [
            (
                cx + (r if k % 2 == 0 else 0.45 * r) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else 0.45 * r) * math.cos(k * math.pi / 5),
            )
            for k in range(10)
        ]
    return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]


def render(objects: Sequence[dict[str, Any]], image_size: int) -> Image.Image:
    """Draw ``objects`` (``shape``, ``colour``, ``centre`` [x, y], ``radius`` in pixels) on the
    background; returns an RGB image ``image_size`` x ``image_size``."""
    s = _SUPERSAMPLE
    img = Image.new("RGB", (image_size * s, image_size * s), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        (cx, cy), r, fill = o["centre"], o["radius"], PALETTE[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=fill)
        else:
            draw.polygon([(x * s, y * s) for x, y in _outline(o["shape"], cx, cy, r)], fill=fill)
    return img.reduce(s)


def _layout_objects(rng: random.Random, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    rows = LAYOUTS[cfg["layout"]]
    size = cfg["image_size"]
    cw, ch = size / len(rows[0]), size / len(rows)
    cells = [(i, j) for i in range(len(rows)) for j in range(len(rows[0]))]
    n = rng.randint(1, cfg["max_objects"])
    objects = []
    for i, j in sorted(rng.sample(cells, n)):  # reading order, as the caption lists them
        cell = min(cw, ch)
        r = cell * rng.uniform(0.28, 0.38)
        slack = max(0.0, cell / 2 - r - 1.0)
        cx = (j + 0.5) * cw + rng.uniform(-slack, slack)
        cy = (i + 0.5) * ch + rng.uniform(-slack, slack)
        shape, colour = rng.choice(cfg["shapes"]), rng.choice(cfg["colours"])
        xs, ys = zip(*(_outline(shape, cx, cy, r)))
        bbox = [
            max(0, math.floor(min(xs))),
            max(0, math.floor(min(ys))),
            min(size, math.ceil(max(xs))),
            min(size, math.ceil(max(ys))),
        ]
        objects.append(
            {
                "shape": shape,
                "colour": colour,
                "position": rows[i][j],
                "bbox": bbox,
                "centre": [round(cx, 3), round(cy, 3)],
                "radius": round(r, 3),
            }
        )
    return objects


def _questions(rng: random.Random, objects: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """One ``(qtype, question, answer)`` per answerable type, in random order. A question only
    names what identifies one object (a unique shape, colour or colour+shape)."""
    shapes = Counter(o["shape"] for o in objects)
    colours = Counter(o["colour"] for o in objects)
    pairs = Counter((o["colour"], o["shape"]) for o in objects)
    candidates: dict[str, list[tuple[str, str]]] = {
        "colour": [
            (rng.choice(QUESTIONS["colour"]).format(shape=o["shape"]), o["colour"])
            for o in objects
            if shapes[o["shape"]] == 1
        ],
        "shape": [
            (rng.choice(QUESTIONS["shape"]).format(colour=o["colour"]), o["shape"])
            for o in objects
            if colours[o["colour"]] == 1
        ],
        "position": [
            (rng.choice(QUESTIONS["position"]).format(**o), o["position"])
            for o in objects
            if pairs[(o["colour"], o["shape"])] == 1
        ],
    }
    if rng.random() < 0.25:
        # the most frequent colour: a random present colour would almost always answer "1"
        top = max(colours.values())
        colour = rng.choice(sorted(c for c, k in colours.items() if k == top))
        candidates["count"] = [
            (rng.choice(QUESTIONS["count_colour"]).format(colour=colour), str(colours[colour]))
        ]
    else:
        candidates["count"] = [(rng.choice(QUESTIONS["count"]), str(len(objects)))]
    order = list(QTYPES)
    rng.shuffle(order)
    return [(q, *rng.choice(candidates[q])) for q in order if candidates[q]]


def caption(objects: Sequence[dict[str, Any]]) -> str:
    """``"A red circle at the top left and a blue square in the centre."``"""
    parts = [
        f"{'an' if o['colour'][0] in 'aeiou' else 'a'} {o['colour']} {o['shape']} "
        f"{_preposition(o['position'])}"
        for o in objects
    ]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def corrupt_caption(
    rng: random.Random, objects: list[dict[str, Any]], kind: str, cfg: dict[str, Any]
) -> str:
    """A caption of ``objects`` that is wrong in the way ``kind`` says: one object's colour or
    shape replaced by another one of ``cfg`` (``wrong_colour`` / ``wrong_shape``), or the
    caption of a freshly drawn, different layout (``unrelated``)."""
    true = caption(objects)
    if kind == "unrelated":
        for _ in range(100):
            text = caption(_layout_objects(rng, cfg))
            if text != true:
                return text
        return text
    attr = "colour" if kind == "wrong_colour" else "shape"
    wrong = [dict(o) for o in objects]
    k = rng.randrange(len(wrong))
    wrong[k][attr] = rng.choice([v for v in cfg[f"{attr}s"] if v != wrong[k][attr]])
    return caption(wrong)


def _noise_kind(rng: random.Random, rates: dict[str, float]) -> str:
    u, acc = rng.random(), 0.0
    for kind in NOISE_KINDS:
        acc += rates.get(kind, 0.0)
        if u < acc:
            return kind
    return "none"


def make_sample(cfg: dict[str, Any], split: str, index: int) -> tuple[Image.Image, Sample]:
    """Image and sample ``index`` of ``split`` (its media path is filled in by the caller).

    Each image has its own RNG seeded by (seed, split, index): splits never share a stream, and
    the first k images do not depend on how many are generated. With ``caption_noise`` the
    train split's captions are corrupted from a separate stream, so images, questions and answers
    are the same as without noise; ``meta["caption_noise"]`` names the corruption (``"none"``).
    """
    rng = random.Random(f"shapes:{cfg['seed']}:{split}:{index}")
    objects = _layout_objects(rng, cfg)
    qa = _questions(rng, objects)
    turns: list[dict[str, str]] = []
    for k, (_, question, answer) in enumerate(qa):
        prefix = f"{placeholder('image')}\n" if k == 0 else ""
        turns += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    meta = {
        "caption": caption(objects),
        "qtypes": [q for q, _, _ in qa],
        "objects": [{k: o[k] for k in ("shape", "colour", "position", "bbox")} for o in objects],
    }
    rates = cfg.get("caption_noise")
    if rates:
        kind = "none"
        if split == "train":  # held-out captions stay clean
            noise_rng = random.Random(f"shapes-noise:{cfg['seed']}:{index}")
            kind = _noise_kind(noise_rng, rates)
            if kind != "none":
                meta["caption"] = corrupt_caption(noise_rng, objects, kind, cfg)
        meta["caption_noise"] = kind
    return render(objects, cfg["image_size"]), Sample(
        id=f"{split}-{index:06d}", conversations=turns, meta=meta
    )


class ShapesDataset(DatasetSource):
    """Generated shapes with captions and one-word QA (colour, shape, position, count).

    Args:
        n_train: Training images.
        n_val: Validation images (a split with 0 images is left out).
        n_test: Test images.
        image_size: Side of the square images in pixels (>= 24).
        seed: Base seed; each split derives its own stream from it, so held-out images are new.
        colours: Colour names drawn from (subset of :data:`PALETTE`).
        shapes: Shape names drawn from (subset of :data:`SHAPES`).
        layout: ``grid`` (3x3 cells: "top left" ... "bottom right") or ``row`` (left/centre/right).
        max_objects: At most this many shapes per image (at least one).
        caption_noise: Rates of corrupted train captions per kind (``wrong_colour``,
            ``wrong_shape``, ``unrelated``; summing to at most 1), e.g. ``{wrong_colour: 0.1,
            unrelated: 0.2}``: the ground truth of alignment levels (AlignGPT, 2405.14129). Only
            ``meta["caption"]`` changes; ``meta["caption_noise"]`` records the kind (``"none"``
            for clean samples and for every val/test sample).
    """

    def __init__(
        self,
        n_train: int = 2000,
        n_val: int = 64,
        n_test: int = 256,
        image_size: int = 64,
        seed: int = 0,
        colours: list[str] | None = None,
        shapes: list[str] | None = None,
        layout: str = "grid",
        max_objects: int = 3,
        caption_noise: dict[str, float] | None = None,
    ) -> None:
        colours = list(colours or DEFAULT_COLOURS)
        shapes = list(shapes or DEFAULT_SHAPES)
        for key, values, valid in (("colours", colours, PALETTE), ("shapes", shapes, SHAPES)):
            for v in values:
                if v not in valid:
                    raise ConfigError(
                        f"data.{key}: unknown value '{v}'{did_you_mean(v, valid)}; "
                        f"valid: {', '.join(valid)}"
                    )
            if len(set(values)) != len(values):
                raise ConfigError(f"data.{key}: duplicate values in {values}")
        if layout not in LAYOUTS:
            raise ConfigError(
                f"data.layout: unknown layout '{layout}'; valid: {', '.join(LAYOUTS)}"
            )
        cells = sum(len(r) for r in LAYOUTS[layout])
        if not 1 <= max_objects <= cells:
            raise ConfigError(
                f"data.max_objects: {max_objects} must be in 1..{cells} for layout '{layout}'"
            )
        if image_size < 24:
            raise ConfigError(f"data.image_size: {image_size} is too small (minimum 24)")
        for key, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if n < 0:
                raise ConfigError(f"data.{key}: {n} must be >= 0")
        self.counts = {"train": n_train, "val": n_val, "test": n_test}
        self.args: dict[str, Any] = {
            **{f"n_{s}": n for s, n in self.counts.items()},
            "image_size": image_size,
            "seed": seed,
            "colours": colours,
            "shapes": shapes,
            "layout": layout,
            "max_objects": max_objects,
            "version": GENERATOR_VERSION,
        }
        noise = _check_noise(caption_noise, colours, shapes)
        if noise:  # only then: clean data sets keep their cache key
            self.args["caption_noise"] = noise

    @property
    def key(self) -> str:
        """The cache folder name: a digest of everything that determines the files."""
        return hashlib.sha256(json.dumps(self.args, sort_keys=True).encode()).hexdigest()[:16]

    def identity(self) -> dict[str, Any]:
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "args": dict(self.args),
        }

    def prepare(self, cache_dir: Path) -> DatasetFiles:
        """Generate the data set once into ``cache_dir/shapes/<key>`` and say where it is.

        Two processes preparing the same arguments at once wait on one lock; the loser finds the
        finished folder. Generation writes into a temp folder that is renamed when complete, so an
        interrupted run leaves no half data set (its temp folder is removed by the next run).
        """
        final = publish_once(Path(cache_dir) / "shapes", self.key, self._generate)
        splits = {s: final / f"{s}.json" for s, n in self.counts.items() if n > 0 or s == "train"}
        return DatasetFiles(splits=splits, media_root=final)

    def _generate(self, out: Path) -> None:
        from rich.progress import Progress

        total = sum(self.counts.values())
        log.info("generating %d shapes images into %s", total, out)
        with Progress(transient=True, disable=total < _PROGRESS_MIN) as progress:
            task = progress.add_task("generating shapes", total=total)
            for split, n in self.counts.items():
                if n == 0 and split != "train":
                    continue
                folder = out / "images" / split
                folder.mkdir(parents=True)
                samples = []
                for i in range(n):
                    image, sample = make_sample(self.args, split, i)
                    path = folder / f"{i:06d}.png"
                    image.save(path, format="PNG", optimize=False)
                    sample.media["image"] = str(path)
                    samples.append(sample)
                    progress.advance(task)
                write_llava(samples, out / f"{split}.json", media_root=out)
        (out / "info.json").write_text(
            json.dumps({"generator": "shapes", **self.args}, indent=1) + "\n"
        )


def _check_noise(
    noise: dict[str, float] | None, colours: list[str], shapes: list[str]
) -> dict[str, float]:
    """The non-zero rates of ``data.caption_noise``, checked (errors name the key)."""
    rates: dict[str, float] = {}
    for kind, rate in dict(noise or {}).items():
        if kind not in NOISE_KINDS:
            raise ConfigError(
                f"data.caption_noise: unknown kind '{kind}'{did_you_mean(kind, NOISE_KINDS)}; "
                f"valid: {', '.join(NOISE_KINDS)}"
            )
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
            raise ConfigError(f"data.caption_noise.{kind}: {rate!r} must be a rate in [0, 1]")
        if rate > 0:
            rates[kind] = float(rate)
    if sum(rates.values()) > 1 + 1e-9:
        raise ConfigError(f"data.caption_noise: rates sum to {sum(rates.values()):g} > 1")
    for kind, values in (("wrong_colour", colours), ("wrong_shape", shapes)):
        if kind in rates and len(values) < 2:
            raise ConfigError(
                f"data.caption_noise.{kind}: needs at least two data.{kind.split('_')[1]}s"
            )
    return rates


def qa_turns(sample: Sample) -> list[tuple[str, str, str]]:
    """``(qtype, question, answer)`` for each gpt turn, qtypes from ``meta["qtypes"]`` (turns
    beyond the list get ``"other"``); the question has its placeholders removed."""
    qtypes = list(sample.meta.get("qtypes", []))
    out, question = [], ""
    for turn in sample.conversations:
        role = ROLES.get(turn["from"])
        if role == "user":
            question = turn["value"].replace(placeholder("image"), "").strip()
        elif role == "assistant":
            k = len(out)
            out.append((qtypes[k] if k < len(qtypes) else "other", question, turn["value"]))
    return out


def _norm(answer: str) -> str:
    return " ".join(answer.strip().lower().rstrip(".").split())


def chance_accuracy(
    samples_train: Sequence[Sample], samples_test: Sequence[Sample]
) -> dict[str, float]:
    """Accuracy of always giving the train split's most frequent answer, per question type.

    Returns ``{qtype: accuracy on the test split}`` plus ``"overall"`` (over all test questions).
    A question type never seen in training scores 0. Answers are compared case-insensitively.
    """
    by_type: dict[str, Counter[str]] = {}
    for s in samples_train:
        for q, _, a in qa_turns(s):
            by_type.setdefault(q, Counter())[_norm(a)] += 1
    # ties broken by the answer text, so the baseline does not depend on sample order
    majority = {q: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for q, c in by_type.items()}
    hits: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for s in samples_test:
        for q, _, a in qa_turns(s):
            totals[q] += 1
            hits[q] += int(majority.get(q) == _norm(a))
    result = {q: hits[q] / totals[q] for q in sorted(totals)}
    if totals:
        result["overall"] = sum(hits.values()) / sum(totals.values())
    return result


COMPONENTS = {"dataset": {"shapes": ShapesDataset}}
