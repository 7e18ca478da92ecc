"""``mmbridge demo``: its arguments, the message without Gradio, the page it builds and the
answers it gives (the first turn as ``mmbridge generate``, later turns with the conversation).
The page in a real browser: tests/e2e/test_browser.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from picture_runs import qformer_run, shared_dir

from mmbridge.commands import demo
from mmbridge.errors import ConfigError

# the tiny run is trained once per session (tests/picture_runs.py); xdist keeps these together
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.xdist_group("pictures")]


@pytest.fixture(scope="module")
def picture_run(tmp_path_factory) -> Path:
    """The session's tiny Q-Former run (tests/picture_runs.py), trained once."""
    return qformer_run(shared_dir(tmp_path_factory))


def test_arguments():
    got = demo.parse(["checkpoint=a", "checkpoint=b", "port=7000"])
    assert got == (["a", "b"], {"port": "7000"})
    for bad, match in (
        (["port=1"], "one or two checkpoint"),
        (["checkpoint=a", "checkpoint=b", "checkpoint=c"], "got 3"),
        (["checkpoint=a", "colour=red"], "'colour=red'"),
        (["checkpoint=a", "port=80x"], "port=80x: expected a whole number"),
    ):
        with pytest.raises(ConfigError, match=match):
            demo.parse(bad)
    two = ["/r/run1/checkpoints/final", "/r/run2/checkpoints/final"]
    assert demo.names(two) == ["run1", "run2"]
    assert demo.names(["/a/x", "/b/x"]) == ["/a/x", "/b/x"]  # alike: the whole paths


def test_without_gradio_one_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'mmbridge\[demo\]'"):
        demo.main(["checkpoint=somewhere"])
    assert demo.main(["--help"]) == 0 and "checkpoint=PATH2" in capsys.readouterr().out


@pytest.mark.slow  # the shared tiny training (about 35-60 s on 2 busy cores)
def test_first_turn_is_generate_and_later_turns_see_the_conversation(picture_run):
    import mmbridge

    run = picture_run
    model = mmbridge.load(run / "checkpoints" / "final", device="cpu")
    image = json.loads((run / "predictions.jsonl").read_text().splitlines()[0])["media"]["image"]
    q = "What colour is the shape?"
    first = demo.answer(model, [], q, {"image": image, "audio": None}, 4)
    assert first == model.generate(q, image=image, max_new_tokens=4) and first
    history = [{"role": "user", "content": q}, {"role": "assistant", "content": first}]
    second = demo.answer(model, history, "And its shape?", {"image": image}, 4)
    turns = [*history, {"role": "user", "content": "And its shape?"}]
    assert second == model.chat(turns, image=image, max_new_tokens=4)


@pytest.mark.slow  # the shared tiny training (about 35-60 s on 2 busy cores)
def test_page_has_a_column_per_checkpoint(picture_run):
    gr = pytest.importorskip("gradio")
    import mmbridge

    model = mmbridge.load(picture_run / "checkpoints" / "final", device="cpu")
    page = demo.build({"A": model, "B": model}, max_new_tokens=4)
    chats = [b for b in page.blocks.values() if isinstance(b, gr.Chatbot)]
    assert [c.label for c in chats] == ["A", "B"]
    visible = {
        b.elem_id: b.visible for b in page.blocks.values() if isinstance(b, (gr.Image, gr.Audio))
    }
    assert visible == {"image": True, "audio": False}  # this model has no audio encoder


@pytest.mark.slow  # the shared tiny training (about 35-60 s on 2 busy cores)
def test_main_serves_on_this_machine_by_default(picture_run, monkeypatch):
    pytest.importorskip("gradio")
    import gradio as gr

    served = {}
    monkeypatch.setattr(
        demo, "launch", lambda page, host, port: served.update(page=page, host=host, port=port)
    )
    ckpt = str(picture_run / "checkpoints" / "final")
    assert demo.main([f"checkpoint={ckpt}", "port=7999", "max_new_tokens=3"]) == 0
    assert (served["host"], served["port"]) == ("127.0.0.1", 7999)
    chats = [b for b in served["page"].blocks.values() if isinstance(b, gr.Chatbot)]
    assert [c.label for c in chats] == [picture_run.name]  # the run directory's name
