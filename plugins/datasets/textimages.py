"""``textimages``: generated images of rendered text whose answers need the text.

Three kinds, each with one question per image: signs (a word or two on a coloured board:
"What does the sign say?"), receipts (items and prices: a price, the printed total, or the sum
of the prices when no total is printed, which needs the calculator) and numbers ("What number
is shown?"). A few questions need no tool (the colour of the sign, the kind of image), so a
model can learn when to call one. ``meta`` holds the ground truth: ``qtypes``, ``tool`` (the
tool the question needs, or ``None``), ``tool_calls`` (the plan: each call with its ``truth``,
the exact output a perfect tool gives), ``text`` (everything written, in reading order) and
``answer``.

A ``scanned`` split holds real scans from scikit-image (``page``: printed text, ``text``:
handwriting) with hand-written questions, when scikit-image is installed. Text is drawn with
PIL's scalable default font (Pillow >= 10.1), so no font file is needed.

Generation is deterministic per (arguments, split, index) and written once per argument set into
``cache_dir/textimages/<key>``, atomically (temp dir + rename, under a file lock).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from mmbridge.contracts.dataset import DatasetFiles, DatasetSource
from mmbridge.contracts.types import Sample, placeholder
from mmbridge.data.generated import publish_once
from mmbridge.data.llava import write_llava
from mmbridge.errors import ConfigError, did_you_mean
from mmbridge.tool_runtime import media_ref

log = logging.getLogger(__name__)

#: Bump when drawing or questions change: it is part of the cache key.
GENERATOR_VERSION = 1
KINDS: tuple[str, ...] = ("sign", "receipt", "number")
SIGN_TEXTS: tuple[str, ...] = (
    "OPEN",
    "CLOSED",
    "EXIT",
    "STOP",
    "SALE",
    "CAFE",
    "HOTEL",
    "BAKERY",
    "PHARMACY",
    "TAXI",
    "PARKING",
    "LIBRARY",
    "MUSEUM",
    "POLICE",
    "BANK",
    "PIZZA",
    "FLOWERS",
    "TICKETS",
    "GARDEN",
    "NO ENTRY",
    "BUS STOP",
    "FRESH FISH",
    "BOOK SHOP",
    "KEEP LEFT",
    "SLOW DOWN",
    "ICE CREAM",
    "CAR WASH",
    "POST OFFICE",
    "FOOD MARKET",
    "TRAIN STATION",
)
ITEMS: tuple[str, ...] = (
    "Milk",
    "Bread",
    "Eggs",
    "Tea",
    "Coffee",
    "Rice",
    "Apples",
    "Cheese",
    "Juice",
    "Soap",
    "Butter",
    "Pasta",
    "Honey",
    "Lemons",
    "Salt",
)
#: Sign board colours (name -> RGB); the text is black or white, whichever contrasts.
BOARDS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 30),
    "green": (30, 140, 60),
    "blue": (30, 70, 200),
    "yellow": (245, 215, 40),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
    "orange": (245, 135, 20),
    "purple": (120, 50, 170),
}
QUESTIONS: dict[str, tuple[str, ...]] = {
    "sign_text": ("What does the sign say?", "What is written on the sign?", "Read the sign."),
    "sign_colour": ("What colour is the sign?", "What is the colour of the sign?"),
    "receipt_total": (
        "What is the total?",
        "What is the total on the receipt?",
        "How much is the total amount?",
    ),
    "receipt_price": ("How much does the {item} cost?", "What is the price of the {item}?"),
    "receipt_sum": ("What do all the items cost together?", "What is the sum of the prices?"),
    "number": ("What number is shown?", "Which number is written in the image?"),
    "kind": ("Is this a sign, a receipt or a number?",),
}
KIND_ANSWERS = {"sign": "a sign", "receipt": "a receipt", "number": "a number"}
_SCENE = (215, 215, 210)
_GAP = 0.9  # word gap in font sizes
_PROGRESS_MIN = 300


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """PIL's built-in scalable font at ``size`` pixels."""
    return ImageFont.load_default(size=max(6, int(size)))


def _fit(text: str, width: float, height: float) -> int:
    """The largest font size (pixels) at which ``text`` fits ``width`` x ``height``."""
    size = int(height)
    while size > 8 and font(size).getlength(text) > width:
        size -= 1
    return size


def _ink(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return (0, 0, 0) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else (255, 255, 255)


def _draw_words(
    draw: ImageDraw.ImageDraw,
    xy: tuple[float, float],
    words: list[str],
    size: int,
    fill: tuple[int, int, int],
) -> None:
    # A wide gap between words: OCR detectors then see separate words and keep the space.
    f, x = font(size), xy[0]
    for word in words:
        draw.text((x, xy[1]), word, font=f, fill=fill, anchor="lm")
        x += f.getlength(word) + _GAP * size


def _words_width(words: list[str], size: int) -> float:
    f = font(size)
    return sum(f.getlength(w) for w in words) + _GAP * size * (len(words) - 1)


def _sign(rng: random.Random, s: int) -> tuple[Image.Image, dict[str, Any]]:
    text, colour = rng.choice(SIGN_TEXTS), rng.choice(sorted(BOARDS))
    img = Image.new("RGB", (s, s), _SCENE)
    draw = ImageDraw.Draw(img)
    w, h = s * rng.uniform(0.8, 0.92), s * rng.uniform(0.3, 0.42)
    x0, y0 = rng.uniform(0.02 * s, s - w - 0.02 * s), rng.uniform(0.1 * s, s - h - 0.1 * s)
    draw.rounded_rectangle(
        [x0, y0, x0 + w, y0 + h],
        radius=0.08 * h,
        fill=BOARDS[colour],
        outline=(60, 60, 60),
        width=max(1, s // 100),
    )
    words = text.split()
    size = int(0.5 * h)
    while size > 8 and _words_width(words, size) > 0.86 * w:
        size -= 1
    left = x0 + (w - _words_width(words, size)) / 2
    _draw_words(draw, (left, y0 + h / 2), words, size, _ink(BOARDS[colour]))
    return img, {"text": text, "colour": colour}


def _receipt(rng: random.Random, s: int, with_total: bool) -> tuple[Image.Image, dict[str, Any]]:
    n = rng.randint(2, 4)
    items = rng.sample(ITEMS, n)
    cents = [rng.randrange(50, 1000, 5) for _ in items]
    prices = [f"{c // 100}.{c % 100:02d}" for c in cents]
    total = f"{sum(cents) // 100}.{sum(cents) % 100:02d}"
    rows = list(zip(items, prices)) + ([("TOTAL", total)] if with_total else [])
    img = Image.new("RGB", (s, s), _SCENE)
    draw = ImageDraw.Draw(img)
    line = s / 7.0
    size = int(0.62 * line)
    x0, x1 = 0.12 * s, 0.88 * s
    y0 = rng.uniform(0.02 * s, s - (len(rows) + 0.8) * line - 0.02 * s)
    draw.rectangle([x0, y0, x1, y0 + (len(rows) + 0.8) * line], fill=(252, 252, 248))
    f = font(size)
    for k, (name, price) in enumerate(rows):
        y = y0 + (k + 0.9) * line
        draw.text((x0 + 0.05 * s, y), name, font=f, fill=(10, 10, 10), anchor="lm")
        draw.text((x1 - 0.05 * s, y), price, font=f, fill=(10, 10, 10), anchor="rm")
    if with_total:  # a rule above the total, as on a till receipt
        yr = y0 + (len(rows) - 0.6) * line
        draw.line([x0 + 0.05 * s, yr, x1 - 0.05 * s, yr], fill=(60, 60, 60), width=max(1, s // 150))
    text = "\n".join(f"{a} {b}" for a, b in rows)
    return img, {"items": items, "prices": prices, "total": total, "text": text}


def _number(rng: random.Random, s: int) -> tuple[Image.Image, dict[str, Any]]:
    value = str(rng.randint(10, 99999))
    img = Image.new("RGB", (s, s), tuple(rng.randint(200, 250) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    size = _fit(value, 0.8 * s, 0.35 * s)
    colour = rng.choice([(20, 20, 20), (150, 20, 20), (20, 40, 150), (20, 100, 40)])
    cx, cy = s / 2 + rng.uniform(-0.05, 0.05) * s, rng.uniform(0.3, 0.7) * s
    draw.text((cx, cy), value, font=font(size), fill=colour, anchor="mm")
    return img, {"text": value}


def _ocr_call(text: str) -> dict[str, Any]:
    return {"name": "ocr", "arguments": {"image": media_ref("image")}, "truth": text}


def make_sample(cfg: dict[str, Any], split: str, index: int) -> tuple[Image.Image, Sample]:
    """Image and sample ``index`` of ``split`` (its media path is filled in by the caller);
    each image has its own RNG seeded by (seed, split, index)."""
    rng = random.Random(f"textimages:{cfg['seed']}:{split}:{index}")
    kind, s = rng.choice(cfg["kinds"]), cfg["image_size"]
    calls: list[dict[str, Any]] = []
    if kind == "sign":
        img, facts = _sign(rng, s)
        qtype = "sign_colour" if rng.random() < 0.25 else "sign_text"
        answer = facts["colour"] if qtype == "sign_colour" else facts["text"]
    elif kind == "receipt":
        qtype = rng.choice(["receipt_total", "receipt_price", "receipt_sum"])
        img, facts = _receipt(rng, s, with_total=qtype != "receipt_sum")
        k = rng.randrange(len(facts["items"]))
        answer = facts["prices"][k] if qtype == "receipt_price" else facts["total"]
        facts["item"] = facts["items"][k].lower()
        calls.append(_ocr_call(facts["text"]))
        if qtype == "receipt_sum":
            calls.append(
                {
                    "name": "calculator",
                    "arguments": {"expression": " + ".join(facts["prices"])},
                    "truth": facts["total"],
                }
            )
    else:
        img, facts = _number(rng, s)
        qtype, answer = "number", facts["text"]
    if rng.random() < cfg["kind_ratio"]:
        qtype, answer, calls = "kind", KIND_ANSWERS[kind], []
    elif qtype in ("sign_text", "number"):
        calls.append(_ocr_call(facts["text"]))
    question = rng.choice(QUESTIONS[qtype]).format(item=facts.get("item", ""))
    tool = calls[-1]["name"] if calls else None
    meta = {
        "kind": kind,
        "qtypes": [qtype],
        "tool": tool,
        "tool_calls": calls,
        "text": facts["text"],
        "answer": answer,
    }
    turns = [
        {"from": "human", "value": f"{placeholder('image')}\n{question}"},
        {"from": "gpt", "value": answer},
    ]
    return img, Sample(id=f"{split}-{index:06d}", conversations=turns, meta=meta)


#: The real scans: (skimage.data function, transcription, [(qtype, question, answer, tool)]).
SCANS: dict[str, tuple[str, list[tuple[str, str, str, str | None]]]] = {
    "page": (
        "Region-based segmentation\n"
        "Let us first determine markers of the coins and the\n"
        "background. These markers are pixels that we can label\n"
        "unambiguously as either object or background. Here,\n"
        "the markers are found at the two extreme parts of the\n"
        "histogram of grey values:\n"
        ">>> markers = np.zeros_like(coins)",
        [
            (
                "scan_heading",
                "What is the heading of the page?",
                "Region-based segmentation",
                "ocr",
            ),
            ("scan_read", "Markers of which objects are determined first?", "coins", "ocr"),
            (
                "scan_read",
                "Which NumPy function is called in the code line?",
                "np.zeros_like",
                "ocr",
            ),
            ("scan_read", "The markers are found in the histogram of what?", "grey values", "ocr"),
        ],
    ),
    "text": (
        "",
        [
            ("scan_style", "Is the writing printed or handwritten?", "handwritten", None),
            (
                "scan_style",
                "What is written: a letter, a shopping list or formulas?",
                "formulas",
                None,
            ),
        ],
    ),
}


def scanned_samples(folder: Path) -> list[Sample]:
    """Save scikit-image's ``page`` and ``text`` scans into ``folder`` and return their QA."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for name, (text, questions) in SCANS.items():
        path = folder / f"{name}.png"
        Image.fromarray(getattr(data, name)()).convert("RGB").save(path, format="PNG")
        for k, (qtype, question, answer, tool) in enumerate(questions):
            calls = [_ocr_call(text)] if tool == "ocr" else []
            meta = {
                "kind": f"scan-{name}",
                "qtypes": [qtype],
                "tool": tool,
                "tool_calls": calls,
                "text": text,
                "answer": answer,
            }
            turns = [
                {"from": "human", "value": f"{placeholder('image')}\n{question}"},
                {"from": "gpt", "value": answer},
            ]
            samples.append(
                Sample(
                    id=f"scanned-{name}-{k}",
                    media={"image": str(path)},
                    conversations=turns,
                    meta=meta,
                )
            )
    return samples


class TextImagesDataset(DatasetSource):
    """Generated signs, receipts and numbers with questions whose answers need the text.

    Args:
        n_train: Training images.
        n_val: Validation images (a split with 0 images is left out).
        n_test: Test images.
        image_size: Side of the square images in pixels (>= 96: smaller text is unreadable).
        seed: Base seed; each split derives its own stream from it.
        kinds: Kinds drawn from (subset of ``sign``, ``receipt``, ``number``).
        kind_ratio: Fraction of "which kind of image" questions (answered without a tool).
        scanned: Add the ``scanned`` split of real scans (needs scikit-image; skipped with a
            warning when it is missing).
    """

    def __init__(
        self,
        n_train: int = 2000,
        n_val: int = 64,
        n_test: int = 256,
        image_size: int = 224,
        seed: int = 0,
        kinds: list[str] | None = None,
        kind_ratio: float = 0.1,
        scanned: bool = True,
    ) -> None:
        kinds = list(kinds or KINDS)
        for k in kinds:
            if k not in KINDS:
                raise ConfigError(
                    f"data.kinds: unknown kind '{k}'{did_you_mean(k, KINDS)}; "
                    f"valid: {', '.join(KINDS)}"
                )
        if not kinds or len(set(kinds)) != len(kinds):
            raise ConfigError(f"data.kinds: expected distinct kinds, got {kinds}")
        if image_size < 96:
            raise ConfigError(
                f"data.image_size: {image_size} is too small for readable text (minimum 96)"
            )
        if not 0.0 <= kind_ratio <= 1.0:
            raise ConfigError(f"data.kind_ratio: {kind_ratio} must be in [0, 1]")
        for key, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if n < 0:
                raise ConfigError(f"data.{key}: {n} must be >= 0")
        if scanned and importlib.util.find_spec("skimage") is None:
            log.warning(
                "data.scanned: scikit-image is not installed; the 'scanned' split is left out "
                "(pip install scikit-image, or mmbridge[data])"
            )
            scanned = False
        self.counts = {"train": n_train, "val": n_val, "test": n_test}
        self.args: dict[str, Any] = {
            **{f"n_{s}": n for s, n in self.counts.items()},
            "image_size": image_size,
            "seed": seed,
            "kinds": kinds,
            "kind_ratio": kind_ratio,
            "scanned": scanned,
            "version": GENERATOR_VERSION,
        }

    @property
    def key(self) -> str:
        """The cache folder name: a digest of everything that determines the files."""
        return hashlib.sha256(json.dumps(self.args, sort_keys=True).encode()).hexdigest()[:16]

    def identity(self) -> dict[str, Any]:
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "args": dict(self.args),
        }

    def _splits(self, root: Path) -> dict[str, Path]:
        splits = {s: root / f"{s}.json" for s, n in self.counts.items() if n > 0 or s == "train"}
        if self.args["scanned"]:
            splits["scanned"] = root / "scanned.json"
        return splits

    def prepare(self, cache_dir: Path) -> DatasetFiles:
        """Generate the data set once into ``cache_dir/textimages/<key>`` and say where it is."""
        final = publish_once(Path(cache_dir) / "textimages", self.key, self._generate)
        return DatasetFiles(splits=self._splits(final), media_root=final)

    def _generate(self, out: Path) -> None:
        from rich.progress import Progress

        total = sum(self.counts.values())
        log.info("generating %d text images into %s", total, out)
        with Progress(transient=True, disable=total < _PROGRESS_MIN) as progress:
            task = progress.add_task("generating text images", total=total)
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
        if self.args["scanned"]:
            write_llava(
                scanned_samples(out / "images" / "scanned"), out / "scanned.json", media_root=out
            )
        (out / "info.json").write_text(
            json.dumps({"generator": "textimages", **self.args}, indent=1) + "\n"
        )


COMPONENTS = {"dataset": {"textimages": TextImagesDataset}}
