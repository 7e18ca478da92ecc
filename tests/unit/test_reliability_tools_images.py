"""Reliability suite, tools and images (issue 20, items 7-9): every bad input becomes a clear
result or error that names the value, the config key or the file, never a raw exception.

- Tool calls: replies nested past the recursion limit, absurd names, tools that raise anything
  (``SystemExit`` included) or return huge or non-text output all come back to the model as
  ``error: ...`` / truncated results, through the real ``llm`` and ``pipeline`` callers.
- The calculator is exact (``2**64``) or says it rounded, and refuses absurd work by name.
- A tool setting naming an executable is refused unless the program is known or listed by the
  user in ``MMBRIDGE_ALLOW_EXECUTABLES`` (a refused program never runs).
- Images: decompression bombs, sizes over the configurable limit, truncated and non-image files
  give a :class:`DataError` naming the file, in the encoders and in the tools.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mmbridge.contracts.tools import Tool
from mmbridge.errors import ConfigError, DataError
from mmbridge.plugins.encoders._image import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, load_rgb
from mmbridge.plugins.tools.calculator import ROUNDED_NOTE, CalculatorTool
from mmbridge.plugins.tools.callers import LLMToolCaller, PipelineToolCaller
from mmbridge.plugins.tools.image_info import ImageInfoTool
from mmbridge.plugins.tools.ocr import OCRTool
from mmbridge.tool_runtime import MAX_RESULT_CHARS, execute, format_call, parse_calls
from mmbridge.utils.executables import ALLOW_ENV


# -- helpers ------------------------------------------------------------------------------------
class Script:
    """A ``generate`` that returns fixed replies in turn and records what it was given."""

    def __init__(self, *replies: str) -> None:
        self.replies = list(replies)
        self.seen: list[list[dict[str, Any]]] = []

    def __call__(self, messages: list[dict[str, Any]]) -> str:
        self.seen.append([dict(m) for m in messages])
        return self.replies[min(len(self.seen), len(self.replies)) - 1]


class Misbehaves(Tool):
    """A tool that fails in the way named by ``how`` (the cases a tool author can get wrong)."""

    name = "misbehaves"
    description = "fails on purpose"

    def __init__(self, how: str) -> None:
        self.how = how

    def __call__(self, **arguments: Any) -> Any:
        if self.how == "exit":
            raise SystemExit(3)  # a library that calls sys.exit()
        if self.how == "recursion":

            def down(n: int) -> int:
                return down(n + 1)

            return down(0)
        if self.how == "huge":
            return "x" * 1_000_000
        if self.how == "huge error":
            raise ValueError("y" * 50_000)
        if self.how == "bytes":
            return b"not text"
        raise AssertionError(self.how)


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A valid 4x4 PNG whose header is rewritten to claim ``width x height`` (CRC fixed)."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def real_png(path: Path, size: tuple[int, int] = (16, 16)) -> Path:
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def truncated(path: Path, fmt: str) -> Path:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, fmt)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    monkeypatch.delenv(ALLOW_ENV, raising=False)


# -- tool calls: every failure is a result --------------------------------------------------------
DEEP = "<tool_call>" + "[" * 1000
BAD_REPLIES = {
    "1000 nested [ after <tool_call>": (DEEP, "nested too deeply"),
    "100000 nested [ after <tool_call>": ("<tool_call>" + "[" * 100_000, "nested too deeply"),
    "5000 nested [ after [TOOL_CALLS]": ("[TOOL_CALLS] " + "[" * 5000, "nested too deeply"),
    "arguments nested 40 deep": (
        '<tool_call>{"name": "calculator", "arguments": {"expression": '
        + "[" * 40
        + "]" * 40
        + "}}</tool_call>",
        "nested deeper than 32 levels",
    ),
    "a 10000-character tool name": (
        format_call("c" * 10_000, {"expression": "1"}),
        "the tool name is 10000 characters long",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REPLIES))
def test_bad_replies_become_error_results_in_the_llm_caller(case: str) -> None:
    reply, message = BAD_REPLIES[case]
    generate = Script(reply, "I could not use the tool.")
    run = LLMToolCaller([CalculatorTool()], call_format="tagged").run("What is 1+1?", {}, generate)
    assert run.answer == "I could not use the tool."
    assert len(run.calls) == 1 and run.calls[0].ok is False
    assert run.calls[0].result.startswith("error: ") and message in run.calls[0].result
    # the model read the error in its next turn
    assert message in generate.seen[1][-1]["content"]


def test_deep_nesting_never_raises_from_the_parser() -> None:
    head, calls = parse_calls("Let me see. " + DEEP)
    assert head == "Let me see."
    assert [c.name for c in calls] == ["?"] and "nested too deeply" in calls[0].error


BAD_TOOLS = {
    "exit": "tool 'misbehaves' failed: SystemExit: 3",
    "recursion": "tool 'misbehaves' failed: RecursionError",
    "bytes": "tool 'misbehaves' returned bytes, not text",
}


@pytest.mark.parametrize("how", list(BAD_TOOLS))
def test_tool_exceptions_become_error_results(how: str) -> None:
    tool = Misbehaves(how)
    generate = Script(format_call("misbehaves", {}), "done")
    run = LLMToolCaller([tool], call_format="tagged").run("go", {}, generate)
    assert run.answer == "done"
    assert [c.ok for c in run.calls] == [False]
    assert run.calls[0].result.startswith(f"error: {BAD_TOOLS[how]}")


@pytest.mark.parametrize(("how", "total"), [("huge", 1_000_000), ("huge error", None)])
def test_huge_outputs_are_cut_with_a_note(how: str, total: int | None) -> None:
    call = execute({"misbehaves": Misbehaves(how)}, "misbehaves", {}, {})
    text = call.result
    assert len(text) <= MAX_RESULT_CHARS + 40
    if total is not None:  # the result itself: kept up to the limit, the rest counted
        assert (
            call.ok
            and text == "x" * MAX_RESULT_CHARS + f" [truncated {total - MAX_RESULT_CHARS} chars]"
        )
    else:
        assert not call.ok and "ValueError" in text and "[truncated " in text


def test_the_llm_caller_cuts_to_its_own_limit() -> None:
    generate = Script(format_call("misbehaves", {}), "ok")
    run = LLMToolCaller([Misbehaves("huge")], call_format="tagged", max_result_chars=100).run(
        "go", {}, generate
    )
    assert run.calls[0].result == "x" * 100 + f" [truncated {1_000_000 - 100} chars]"


def test_the_pipeline_caller_records_a_failing_image_tool_and_goes_on(tmp_path: Path) -> None:
    bomb = png_claiming(tmp_path / "bomb.png", 40_000, 40_000)
    generate = Script("a red square")
    run = PipelineToolCaller([ImageInfoTool()]).run(
        "<image>\nWhat is it?", {"image": str(bomb)}, generate
    )
    assert run.answer == "a red square"
    assert [c.ok for c in run.calls] == [False]
    assert str(bomb) in run.calls[0].result and "too large" in run.calls[0].result
    assert "Output of" not in run.prompt  # a failed tool leaves no text in the prompt


# -- calculator: exact, or says it rounded; absurd work refused -----------------------------------
@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("2**64", "18446744073709551616"),
        ("0.1 + 0.2", "0.3"),
        ("12345678901234567890.123456789 * 3", "37037036703703703670.370370367"),
        ("99999999999999999999 * 99999999999999999999", "9999999999999999999800000000000000000001"),
        ("1/3 * 3", "1"),
        ("8 ** (1/3)", "2"),
        ("0.5 ** 20", "0.00000095367431640625"),
        ("2 ** 100", "1267650600228229401496703205376"),
    ],
)
def test_calculator_is_exact(expression: str, value: str) -> None:
    assert CalculatorTool()(expression=expression) == value


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("1 / 3", "0.333333333333333"),
        ("2 ** 0.5", "1.4142135623731"),
        ("2 / 3", "0.666666666666667"),
    ],
)
def test_calculator_says_when_it_rounded(expression: str, value: str) -> None:
    assert CalculatorTool()(expression=expression) == value + ROUNDED_NOTE


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("1e999999999", "the number 1e999999999 is out of range"),
        ("1e-999999999 + 1", "the number 1e-999999999 is out of range"),
        ("2 ** 1000", "exponent 1000 is too large (limit: 100)"),
        ("(10 ** 60) ** 2", "the result exceeds 10**100"),
        ("((1/3) ** 100) ** 100", "the result is smaller than 10**-150"),
        ("(-8) ** 0.5", "a fractional power (0.5) of a negative number (-8)"),
        ("0 ** -1", "division by zero"),
    ],
)
def test_calculator_refuses_absurd_work_as_an_error_result(expression: str, message: str) -> None:
    call = execute({"calculator": CalculatorTool()}, "calculator", {"expression": expression}, {})
    assert call.ok is False and message in call.result


# -- executables named in tool settings ------------------------------------------------------------
def fake_tesseract(path: Path, marker: Path) -> Path:
    """A stand-in for the ``tesseract`` binary: records that it ran, prints one TSV word."""
    header = (
        "level\tpage_num\tblock_num\tpar_num\tline_num\tword_num\t"
        "left\ttop\twidth\theight\tconf\ttext"
    )
    path.write_text(
        f"#!/bin/sh\ncat > /dev/null\ntouch '{marker}'\n"
        f"printf '{header}\\n5\\t1\\t1\\t1\\t1\\t1\\t2\\t2\\t10\\t8\\t96\\tHELLO\\n'\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.mark.parametrize("which", ["script path", "relative path", "unknown name", "shell"])
def test_a_config_cannot_name_an_executable(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "ran"
    script = fake_tesseract(tmp_path / "evil.sh", marker)
    monkeypatch.chdir(tmp_path)
    value = {
        "script path": str(script),
        "relative path": "./evil.sh",
        "unknown name": "definitely-not-a-tool",
        "shell": "/bin/sh",
    }[which]
    with pytest.raises(ConfigError) as err:
        OCRTool(backend="tesseract", tesseract_cmd=value)
    message = str(err.value)
    assert message.startswith("tools.ocr.tesseract_cmd: refusing to run")
    assert repr(value) in message and "tesseract" in message and ALLOW_ENV in message
    assert not marker.exists()  # refused before anything ran


def test_an_executable_listed_by_the_user_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "ran"
    script = fake_tesseract(tmp_path / "my-tesseract", marker)
    monkeypatch.setenv(ALLOW_ENV, os.pathsep.join(["/nonexistent/x", str(script)]))
    tool = OCRTool(backend="tesseract", tesseract_cmd=str(script), det_side_len=1)
    assert tool(image=str(real_png(tmp_path / "sign.png"))) == "HELLO"
    assert marker.exists()


def test_the_tesseract_language_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"tools\.ocr\.lang: 'eng --oem 0'"):
        OCRTool(backend="auto", lang="eng --oem 0")


# -- images: bombs, limits, truncated and non-image files ----------------------------------------
IMAGE_CASES = {
    "header claims 40000x40000": (
        lambda d: png_claiming(d / "bomb.png", 40_000, 40_000),
        "is too large",
    ),
    "header claims 9000x9000 (81 MP)": (
        lambda d: png_claiming(d / "big.png", 9000, 9000),
        f"9000x9000 = 81000000 pixels, over the limit of {DEFAULT_MAX_PIXELS}",
    ),
    "truncated PNG": (lambda d: truncated(d / "cut.png", "PNG"), "truncated"),
    "truncated JPEG": (lambda d: truncated(d / "cut.jpg", "JPEG"), "truncated"),
    "truncated GIF": (lambda d: truncated(d / "cut.gif", "GIF"), "truncated"),
    "text file named .png": (
        lambda d: (d / "notes.png").write_text("hello") and d / "notes.png",
        "not an image file",
    ),
    "empty file": (
        lambda d: (d / "empty.jpg").write_bytes(b"") or d / "empty.jpg",
        "not an image file",
    ),
    "missing file": (lambda d: d / "missing.png", "no such file"),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_bad_images_are_data_errors_naming_the_file(case: str, tmp_path: Path) -> None:
    make, message = IMAGE_CASES[case]
    path = make(tmp_path)
    with pytest.raises(DataError) as err:
        load_rgb(str(path))
    assert f"'{path}'" in str(err.value) and message in str(err.value)


def test_the_pixel_limit_is_configurable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = real_png(tmp_path / "small.png", (16, 16))
    monkeypatch.setenv(MAX_PIXELS_ENV, "255")
    with pytest.raises(DataError, match=r"16x16 = 256 pixels, over the limit of 255 pixels"):
        load_rgb(str(path))
    monkeypatch.setenv(MAX_PIXELS_ENV, "256")  # the limit is inclusive
    assert load_rgb(str(path)).size == (16, 16)
    assert load_rgb(str(path), max_pixels=1000).getpixel((0, 0)) == (200, 30, 30)
    with pytest.raises(DataError, match="over the limit of 100 pixels"):
        load_rgb(str(path), max_pixels=100)
    # raising the limit above PIL's own guard lets a large (valid) header through to decoding
    big = png_claiming(tmp_path / "big.png", 9000, 9000)
    monkeypatch.setenv(MAX_PIXELS_ENV, "100_000_000")
    with pytest.raises(DataError, match="truncated"):  # the header passed; its pixels are missing
        load_rgb(str(big))


def test_files_and_handed_over_media_meet_one_pixel_limit_with_one_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's image file (DataError) and the same image handed to the API or the server as a
    path, bytes, a PIL image or an array (MediaTooLarge: 413) are refused by one check, in one
    message but for how the image is named; PIL's own guard (a header past twice its limit) is
    worded the same way."""
    import numpy as np

    from mmbridge.data.inputs import MediaFiles, MediaTooLarge

    path = real_png(tmp_path / "small.png", (16, 16))
    bomb = png_claiming(tmp_path / "bomb.png", 40_000, 40_000)
    monkeypatch.setenv(MAX_PIXELS_ENV, "255")
    pil = Image.new("RGB", (16, 16), (200, 30, 30))
    for file, handed, size in [
        (path, [str(path), path.read_bytes(), pil, np.asarray(pil)], "16x16 = 256 pixels"),
        (bomb, [str(bomb), bomb.read_bytes()], "1600000000 pixels"),
    ]:
        with pytest.raises(DataError) as err:
            load_rgb(str(file))
        message = str(err.value)
        assert message.startswith(f"image '{file}' is too large: {size}, over the limit of 255 ")
        assert MAX_PIXELS_ENV in message
        tail = message.removeprefix(f"image '{file}'")
        with MediaFiles() as files:
            for value in handed:
                with pytest.raises(MediaTooLarge) as too_large:
                    files.image(value, "image")
                assert str(too_large.value).endswith(tail), type(value)


@pytest.mark.parametrize("value", ["lots", "0", "-5", "1.5"])
def test_a_bad_pixel_limit_names_the_variable(
    value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MAX_PIXELS_ENV, value)
    with pytest.raises(
        ConfigError, match=rf"{MAX_PIXELS_ENV}='{value}' must be a positive integer"
    ):
        load_rgb(str(real_png(tmp_path / "ok.png")))


def test_an_encoder_refuses_a_bomb_by_name(tmp_path: Path) -> None:
    from mmbridge.plugins.encoders.hf_vision import HFVisionEncoder

    encoder = HFVisionEncoder.for_testing(tmp_path / "enc")
    bomb = png_claiming(tmp_path / "bomb.png", 40_000, 40_000)
    with pytest.raises(DataError, match=rf"image '{bomb}' is too large"):
        encoder.load(str(bomb))
    ok = encoder.preprocess(encoder.load(str(real_png(tmp_path / "ok.png"))))
    assert ok.shape[0] == 3 and ok.isfinite().all()


@pytest.mark.parametrize(
    "case", ["header claims 40000x40000", "truncated PNG", "text file named .png"]
)
def test_image_tools_turn_bad_images_into_error_results(case: str, tmp_path: Path) -> None:
    make, message = IMAGE_CASES[case]
    path = make(tmp_path)
    generate = Script(format_call("image_info", {"image": "image"}), "no idea")
    run = LLMToolCaller([ImageInfoTool()], call_format="tagged").run(
        "<image>\nWhat colour?", {"image": str(path)}, generate
    )
    assert run.answer == "no idea"
    assert [c.ok for c in run.calls] == [False]
    assert str(path) in run.calls[0].result and message in run.calls[0].result


def test_ocr_refuses_a_bomb_before_running_tesseract(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "ran"
    script = fake_tesseract(tmp_path / "my-tesseract", marker)
    monkeypatch.setenv(ALLOW_ENV, str(script))
    tool = OCRTool(backend="tesseract", tesseract_cmd=str(script))
    bomb = png_claiming(tmp_path / "bomb.png", 40_000, 40_000)
    call = execute({"ocr": tool}, "ocr", {"image": "image"}, {"image": str(bomb)})
    assert call.ok is False and str(bomb) in call.result and "too large" in call.result
    assert not marker.exists()
