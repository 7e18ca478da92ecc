"""``ocr``: the text in an image, line by line, top to bottom and left to right.

Two backends, both offline: RapidOCR (PP-OCRv4 detection + recognition as ONNX, package
``rapidocr-onnxruntime``) and Tesseract's LSTM engine (the ``tesseract`` binary, Debian
``tesseract-ocr tesseract-ocr-eng``). ``backend="auto"`` takes the first one installed.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shutil
import statistics
import subprocess
import threading
from collections.abc import Sequence
from typing import Any, ClassVar

from mmbridge.contracts.tools import Tool
from mmbridge.errors import ConfigError, DataError, ToolError
from mmbridge.utils.executables import ALLOW_ENV, resolve_executable
from mmbridge.utils.media_io import load_rgb

BACKENDS: tuple[str, ...] = ("rapidocr", "tesseract")
INSTALL_HINT = (
    "pip install rapidocr-onnxruntime (the 'tools' extra of mmbridge) or "
    "apt-get install tesseract-ocr tesseract-ocr-eng"
)
#: Program names ``tesseract_cmd`` may name without ``$MMBRIDGE_ALLOW_EXECUTABLES``.
KNOWN_PROGRAMS: tuple[str, ...] = ("tesseract",)
_LANG = re.compile(r"[A-Za-z0-9_]+(?:\+[A-Za-z0-9_]+)*")


def backend_available(backend: str, tesseract_cmd: str = "tesseract") -> bool:
    """Whether ``backend`` can run here (checks the install only; loads nothing)."""
    if backend == "rapidocr":
        return importlib.util.find_spec("rapidocr_onnxruntime") is not None
    if backend == "tesseract":
        return shutil.which(tesseract_cmd) is not None
    return False


def available_backends(tesseract_cmd: str = "tesseract") -> list[str]:
    """The installed backends, in the order ``auto`` tries them."""
    return [b for b in BACKENDS if backend_available(b, tesseract_cmd)]


@functools.lru_cache(maxsize=2)
def _rapidocr_engine(det_side_len: int) -> Any:
    # One engine per setting and process: loading the three ONNX models takes about a second.
    from rapidocr_onnxruntime import RapidOCR

    return RapidOCR(det_limit_side_len=det_side_len)


def reading_order(boxes: Sequence[tuple[Sequence[Sequence[float]], str]]) -> str:
    """Join detected text boxes into lines: top to bottom, left to right within a line.

    Args:
        boxes: ``(corners [4, 2] as (x, y), text)`` per detected box.

    Returns:
        The lines joined by newlines; the boxes of one line joined by spaces.
    """
    items = []
    for corners, text in boxes:
        ys = [p[1] for p in corners]
        items.append(
            {
                "x": min(p[0] for p in corners),
                "y": (min(ys) + max(ys)) / 2,
                "h": max(ys) - min(ys),
                "text": text.strip(),
            }
        )
    items = [i for i in items if i["text"]]
    if not items:
        return ""
    # Two boxes share a line when their centres are closer than half a typical text height.
    tolerance = 0.5 * statistics.median(i["h"] for i in items)
    lines: list[list[dict[str, Any]]] = []
    for item in sorted(items, key=lambda i: i["y"]):
        if lines and abs(item["y"] - statistics.fmean(i["y"] for i in lines[-1])) <= tolerance:
            lines[-1].append(item)
        else:
            lines.append([item])
    return "\n".join(
        " ".join(i["text"] for i in sorted(line, key=lambda i: i["x"])) for line in lines
    )


class OCRTool(Tool):
    """Optical character recognition: the printed text of an image, in reading order.

    Args:
        backend: ``auto`` (RapidOCR, else Tesseract), ``rapidocr`` or ``tesseract``.
        min_score: RapidOCR boxes recognised with a lower confidence are dropped.
        det_side_len: Images whose short side is below this are enlarged before reading
            (RapidOCR's detector; Tesseract also reads them at twice the size). PP-OCR's default,
            736, costs about twice the time of 480 on 224-pixel images and read no better.
        tesseract_cmd: The Tesseract executable: ``tesseract`` (found through ``PATH``), or a
            path listed in ``$MMBRIDGE_ALLOW_EXECUTABLES`` (a setting that may come from a
            checkpoint never picks an arbitrary program; see :mod:`mmbridge.utils.executables`).
        lang: Tesseract language(s), e.g. ``eng`` or ``eng+deu``.
        timeout_s: Seconds a call may take (the Tesseract subprocess is killed after it).
    """

    name: ClassVar[str] = "ocr"  # the registry sets it to the registered name
    description: ClassVar[str] = (
        "Read the printed text in an image (signs, receipts, numbers, pages). Returns the text "
        "line by line, top to bottom."
    )
    parameters: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "image": {
                "type": "string",
                "description": 'the image to read: "image" for the user\'s image',
            }
        },
        "required": ["image"],
    }
    media_args: ClassVar[dict[str, str]] = {"image": "image"}

    def __init__(
        self,
        backend: str = "auto",
        min_score: float = 0.5,
        det_side_len: int = 480,
        tesseract_cmd: str = "tesseract",
        lang: str = "eng",
        timeout_s: float = 30.0,
    ) -> None:
        if backend not in ("auto", *BACKENDS):
            raise ConfigError(
                f"tools.ocr.backend: unknown backend '{backend}'; valid: auto, "
                f"{', '.join(BACKENDS)}"
            )
        key = f"tools.{type(self).name or 'ocr'}"
        # Checked whatever the backend: a config naming a program is refused before it can run.
        exe = resolve_executable(tesseract_cmd, f"{key}.tesseract_cmd", KNOWN_PROGRAMS)
        if not isinstance(lang, str) or not _LANG.fullmatch(lang):
            raise ConfigError(
                f"{key}.lang: {lang!r} must be Tesseract language codes joined by "
                f"'+', e.g. eng or eng+deu"
            )
        installed = available_backends(exe or tesseract_cmd)
        if backend == "auto":
            if not installed:
                raise ConfigError(f"tools.ocr.backend: no OCR backend is installed; {INSTALL_HINT}")
            backend = installed[0]
        elif backend not in installed:
            raise ConfigError(
                f"tools.ocr.backend: '{backend}' is not installed (installed: "
                f"{', '.join(installed) or 'none'}); {INSTALL_HINT}"
            )
        self.backend = backend
        self.min_score = min_score
        self.det_side_len = det_side_len
        self.tesseract_cmd = tesseract_cmd
        self._tesseract_exe = exe  # the checked path: later PATH changes cannot swap the program
        self.lang = lang
        self.timeout_s = timeout_s
        # onnxruntime sessions may be called from several threads, but a timed-out call still
        # running beside a new one would double the CPU load: one call at a time.
        self._lock = threading.Lock()

    def __call__(self, image: str, **_: Any) -> str:
        with self._lock:
            text = self._rapidocr(image) if self.backend == "rapidocr" else self._tesseract(image)
        return text if text.strip() else "(no text found)"

    def _load(self, path: str) -> Any:
        import numpy as np

        try:  # refuses absurd sizes from the header, before decoding
            rgb = np.asarray(load_rgb(path))
        except DataError as exc:
            raise ToolError(str(exc)) from None
        return rgb[:, :, ::-1].copy()  # RapidOCR takes OpenCV's BGR order

    def _rapidocr(self, path: str) -> str:
        result, _ = _rapidocr_engine(self.det_side_len)(self._load(path))
        boxes = [
            (corners, text) for corners, text, score in (result or []) if score >= self.min_score
        ]
        return reading_order(boxes)

    def _tesseract(self, path: str) -> str:
        from PIL import Image

        image = Image.fromarray(self._load(path)[:, :, ::-1])
        # Small text reads better enlarged, large text worse, and the size is unknown: read small
        # images at x1 and x2 and keep the more confident reading (on generated 160/224-pixel
        # texts: 36/40 and 37/40 exact, against 32-36/40 for either scale alone).
        scales = (1, 2) if min(image.size) < self.det_side_len else (1,)
        readings = [self._tesseract_read(image, s, path) for s in scales]
        return max(readings, key=lambda r: r[1])[0]

    def _tesseract_read(self, image: Any, scale: int, path: str) -> tuple[str, float]:
        """``(text in reading order, character-weighted mean word confidence)``."""
        import csv
        import io

        from PIL import Image

        if scale > 1:
            image = image.resize(
                (image.width * scale, image.height * scale), Image.Resampling.LANCZOS
            )
        png = io.BytesIO()
        image.save(png, format="PNG")
        # --psm 6 (one uniform block) keeps the item and price of a receipt row on one line
        if self._tesseract_exe is None:
            raise ToolError(
                f"tesseract ({self.tesseract_cmd}) is not installed; {INSTALL_HINT} "
                f"(or list its path in {ALLOW_ENV})"
            )
        cmd = [self._tesseract_exe, "stdin", "stdout", "-l", self.lang, "--psm", "6", "tsv"]
        try:
            done = subprocess.run(
                cmd, input=png.getvalue(), capture_output=True, timeout=self.timeout_s, check=False
            )
        except subprocess.TimeoutExpired:
            raise ToolError(f"tesseract timed out after {self.timeout_s:g} s") from None
        if done.returncode != 0:
            raise ToolError(
                f"tesseract failed on {path}: {done.stderr.decode(errors='replace').strip()[-300:]}"
            )
        boxes, weighted, chars = [], 0.0, 0
        rows = csv.DictReader(
            io.StringIO(done.stdout.decode(errors="replace")),
            delimiter="\t",
            quoting=csv.QUOTE_NONE,
        )
        for row in rows:
            text = (row.get("text") or "").strip()
            if row.get("level") != "5" or not text:
                continue  # level 5 rows are words; the others are pages, blocks and lines
            x, y, w, h = (float(row[k]) / scale for k in ("left", "top", "width", "height"))
            boxes.append(([(x, y), (x + w, y), (x + w, y + h), (x, y + h)], text))
            weighted += float(row["conf"]) * len(text)
            chars += len(text)
        return reading_order(boxes), weighted / chars if chars else -1.0


COMPONENTS = {"tool": {"ocr": OCRTool}}
