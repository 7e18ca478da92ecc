"""``mmbridge serve checkpoint=PATH [host=127.0.0.1 port=8000 api_key=...
allow_local_files=false]``."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
from pathlib import Path

import mmbridge
from mmbridge.commands.evaluate import parse_kv
from mmbridge.errors import ConfigError

USAGE = """usage: mmbridge serve checkpoint=PATH [host=127.0.0.1] [port=8000] [api_key=KEY]
                      [allow_local_files=false] [name=ID] [max_tokens=48] [batch_size=1]
                      [device=DEV]

Serve a trained checkpoint (a run's checkpoints/final, or a `mmbridge export format=bundle`
directory) behind the OpenAI API: POST /v1/chat/completions (content parts with data: URL
images / base64 audio, max_tokens, temperature, top_p, stop, seed, stream), GET /v1/models,
GET /health. Requests are answered one at a time, or (batch_size > 1) the greedy non-streamed
ones waiting together in one batch. Greedy unless a request asks temperature > 0.

  host               listen address (default 127.0.0.1: this machine only)
  port               TCP port (default 8000)
  api_key            require `Authorization: Bearer KEY` (default: $MMBRIDGE_API_KEY, else none)
  allow_local_files  accept local file paths as image URLs (default false: data: URLs only);
                     http(s) URLs are never fetched
  name               the model id clients send (default: the run's name)
  max_tokens         answer length when a request gives none (default 48)
  batch_size         answer up to N waiting greedy, non-streamed requests in one batch
                     (default 1: one at a time, each answer exactly `mmbridge generate`'s)
  device             cpu, cuda, cuda:N (default: the trainer's accelerator)

Images over MMBRIDGE_MAX_IMAGE_PIXELS are refused with 413. Needs the `serve` extra
(pip install 'mmbridge[serve]'). Stops cleanly on SIGTERM / Ctrl-C.
"""
OWN = (
    "checkpoint",
    "host",
    "port",
    "api_key",
    "allow_local_files",
    "name",
    "max_tokens",
    "batch_size",
    "device",
)


def _flag(value: str, key: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ConfigError(f"{key}={value}: must be true or false")


def main(argv: list[str]) -> int:
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0 if argv else 2
    own, overrides = parse_kv(argv, USAGE, OWN, counts=("port", "max_tokens", "batch_size"))
    if "checkpoint" not in own:
        raise ConfigError("checkpoint=PATH is required\n" + USAGE)
    try:
        import uvicorn

        from mmbridge.serving import Server, build_app
    except ImportError as exc:
        raise ConfigError(
            f"mmbridge serve needs FastAPI and uvicorn ({exc.name} is missing): "
            f"pip install 'mmbridge[serve]'"
        ) from None
    local = _flag(own.get("allow_local_files", "false"), "allow_local_files")
    model = mmbridge.load(own["checkpoint"], device=own.get("device"), overrides=overrides)
    name = own.get("name") or str(model.session.cfg.get("run_name") or Path(own["checkpoint"]).name)
    server = Server(
        model,
        name,
        allow_local_files=local,
        max_tokens=int(own.get("max_tokens", 48)),
        batch_size=int(own.get("batch_size", 1)),
    )
    api_key = own.get("api_key") or os.environ.get("MMBRIDGE_API_KEY") or None
    host, port = own.get("host", "127.0.0.1"), int(own.get("port", 8000))
    logging.getLogger(__name__).info(
        "serving '%s' on http://%s:%d/v1 (%s)",
        name,
        host,
        port,
        "API key required" if api_key else "no API key",
    )
    # uvicorn handles SIGINT / SIGTERM (stops accepting, finishes open requests), then re-raises
    # the signal to the handlers it found: these make that a clean exit (status 0)
    stopped: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stopped.append(signum))
    uvicorn.run(
        build_app(server, api_key), host=host, port=port, log_level="warning", access_log=False
    )
    print(f"mmbridge serve: stopped{f' (signal {stopped[0]})' if stopped else ''}", file=sys.stderr)
    # the interpreter's last garbage collection walks every object torch and transformers made
    # (measured: 5.7 s of a busy 2-core machine's time, 0.9 s frozen); nothing is left to free
    gc.freeze()
    return 0
