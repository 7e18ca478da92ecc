"""The model card (``README.md``) written into every export."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmbridge import __version__
from mmbridge.config.model_spec import ModelConfig, model_nodes, node_at
from mmbridge.runtime.config import RunConfig

#: How each format is loaded, as shown in the card (``{out}`` = the export directory).
HOW_TO_LOAD = {
    "bundle": """```python
import mmbridge

model = mmbridge.load("{out}", device="cpu")
print(model.generate("What colour is the shape?", image="photo.png"))
```
or `mmbridge generate checkpoint={out} image=photo.png prompt="..."` is not used for bundles:
load them with the Python API. Needs mmbridge and the plugin packages listed above, not
the original asset cache or data.""",
    "peft": """```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("<the base LLM: see mmbridge.json, base_model>")
llm = PeftModel.from_pretrained(base, "{out}")
```
The connector (and prefix) weights are in `connector.safetensors`; `mmbridge.json` says which
module each tensor belongs to.""",
    "hf": """```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{out}")
# backend="pil": resized with PIL as in training (torchvision's resize differs slightly)
processor = AutoProcessor.from_pretrained("{out}", backend="pil")
# the chat template mmbridge trained with: <image> and a newline first in the user turn
messages = [{{"role": "user", "content": "<image>\\nWhat colour is the shape?"}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
inputs = processor(images=Image.open("photo.png"), text=prompt, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```""",
}


def _component_rows(model: ModelConfig, origins: dict[str, dict[str, str]]) -> list[str]:
    rows = ["| config key | component | settings | plugin (package version) |", "|---|---|---|---|"]
    # the model config's shape: mmbridge.config.model_spec
    for key in [n.key for n in model_nodes(model)]:
        node = node_at(model, key)
        if not isinstance(node, Mapping) or node.get("name") is None:
            continue
        settings = ", ".join(f"{k}={v}" for k, v in node.items() if k != "name" and v is not None)
        o = origins.get(key, {})
        source = f"{o.get('plugin', '?')} ({o.get('package', '?')} {o.get('version', '')})".strip()
        rows.append(f"| {key} | {node['name']} | {settings.replace('|', '/')} | {source} |")
    return rows


def _schedule_rows(run: RunConfig, metrics: dict[str, Any] | None) -> list[str]:
    rows = ["| stage | trains | steps | batch | lr |", "|---|---|---|---|---|"]
    for name in run.schedule:
        st = run.stages[name]
        trains = ", ".join(f"{k}: {v}" for k, v in dataclasses.asdict(st.train).items())
        steps = (metrics or {}).get("stages", {}).get(name, {}).get("steps", f"<= {st.max_steps}")
        rows.append(f"| {name} | {trains} | {steps} | {st.batch_size} | {st.optimizer.lr} |")
    return rows


def _metric_rows(metrics: dict[str, Any] | None) -> list[str]:
    test = (metrics or {}).get("test") or {}
    if not test:
        return ["No held-out metrics were found next to the checkpoint (no run `metrics.json`)."]
    rows = ["| metric | model | without the media | majority answer |", "|---|---|---|---|"]
    for key, value in sorted(test.items()):
        if "/" in key or not isinstance(value, int | float) or key == "n":
            continue
        base, chance = test.get(f"no_media/{key}"), test.get(f"chance/{key}")
        fmt = lambda v: f"{v:.3f}" if isinstance(v, int | float) else "-"  # noqa: E731
        rows.append(f"| {key} | {fmt(value)} | {fmt(base)} | {fmt(chance)} |")
    rows.append(f"\n{test.get('n', '?')} held-out questions (split `{test.get('split', 'test')}`).")
    return rows


def model_card(
    run: RunConfig,
    origins: dict[str, dict[str, str]],
    fmt: str,
    out: Path,
    run_dir: Path | None,
    extra: list[str] | None = None,
) -> str:
    """The card's Markdown: components and their sources, data and schedule, the run's held-out
    metrics beside its baselines, and how to load the export."""
    metrics = None
    if run_dir is not None and (run_dir / "metrics.json").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text())
    data = run.data or {}
    settings = ", ".join(
        f"{k}={v}" for k, v in data.items() if k != "name" and not isinstance(v, dict | list)
    )
    lines = [
        f"# {run.root.run_name} ({fmt} export)",
        "",
        f"Exported by mmbridge {__version__} (`mmbridge export format={fmt}`)"
        + (f" from the run `{run_dir.name}`." if run_dir else "."),
        "",
        "## Components",
        "",
        *_component_rows(run.model, origins),
        "",
        "## Data and schedule",
        "",
        f"Data: `{data.get('name', '?')}` ({settings}); seed {run.seed}.",
        "",
        *_schedule_rows(run, metrics),
        "",
        "## Held-out results",
        "",
        *_metric_rows(metrics),
        "",
        *(extra or []),
        "## How to load",
        "",
        HOW_TO_LOAD[fmt].format(out=out),
        "",
    ]
    return "\n".join(lines)
