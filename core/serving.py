"""An OpenAI-compatible HTTP server for a trained model (``mmbridge serve``), on FastAPI.

Routes: ``POST /v1/chat/completions`` (OpenAI's request and response shapes, ``stream: true`` as
server-sent events of ``chat.completion.chunk`` objects), ``GET /v1/models``, ``GET /health``.
Requests are answered one at a time (a lock around the model: queued, never interleaved); each
answer is the one :meth:`mmbridge.api.Model.chat` gives for the same messages (greedy unless a
``temperature`` above 0 is asked for). Errors are OpenAI's JSON (``{"error": {"message", "type",
"param", "code"}}``): 400 for a malformed request, an unknown model or a media kind the model
lacks, 401 for a wrong key, 413 for an image over ``MMBRIDGE_MAX_IMAGE_PIXELS``; never a
traceback. Media come inline (``data:`` URLs, base64 audio); local paths only with
``allow_local_files``; no URL is ever fetched.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmbridge.api import Model
from mmbridge.data.inputs import MediaFiles, MediaTooLarge
from mmbridge.errors import MMBridgeError

log = logging.getLogger(__name__)


class RequestError(MMBridgeError):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind


def error_body(
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class _Job:
    """A greedy request waiting for the batching worker."""

    conv: list[dict[str, str]]
    media: dict[str, Any]
    limit: int
    done: threading.Event = field(default_factory=threading.Event)
    result: tuple[list[int], int] | None = None
    error: BaseException | None = None


class _Streamer:
    """Hugging Face's streamer protocol (``put`` / ``end``): new token ids of row 0 -> a queue."""

    def __init__(self) -> None:
        self.queue: queue.Queue[list[int] | None] = queue.Queue()
        self._prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self._prompt:  # the first call carries the prompt ids (none: generation from embeds)
            self._prompt = False
            return
        self.queue.put([int(t) for t in value.reshape(-1).tolist()])

    def end(self) -> None:
        self.queue.put(None)


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def _held(text: str, stops: list[str]) -> int:
    """How many trailing characters might begin a stop string (held back while streaming)."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


class Server:
    """The model behind the routes: request parsing, the lock, generation and accounting.

    Args:
        model: The loaded model (:func:`mmbridge.load`).
        model_id: The name clients give as ``model`` (``/v1/models`` lists it).
        allow_local_files: Accept local file paths in ``image_url`` (default: data: URLs only).
        max_tokens: ``max_tokens`` when a request gives none.
        batch_size: Up to this many greedy, non-streamed requests waiting together are answered
            in one left-padded batch (1: one at a time). A batch's answers are those of
            single requests up to floating-point differences of the padded shapes.
    """

    def __init__(
        self,
        model: Model,
        model_id: str,
        allow_local_files: bool = False,
        max_tokens: int = 48,
        batch_size: int = 1,
    ) -> None:
        self.model, self.model_id = model, model_id
        self.allow_local_files, self.max_tokens = allow_local_files, max_tokens
        self.lock = threading.Lock()
        self.created = int(time.time())
        self.batch_size = batch_size
        #: batches run by the batching worker and the largest (``GET /health`` reports them)
        self.stats = {"batches": 0, "largest_batch": 0}
        self.jobs: queue.Queue[_Job] = queue.Queue()
        if batch_size > 1:
            threading.Thread(target=self._batches, name="mmbridge-batches", daemon=True).start()

    # -- request -> batch ----------------------------------------------------------------------
    def options(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Generation options of a request (checked: each error names its parameter)."""
        n = body.get("n", 1)
        if n != 1:
            raise RequestError(f"n={n}: only n=1 is supported", param="n")
        limit = body.get("max_completion_tokens", body.get("max_tokens", self.max_tokens))
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise RequestError(f"max_tokens={limit!r}: must be an integer >= 1", param="max_tokens")
        temperature = body.get("temperature")
        top_p = body.get("top_p")
        for name, value, hi in (("temperature", temperature, 2.0), ("top_p", top_p, 1.0)):
            if value is not None and (not isinstance(value, int | float) or not 0 <= value <= hi):
                raise RequestError(f"{name}={value!r}: must be a number in [0, {hi:g}]", param=name)
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise RequestError(f"seed={seed!r}: must be an integer", param="seed")
        stop = body.get("stop") or []
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise RequestError(
                "stop: must be a string or a list of non-empty strings", param="stop"
            )
        kwargs: dict[str, Any] = {}
        if temperature:  # None or 0: greedy, as `mmbridge generate`
            kwargs = {"do_sample": True, "temperature": float(temperature)}
            if top_p is not None:
                kwargs["top_p"] = float(top_p)
        return {"max_new_tokens": limit, "kwargs": kwargs, "seed": seed, "stop": stops}

    def conversation(self, body: Mapping[str, Any], files: MediaFiles) -> tuple[list, dict]:
        """The request's messages -> one LLaVA-style conversation and its media files."""
        if body.get("model") != self.model_id:
            raise RequestError(
                f"model '{body.get('model')}' is not served here; this server "
                f"serves '{self.model_id}' (GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, Mapping) for m in messages)
        ):
            raise RequestError(
                "messages: a non-empty list of {role, content} objects", param="messages"
            )
        turns = [
            {"role": m.get("role"), "content": "" if m.get("content") is None else m.get("content")}
            for m in messages
        ]
        convs, media = self.model.conversations([turns], {}, files)
        return convs[0], media[0]

    def encode(self, body: Mapping[str, Any], files: MediaFiles) -> dict[str, Any]:
        """The request's messages -> a generation batch (media written into ``files``)."""
        conv, media = self.conversation(body, files)
        return self.model.encode([conv], [media])

    def _batches(self) -> None:
        """The batching worker: the waiting greedy requests (up to ``batch_size``) in one batch,
        generated to the longest ``max_tokens`` among them, each answer cut to its own."""
        while True:
            jobs = [self.jobs.get()]
            while len(jobs) < self.batch_size:
                try:
                    jobs.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            try:
                with self.lock:
                    batch = self.model.encode([j.conv for j in jobs], [j.media for j in jobs])
                    new = self.model.session.model.generate(
                        batch, max_new_tokens=max(j.limit for j in jobs)
                    )
                self.stats["batches"] += 1
                self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
                for k, job in enumerate(jobs):
                    job.result = (
                        self._trim(new[k].tolist()[: job.limit]),
                        int(batch["attention_mask"][k].sum()),
                    )
            except Exception as exc:  # each request then fails with the error, never the worker
                for job in jobs:
                    job.error = exc
            finally:
                for job in jobs:
                    job.done.set()

    # -- generation ----------------------------------------------------------------------------
    def _run(self, batch: dict[str, Any], opts: dict[str, Any], streamer: Any = None) -> list[int]:
        if opts["seed"] is not None:
            torch.manual_seed(opts["seed"])
        kwargs = dict(opts["kwargs"], **({"streamer": streamer} if streamer else {}))
        new = self.model.session.model.generate(
            batch, max_new_tokens=opts["max_new_tokens"], **kwargs
        )
        return self._trim(new[0].tolist())

    def _trim(self, ids: list[int]) -> list[int]:
        """The generated ids up to and including the first end-of-sequence token."""
        eos = self.model.tokenizer.eos_token_id
        ends = set(eos if isinstance(eos, list) else [eos])
        for k, t in enumerate(ids):
            if t in ends:
                return ids[: k + 1]
        return ids

    def _text(self, ids: list[int]) -> str:
        return str(self.model.tokenizer.decode(ids, skip_special_tokens=True))

    def _usage(self, prompt: int, ids: list[int]) -> dict[str, int]:
        return {
            "prompt_tokens": prompt,
            "completion_tokens": len(ids),
            "total_tokens": prompt + len(ids),
        }

    def _finish(self, ids: list[int], limit: int, stopped: bool) -> str:
        return (
            "stop"
            if stopped or len(ids) < limit or (ids and ids[-1] == self.model.tokenizer.eos_token_id)
            else "length"
        )

    def complete(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """A ``chat.completion`` object."""
        opts = self.options(body)
        with MediaFiles(self.allow_local_files) as files:
            if self.batch_size > 1 and not opts["kwargs"] and opts["seed"] is None:
                conv, media = self.conversation(body, files)
                job = _Job(conv, media, opts["max_new_tokens"])
                self.jobs.put(job)
                job.done.wait()
                if job.error is not None:
                    raise job.error
                ids, prompt = cast(tuple[list[int], int], job.result)
            else:
                with self.lock:
                    batch = self.encode(body, files)
                    ids = self._run(batch, opts)
                prompt = int(batch["attention_mask"][0].sum())
        text, stopped = _cut(self._text(ids).strip(), opts["stop"])
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": self._finish(ids, opts["max_new_tokens"], stopped),
                    "logprobs": None,
                }
            ],
            "usage": self._usage(prompt, ids),
        }

    def stream(self, body: Mapping[str, Any]) -> Iterator[str]:
        """Server-sent events: ``chat.completion.chunk`` objects, then ``data: [DONE]``. The
        request is checked (and its media decoded) before the first event, so that errors are
        still plain HTTP errors."""
        opts = self.options(body)
        files = MediaFiles(self.allow_local_files)
        try:
            with self.lock:
                batch = self.encode(body, files)
        except BaseException:
            files.close()
            raise
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            obj = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_id,
                "choices": [
                    {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                ],
                **extra,
            }
            return f"data: {json.dumps(obj)}\n\n"

        def events() -> Iterator[str]:
            streamer, result, failed = _Streamer(), [], []

            def work() -> None:
                try:
                    with self.lock:
                        result.extend(self._run(batch, opts, streamer))
                except Exception as exc:  # reported in the stream, never a traceback
                    log.exception("generation failed")
                    failed.append(f"{type(exc).__name__}: {exc}")
                    streamer.end()
                finally:
                    files.close()

            threading.Thread(target=work, daemon=True).start()
            yield chunk({"role": "assistant", "content": ""})
            ids: list[int] = []
            sent, stopped = "", False
            while (new := streamer.queue.get()) is not None:
                ids.extend(new)
                if stopped:
                    continue
                text, stopped = _cut(self._text(self._trim(ids)).lstrip(), opts["stop"])
                visible = text if stopped else text.rstrip()
                visible = visible[: len(visible) - _held(visible, opts["stop"])]
                if visible.endswith("\ufffd") and not stopped:  # half a UTF-8 character
                    continue
                if visible.startswith(sent) and len(visible) > len(sent):
                    yield chunk({"content": visible[len(sent) :]})
                    sent = visible
            if failed:
                err = error_body("generation failed: " + failed[0], "server_error")
                yield f"data: {json.dumps(err)}\n\n"
                return
            final, stopped = _cut(self._text(result).strip(), opts["stop"])
            if final.startswith(sent) and len(final) > len(sent):
                yield chunk({"content": final[len(sent) :]})
            yield chunk({}, self._finish(result, opts["max_new_tokens"], stopped))
            if include_usage:
                obj = {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": self.model_id,
                    "choices": [],
                    "usage": self._usage(int(batch["attention_mask"][0].sum()), result),
                }
                yield f"data: {json.dumps(obj)}\n\n"
            yield "data: [DONE]\n\n"

        return events()


def build_app(server: Server, api_key: str | None = None) -> FastAPI:
    """The FastAPI application of ``server`` (``api_key``: required as
    ``Authorization: Bearer``)."""
    app = FastAPI(title="mmbridge", docs_url=None, redoc_url=None, openapi_url=None)

    def check_key(request: Request) -> None:
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise RequestError(
                "invalid or missing API key (Authorization: Bearer ...)",
                401,
                code="invalid_api_key",
                kind="authentication_error",
            )

    @app.exception_handler(RequestError)
    async def refused(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), exc.kind, exc.param, exc.code), exc.status)

    @app.exception_handler(MMBridgeError)
    async def bad_input(_: Request, exc: MMBridgeError) -> JSONResponse:
        status = 413 if isinstance(exc, MediaTooLarge) else 400
        return JSONResponse(
            error_body(str(exc), code="media_too_large" if status == 413 else None), status
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail)), exc.status_code)

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(
            error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), 500
        )

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": server.model_id,
            "batch_size": server.batch_size,
            **server.stats,
        }

    @app.get("/v1/models")
    def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": server.model_id,
                    "object": "model",
                    "created": server.created,
                    "owned_by": "mmbridge",
                }
            ],
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> JSONResponse | StreamingResponse:
        check_key(request)
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(f"the request body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        if body.get("stream"):
            events = await run_in_threadpool(server.stream, body)
            return StreamingResponse(events, media_type="text/event-stream")
        return JSONResponse(await run_in_threadpool(server.complete, body))

    return app
