"""``mmbridge serve`` as its users call it: a real server process on a free 127.0.0.1 port and the
official ``openai`` client. One server (a tiny checkpoint) serves every test of the module."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import make_checkpoint, mmbridge_exe, shared_registry

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import httpx  # noqa: E402  (openai's own HTTP client)
from PIL import Image  # noqa: E402

import mmbridge  # noqa: E402
from mmbridge.plugins.encoders._image import example_png  # noqa: E402

PROMPT = "What colour is the shape?"
KEY = "sk-test"
MAX_PIXELS = 100 * 100  # the server's MMBRIDGE_MAX_IMAGE_PIXELS: the examples are 48x48 / 56x48

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # a server process: ~20 s


def data_url(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def user(url: str, text: str = PROMPT) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": text},
            ],
        }
    ]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(
        tmp_path_factory.mktemp("serve") / "final", ["experiment=tiny", "encoder.image_size=32"]
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("images")
    return [example_png(root, k) for k in range(8)]


@pytest.fixture(scope="module")
def server(ckpt, images, tmp_path_factory):
    """``mmbridge serve`` in its own process, and the Python API's greedy answers for the images
    (computed while the server starts; they equal `mmbridge generate`'s, checked below).
    Yields ``(process, base_url, log path, expected answers, the in-process model)``."""
    port = free_port()
    log = tmp_path_factory.mktemp("log") / "serve.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "MMBRIDGE_MAX_IMAGE_PIXELS": str(MAX_PIXELS),
        "OMP_NUM_THREADS": "1",
    }
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                mmbridge_exe(),
                "serve",
                f"checkpoint={ckpt}",
                f"port={port}",
                f"api_key={KEY}",
                "device=cpu",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    model = mmbridge.load(ckpt, device="cpu", registry=shared_registry())
    expected = list(model.generate([PROMPT] * len(images), image=list(images), max_new_tokens=8))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mmbridge serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail(f"mmbridge serve did not answer /health in 120 s:\n{log.read_text()}")
    yield proc, base, log, expected, model
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def expected(server) -> list[str]:
    return server[3]


def test_generate_command_gives_the_expected_answer(ckpt, images, expected, capsys):
    from mmbridge.commands.generate import main

    assert (
        main(
            [
                f"checkpoint={ckpt}",
                f"image={images[0]}",
                f"prompt={PROMPT}",
                "max_new_tokens=8",
                "device=cpu",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == expected[0]
    assert len(set(expected)) > 1  # the answer depends on the image: the checks below can fail


def test_models_and_a_completion_equal_generate(client, images, expected):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.chat.completions.create(
        model="tiny", messages=user(data_url(images[0])), max_tokens=8, temperature=0
    )
    assert r.choices[0].message.content == expected[0]
    assert r.object == "chat.completion" and r.choices[0].finish_reason in ("stop", "length")
    # prompt: chat template + 16 image slots + the question; completion: at most max_tokens
    assert r.usage.prompt_tokens > 16 and 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_a_streamed_answer_equals_generate(client, images, expected):
    stream = client.chat.completions.create(
        model="tiny",
        messages=user(data_url(images[1])),
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == expected[1]
    assert sum(1 for d in deltas if d) >= 2  # token by token, not one block
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_eight_concurrent_requests_get_their_own_answers(client, images, expected):
    def ask(k: int) -> str:
        r = client.chat.completions.create(
            model="tiny", messages=user(data_url(images[k])), max_tokens=8
        )
        return r.choices[0].message.content or ""

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert answers == expected


def test_batched_requests_answer_as_single_ones(server, images, expected):
    """batch_size=8: eight waiting greedy requests answered in one left-padded batch (in this
    process, through the server's request path without HTTP)."""
    import threading

    from mmbridge.serving import Server

    batched = Server(server[4], "tiny", batch_size=1)  # no worker yet: the jobs wait in line
    batched.batch_size = 8
    bodies = [{"model": "tiny", "messages": user(data_url(p)), "max_tokens": 8} for p in images]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(batched.complete, b) for b in bodies]
        deadline = time.monotonic() + 60
        while batched.jobs.qsize() < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        threading.Thread(target=batched._batches, daemon=True).start()
        replies = [f.result(timeout=120) for f in futures]
    assert [r["choices"][0]["message"]["content"] for r in replies] == expected
    assert batched.stats == {"batches": 1, "largest_batch": 8}
    assert all(r["usage"]["completion_tokens"] <= 8 for r in replies)


def test_a_seed_repeats_a_sampled_answer(client, images):
    def sample(seed: int) -> str:
        r = client.chat.completions.create(
            model="tiny",
            messages=user(data_url(images[2])),
            max_tokens=8,
            temperature=1.5,
            top_p=0.95,
            seed=seed,
        )
        return r.choices[0].message.content or ""

    first = sample(1)
    assert sample(1) == first
    assert any(sample(s) != first for s in (2, 3, 4))  # sampling: other seeds, other answers


def test_stop_cuts_the_answer(client, images, expected):
    word = expected[0].split()[-1] if " " in expected[0] else expected[0][-2:]
    r = client.chat.completions.create(
        model="tiny", messages=user(data_url(images[0])), max_tokens=8, stop=[word]
    )
    cut = expected[0][: expected[0].find(word)]
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=user(data_url(images[0])), max_tokens=8, stop=[word], stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut  # nothing past it
    assert chunks[-1].choices[0].finish_reason == "stop"


def error_of(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as err:
        call()
    body = err.value.response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    assert "Traceback" not in body["error"]["message"]
    return err.value.status_code, body["error"]


def test_bad_requests_get_openai_errors(client, server, images, tmp_path):
    status, err = error_of(
        lambda: client.chat.completions.create(
            model="tiny",
            messages=user("data:image/png;base64," + base64.b64encode(b"not a png").decode()),
        )
    )
    assert status == 400 and "not a readable image" in err["message"]
    status, err = error_of(
        lambda: client.chat.completions.create(model="gpt-4o", messages=user(data_url(images[0])))
    )
    assert status == 400 and err["code"] == "model_not_found" and "'tiny'" in err["message"]
    big = io.BytesIO()
    Image.new("RGB", (120, 100), (200, 30, 30)).save(big, format="PNG")
    status, err = error_of(
        lambda: client.chat.completions.create(
            model="tiny",
            messages=user("data:image/png;base64," + base64.b64encode(big.getvalue()).decode()),
        )
    )
    assert status == 413 and "12000 pixels" in err["message"] and str(MAX_PIXELS) in err["message"]
    audio = [
        {
            "role": "user",
            "content": [
                {
                    "type": "input_audio",
                    "input_audio": {
                        "data": base64.b64encode(b"RIFF0000WAVE").decode(),
                        "format": "wav",
                    },
                }
            ],
        }
    ]
    status, err = error_of(lambda: client.chat.completions.create(model="tiny", messages=audio))
    assert status == 400 and "no audio encoder" in err["message"]
    status, err = error_of(
        lambda: client.chat.completions.create(  # never read from disk
            model="tiny", messages=user(images[0])
        )
    )
    assert status == 400 and "local file paths are not allowed" in err["message"]
    status, err = error_of(
        lambda: client.chat.completions.create(
            model="tiny", messages=user("https://example.com/cat.png")
        )
    )
    assert status == 400 and "never fetched" in err["message"]
    wrong = openai.OpenAI(base_url=f"{server[1]}/v1", api_key="sk-wrong", max_retries=0)
    status, err = error_of(lambda: wrong.models.list())
    assert status == 401 and err["type"] == "authentication_error"
    raw = httpx.post(
        f"{server[1]}/v1/chat/completions",
        content=b"{oops",
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert raw.status_code == 400 and "not JSON" in raw.json()["error"]["message"]


def test_sigterm_stops_the_server_cleanly(server, client):
    # last in the module: the server fixture is done after this test
    proc, base, log, *_ = server
    client.close()  # its idle keep-alive connections would hold uvicorn's shutdown a few seconds
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log.read_text()
    port = int(base.rsplit(":", 1)[1])
    with pytest.raises(httpx.ConnectError):  # nothing listens any more
        httpx.get(f"{base}/health", timeout=2)
    with socket.socket() as s:  # and a new server may take the port (as uvicorn binds it)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
    assert "Traceback" not in log.read_text() and "stopped (signal 15)" in log.read_text()
