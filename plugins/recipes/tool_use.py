"""``tool_use``: conversations that teach a model when and how to call a tool.

A QA sample whose answer needs a tool (``meta.tool``, or a plan in ``meta.tool_calls`` as the
``textimages`` data set writes it) becomes::

    system:    the tool list and call format (the text the ``llm`` caller prompts with)
    human:     <image>\\nWhat is the total?
    gpt:       <tool_call>{"name": "ocr", "arguments": {"image": "image"}}</tool_call>
    tool:      <tool_result name="ocr">Milk 2.40\\nTOTAL 5.50</tool_result>
    gpt:       5.50

Samples that need no tool keep their direct answer (a share of them set by ``no_tool_ratio``),
so the model learns when not to call one. This is the data-driven route to tool use of
Toolformer (2302.04761) and GPT4Tools (2305.18752): the tool outputs in the data are real,
computed once by running the tools at annotate time (cached on disk), and replaced by the plan's
ground truth (``truth``) only when a tool is not installed or fails.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock

from mmbridge.contracts.recipe import DataRecipe, RecipeContext
from mmbridge.contracts.tools import Tool
from mmbridge.contracts.types import ROLES, Sample, ToolCall
from mmbridge.errors import ConfigError, MMBridgeError
from mmbridge.registry import Registry
from mmbridge.registry.assets import cache_root
from mmbridge.tool_runtime import (
    execute,
    format_call,
    format_result,
    media_ref,
    spec_of,
    system_prompt,
)

log = logging.getLogger(__name__)


def tool_plan(sample: Sample) -> list[dict[str, Any]]:
    """The calls that answer ``sample``: ``meta.tool_calls``, else one call of ``meta.tool``
    with its media arguments naming the sample's media; ``[]`` when no tool is needed."""
    plan = sample.meta.get("tool_calls")
    if plan:
        return [dict(c) for c in plan]
    name = sample.meta.get("tool")
    if not name:
        return []
    return [{"name": str(name), "arguments": None}]  # arguments: filled from the tool's media_args


class ToolUseRecipe(DataRecipe):
    """QA samples -> tool-calling conversations (tagged format), plus direct answers.

    Args:
        tools: The tools listed in the system prompt, in this order (give the ``llm`` caller the
            same tools in the same order); every tool a sample plans must be among them.
        no_tool_ratio: Share of samples without a tool call among the output (tool samples are
            all kept; no-tool samples are subsampled to this share, or all kept if fewer).
        run_tools: Run the tools at annotate time (``False``: use the plans' ground truth).
        tool_args: Constructor arguments per tool name, e.g. ``{ocr: {backend: tesseract}}``.
        system_prompt: Start each conversation with the tool list (as the ``llm`` caller does).
        result_role: Role of the result turns: ``tool`` or ``human`` (chat templates without a
            tool role).
        cache: Keep tool results on disk across runs (``paths.cache_dir/tool_results`` in a
            run, ``$MMBRIDGE_CACHE/tool_results`` outside one).
        seed: Seeds which no-tool samples are kept.

    The tool names are looked up in the run's registry in :meth:`setup` (an unknown name is a
    :class:`ConfigError` there), which must run before :meth:`annotate` and ``__call__``.
    """

    def __init__(
        self,
        tools: list[str] | None = None,
        no_tool_ratio: float = 0.2,
        run_tools: bool = True,
        tool_args: dict[str, dict[str, Any]] | None = None,
        system_prompt: bool = True,
        result_role: str = "tool",
        cache: bool = True,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= no_tool_ratio <= 1.0:
            raise ConfigError(f"recipe.no_tool_ratio: {no_tool_ratio} must be in [0, 1]")
        if result_role not in ("tool", "human"):
            raise ConfigError(
                f"recipe.result_role: unknown role '{result_role}'; valid: tool, human"
            )
        self.tool_names = list(tools if tools is not None else ["ocr", "calculator"])
        self.registry: Registry | None = None
        self._classes: dict[str, type[Tool]] | None = None
        self.tool_args = {k: dict(v) for k, v in (tool_args or {}).items()}
        unknown = sorted(set(self.tool_args) - set(self.tool_names))
        if unknown:
            raise ConfigError(
                f"recipe.tool_args: {', '.join(unknown)} not in recipe.tools "
                f"({', '.join(self.tool_names)})"
            )
        self.no_tool_ratio = no_tool_ratio
        self.run_tools = run_tools
        self.system = system_prompt
        self.result_role = result_role
        self._cache = ResultCache(cache_root() / "tool_results") if cache else None
        self.seed = seed
        self._tools: dict[str, Tool | None] = {}

    def setup(self, context: RecipeContext) -> None:
        """Find the tools in the run's registry (built from it when they run) and cache their
        results under the run's cache dir (``paths.cache_dir/tool_results``).

        Raises:
            ConfigError: a name in ``recipe.tools`` that is not a registered tool.
        """
        self.registry = context.registry
        try:
            self._classes = {n: self.registry.get("tool", n).cls for n in self.tool_names}
        except KeyError as exc:
            raise ConfigError(f"recipe.tools: {exc}") from None
        if self._cache is not None:
            self._cache = ResultCache(Path(context.cache_dir) / "tool_results")

    @property
    def classes(self) -> dict[str, type[Tool]]:
        """Tool name -> its registered class (known after :meth:`setup`)."""
        if self._classes is None:
            raise ConfigError(
                "tool_use recipe: call setup(context) before using it; it finds "
                "recipe.tools in the run's registry"
            )
        return self._classes

    @property
    def prompt(self) -> str:
        """The system prompt: the same text the ``llm`` caller builds for these tools."""
        return system_prompt([spec_of(c, name=n) for n, c in self.classes.items()])

    # -- annotate: run the tools once, balance tool / no-tool samples ---------------------------
    def annotate(self, samples: Sequence[Sample]) -> list[Sample]:
        plans = {s.id: self._checked_plan(s) for s in samples}
        with_tool = [s for s in samples if plans[s.id]]
        without = [s for s in samples if not plans[s.id]]
        r = self.no_tool_ratio
        n_keep = (
            len(without)
            if r >= 1.0 or not with_tool
            else min(len(without), round(r * len(with_tool) / (1.0 - r)))
        )
        keep = {s.id for s in random.Random(f"tool_use:{self.seed}").sample(without, n_keep)}
        out = []
        for s in samples:
            if plans[s.id]:
                annotated = self._annotate_one(s, plans[s.id])
                if annotated is not None:
                    out.append(annotated)
            elif s.id in keep:
                out.append(s)
        log.info(
            "tool_use: %d samples with tool calls, %d of %d without",
            len(with_tool),
            n_keep,
            len(without),
        )
        return out

    def _checked_plan(self, sample: Sample) -> list[dict[str, Any]]:
        plan = tool_plan(sample)
        for call in plan:
            name = call.get("name")
            if name not in self.classes:
                raise ConfigError(
                    f"sample {sample.id} plans a call of tool '{name}', which is not in "
                    f"recipe.tools ({', '.join(self.tool_names)}); add it there"
                )
            if call.get("arguments") is None:
                cls = self.classes[name]
                call["arguments"] = {a: media_ref(m) for a, m in cls.media_args.items()}
        return plan

    def _tool(self, name: str) -> Tool | None:
        if name not in self._tools:
            from mmbridge.config.build import build

            registry = self.registry
            if registry is None:  # the caller skipped setup: say so, as `classes` does
                raise ConfigError("tool_use recipe: call setup(context) before running its tools")
            try:
                self._tools[name] = build(
                    registry,
                    "tool",
                    {"name": name, **self.tool_args.get(name, {})},
                    f"recipe.tool_args.{name}",
                )
            except (MMBridgeError, ImportError) as exc:
                log.warning(
                    "tool_use: tool '%s' is unavailable (%s); its results are the data "
                    "set's ground truth",
                    name,
                    exc,
                )
                self._tools[name] = None
        return self._tools[name]

    def _annotate_one(self, sample: Sample, plan: list[dict[str, Any]]) -> Sample | None:
        results = []
        for call in plan:
            result, source = None, "ground_truth"
            tool = self._tool(call["name"]) if self.run_tools else None
            if tool is not None:
                done = self._run(tool, call["arguments"], sample)
                if done.ok:
                    result, source = done.result, "tool"
                else:
                    log.warning("tool_use: sample %s: %s", sample.id, done.result)
            if result is None:
                result = call.get("truth")
            if result is None:  # neither a tool output nor a ground truth: nothing to teach
                log.warning(
                    "tool_use: sample %s dropped: no result for its '%s' call",
                    sample.id,
                    call["name"],
                )
                return None
            results.append(
                {
                    "name": call["name"],
                    "arguments": call["arguments"],
                    "result": str(result),
                    "source": source,
                }
            )
        return sample.replace(meta={**sample.meta, "tool_results": results})

    def _run(self, tool: Tool, arguments: dict[str, Any], sample: Sample) -> ToolCall:
        media = sample.single_media()  # a tool reads one file per modality
        if self._cache is None:
            return execute({tool.name: tool}, tool.name, arguments, media)
        key = _cache_key(tool, arguments, media)
        hit = self._cache.get(tool.name, key)
        if hit is not None:
            return ToolCall(tool.name, arguments, hit, ok=True)
        done = execute({tool.name: tool}, tool.name, arguments, media)
        if done.ok:
            self._cache.put(tool.name, key, done.result)
        return done

    # -- per sample: the conversation ----------------------------------------------------------
    def __call__(self, sample: Sample, rng: random.Random) -> Sample | None:
        if "tool_results" not in sample.meta and tool_plan(sample):
            annotated = self._annotate_one(sample, self._checked_plan(sample))
            if annotated is None:
                return None
            sample = annotated
        turns = [dict(t) for t in sample.conversations]
        results = sample.meta.get("tool_results") or []
        first_user = next((i for i, t in enumerate(turns) if ROLES.get(t["from"]) == "user"), None)
        if results and first_user is not None:
            inserted = []
            for r in results:
                inserted += [
                    {"from": "gpt", "value": format_call(r["name"], r["arguments"])},
                    {"from": self.result_role, "value": format_result(r["name"], r["result"])},
                ]
            turns[first_user + 1 : first_user + 1] = inserted
        if self.system and not any(ROLES.get(t["from"]) == "system" for t in turns):
            turns.insert(0, {"from": "system", "value": self.prompt})
        return sample.replace(conversations=turns)


class ResultCache:
    """Tool results on disk, one JSON-lines file per tool, appended under a file lock."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._entries: dict[str, dict[str, str]] = {}

    def _load(self, tool: str) -> dict[str, str]:
        if tool not in self._entries:
            entries: dict[str, str] = {}
            path = self.root / f"{tool}.jsonl"
            if path.is_file():
                for line in path.read_text(encoding="utf-8").splitlines():
                    try:
                        record = json.loads(line)
                        entries[record["key"]] = record["result"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line cut by a crash: that result is simply recomputed
            self._entries[tool] = entries
        return self._entries[tool]

    def get(self, tool: str, key: str) -> str | None:
        return self._load(tool).get(key)

    def put(self, tool: str, key: str, result: str) -> None:
        self._load(tool)[key] = result
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{tool}.jsonl"
        with FileLock(str(path) + ".lock"), path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "result": result}) + "\n")


def _cache_key(tool: Tool, arguments: dict[str, Any], media: dict[str, str]) -> str:
    """Digest of the tool's settings, the arguments and the content of the media they name."""
    h = hashlib.sha256()
    # The instance's plain settings include what "auto" options resolved to (the OCR backend).
    settings = {
        k: v
        for k, v in sorted(vars(tool).items())
        if not k.startswith("_")
        and k != "timeout_s"
        and isinstance(v, str | int | float | bool | type(None))
    }
    h.update(
        json.dumps(
            {"tool": tool.name, "settings": settings, "arguments": arguments}, sort_keys=True
        ).encode()
    )
    for modality in sorted(set(tool.media_args.values())):
        if modality in media and Path(media[modality]).is_file():
            h.update(Path(media[modality]).read_bytes())
    return h.hexdigest()[:32]


COMPONENTS = {"recipe": {"tool_use": ToolUseRecipe}}
