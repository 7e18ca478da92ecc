"""``mmbridge generate checkpoint=PATH image=PATH prompt="..."``."""

from __future__ import annotations

import sys
from pathlib import Path

from mmbridge.api import load
from mmbridge.commands.evaluate import parse_kv
from mmbridge.errors import ConfigError

USAGE = """usage: mmbridge generate checkpoint=PATH prompt="..." [image=PATH] [audio=PATH] \
[max_new_tokens=N] [device=DEV]
                         [attention=OUT.png]

Answer a prompt about the given media with a trained checkpoint (a run's checkpoints/final, or a
`mmbridge export format=bundle` directory). Each media argument is
placed before the prompt as its placeholder (<image>, <audio>). device= (cpu, cuda, cuda:N) says
where the model runs (default: the trainer's accelerator). attention=OUT.png (with image=) draws
where the connector looks in the image: each query of a Q-Former or Perceiver Resampler, or each
text token through gated cross-attention, over the image patches (a PNG sheet of heat maps).
"""


def main(argv: list[str]) -> int:
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0 if argv else 2
    own, overrides = parse_kv(
        argv,
        USAGE,
        (
            "checkpoint",
            "prompt",
            "image",
            "audio",
            "video",
            "max_new_tokens",
            "device",
            "attention",
        ),
        counts=("max_new_tokens",),
    )
    if "checkpoint" not in own or "prompt" not in own:
        raise ConfigError('checkpoint=PATH and prompt="..." are required\n' + USAGE)
    media: dict[str, str] = {}
    for m in ("image", "audio", "video"):
        if m in own:
            p = Path(own[m]).expanduser()
            if not p.is_file():
                raise ConfigError(f"{m}={own[m]}: no such file")
            media[m] = str(p.resolve())
    # a run's checkpoint or a format=bundle export; the prompt is built as the Python API builds it
    model = load(own["checkpoint"], device=own.get("device"), overrides=overrides)
    for m in media:
        if m not in model.modalities:
            raise ConfigError(
                f"{m}=...: this checkpoint's model has no {m} encoder; "
                f"it takes: {', '.join(model.modalities)}"
            )
    max_new = int(own.get("max_new_tokens", 48))
    if "attention" in own:
        from mmbridge.reporting.attention_maps import recording, save_attention

        if "image" not in media:
            raise ConfigError("attention=...: needs image=PATH (the map is drawn over it)")
        with recording(model.session.model) as connector:
            answer = model.generate(
                own["prompt"],
                image=media.get("image"),
                audio=media.get("audio"),
                video=media.get("video"),
                max_new_tokens=max_new,
            )
        written = save_attention(model.session.model, connector, media["image"], own["attention"])
        print(f"wrote {written}", file=sys.stderr)
    else:
        answer = model.generate(
            own["prompt"],
            image=media.get("image"),
            audio=media.get("audio"),
            video=media.get("video"),
            max_new_tokens=max_new,
        )
    print(answer)
    return 0
