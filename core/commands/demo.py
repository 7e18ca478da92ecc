"""``mmbridge demo checkpoint=A [checkpoint=B]``: a web page to chat about an image or a sound."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmbridge.api import load
from mmbridge.errors import ConfigError

USAGE = """usage: mmbridge demo checkpoint=PATH [checkpoint=PATH2] [host=127.0.0.1] [port=7860]
                     [device=DEV] [max_new_tokens=N]

Serve a page (Gradio, the `demo` extra: pip install 'mmbridge[demo]') where you upload an image
(or audio, when the model has an audio encoder), ask questions and read the answers; the first
question of a conversation is answered exactly as `mmbridge generate` answers it (greedy), later
ones see the conversation so far. Two checkpoints answer side by side (an ablation at a glance).
The page loads nothing from the internet; host=0.0.0.0 opens it to the network (default: this
machine only). Stop it with Ctrl-C.
"""
KEYS = ("checkpoint", "host", "port", "device", "max_new_tokens")


def parse(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """``key=value`` arguments -> (checkpoints, the other settings)."""
    checkpoints, own = [], {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in KEYS:
            options = ", ".join(k + "=..." for k in KEYS)
            raise ConfigError(f"'{arg}': expected one of {options}\n{USAGE}")
        if key == "checkpoint":
            checkpoints.append(value)
        else:
            own[key] = value
    if not 1 <= len(checkpoints) <= 2:
        raise ConfigError(f"give one or two checkpoint=PATH (got {len(checkpoints)})\n{USAGE}")
    for key in ("port", "max_new_tokens"):
        if key in own and not own[key].isdigit():
            raise ConfigError(f"{key}={own[key]}: expected a whole number")
    return checkpoints, own


def answer(
    model: Any,
    history: list[dict[str, str]],
    question: str,
    media: dict[str, str | None],
    max_new_tokens: int,
) -> str:
    """The model's reply to ``question`` after ``history`` (``role`` / ``content`` turns): the
    first question through ``generate`` (as ``mmbridge generate``), later ones through ``chat``."""
    given = {k: v for k, v in media.items() if v and k in model.modalities}
    if not history:
        return str(model.generate(question, max_new_tokens=max_new_tokens, **given))
    turns = [*history, {"role": "user", "content": question}]
    return str(model.chat(turns, max_new_tokens=max_new_tokens, **given))


def build(models: dict[str, Any], max_new_tokens: int = 48) -> Any:
    """The Gradio page for ``models`` (name -> :class:`mmbridge.api.Model`)."""
    import gradio as gr

    takes = {m for model in models.values() for m in model.modalities}
    with gr.Blocks(title="mmbridge demo") as page:
        gr.Markdown(
            "## mmbridge demo\nUpload an image"
            + (" or audio" if "audio" in takes else "")
            + ", ask a question; each checkpoint answers in its own column."
        )
        with gr.Row():
            image = gr.Image(
                type="filepath",
                label="image",
                elem_id="image",
                height=260,
                visible="image" in takes,
            )
            audio = gr.Audio(
                type="filepath", label="audio", elem_id="audio", visible="audio" in takes
            )
        with gr.Row():
            # raw text, as `mmbridge generate` prints it (no Markdown rendering of model output)
            chats = [
                gr.Chatbot(label=name, elem_id=f"chat{i}", height=360, render_markdown=False)
                for i, name in enumerate(models)
            ]
        question = gr.Textbox(
            label="question", elem_id="question", placeholder="What is in the image?"
        )
        with gr.Row():
            ask = gr.Button("Ask", variant="primary", elem_id="ask")
            clear = gr.Button("New conversation", elem_id="clear")

        def respond(q: str, img: str | None, aud: str | None, *histories: list[dict[str, str]]):
            if not q.strip():
                raise gr.Error("type a question first")
            out = []
            for model, hist in zip(models.values(), histories):
                hist = [{"role": t["role"], "content": _text(t["content"])} for t in hist or []]
                reply = answer(model, hist, q, {"image": img, "audio": aud}, max_new_tokens)
                out.append(
                    [*hist, {"role": "user", "content": q}, {"role": "assistant", "content": reply}]
                )
            return ("", *out)

        def reset(*_: Any) -> Any:  # one output component takes its value, several a tuple
            return [] if len(chats) == 1 else tuple([] for _ in chats)

        ask.click(respond, [question, image, audio, *chats], [question, *chats])
        question.submit(respond, [question, image, audio, *chats], [question, *chats])
        clear.click(reset, None, chats)
        image.change(reset, image, chats)  # a new image, a new conversation
    return page


def launch(page: Any, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> Any:
    """Serve ``page``; with ``block=False`` return at once (the server runs in a thread)."""
    import gradio as gr

    # system fonts: Gradio's default theme fetches Google Fonts, and the page must work offline
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])
    return page.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        ssr_mode=False,
        show_error=True,
        theme=theme,
        quiet=not block,
        prevent_thread_lock=not block,
    )


def _text(content: Any) -> str:
    """A Chatbot message's text (Gradio 5/6 may hand back a list of content parts)."""
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def names(checkpoints: Sequence[str]) -> list[str]:
    """Column titles: each checkpoint's run directory name (its path when both are alike)."""
    short = [
        Path(c).resolve().parent.parent.name if Path(c).name == "final" else Path(c).name
        for c in checkpoints
    ]
    return short if len(set(short)) == len(short) else list(checkpoints)


def main(argv: list[str]) -> int:
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0 if argv else 2
    checkpoints, own = parse(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"mmbridge demo needs Gradio ({exc}): pip install 'mmbridge[demo]'"
        ) from exc
    models = {
        name: load(c, device=own.get("device")) for name, c in zip(names(checkpoints), checkpoints)
    }
    page = build(models, int(own.get("max_new_tokens", 48)))
    launch(page, own.get("host", "127.0.0.1"), int(own.get("port", 7860)))
    return 0
