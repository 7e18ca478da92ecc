"""``mmbridge generate checkpoint=PATH image=PATH prompt="..."``."""

from __future__ import annotations

import sys
from pathlib import Path

from mmbridge.commands.evaluate import parse_kv
from mmbridge.errors import ConfigError
from mmbridge.types import Sample, placeholder

HELP = "answer a prompt about media: checkpoint=PATH image=PATH prompt=\"...\""
USAGE = """usage: mmbridge generate checkpoint=PATH prompt="..." [image=PATH] [audio=PATH] [max_new_tokens=N] [device=DEV]
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
    own, overrides = parse_kv(argv, USAGE, ("checkpoint", "prompt", "image", "audio", "video", "max_new_tokens", "device",
                                              "attention"),
                              counts=("max_new_tokens",))
    if "checkpoint" not in own or "prompt" not in own:
        raise ConfigError("checkpoint=PATH and prompt=\"...\" are required\n" + USAGE)
    media: dict[str, str] = {}
    for m in ("image", "audio", "video"):
        if m in own:
            p = Path(own[m]).expanduser()
            if not p.is_file():
                raise ConfigError(f"{m}={own[m]}: no such file")
            media[m] = str(p.resolve())
    from mmbridge.export.source import open_model
    from mmbridge.plugin_manager import load_registry

    # a run's checkpoint or a format=bundle export
    session, _ = open_model(own["checkpoint"], overrides, registry=load_registry(), device=own.get("device"))
    missing = [m for m in media if m not in session.model.branches]
    if missing:
        raise ConfigError(f"{missing[0]}=...: this checkpoint's model has no {missing[0]} encoder; "
                          f"it takes: {', '.join(session.model.branches)}")
    text = "".join(placeholder(m) + "\n" for m in media) + own["prompt"]
    sample = Sample(id="prompt", media=media, conversations=[{"from": "human", "value": text}])
    batch = session.batcher(use_cache=False).batch([sample], generation=True)
    max_new = int(own.get("max_new_tokens", 48))
    if "attention" in own:
        from mmbridge.attention_maps import recording, save_attention

        if "image" not in media:
            raise ConfigError("attention=...: needs image=PATH (the map is drawn over it)")
        with recording(session.model) as connector:
            new = session.model.generate(batch, max_new_tokens=max_new)
        written = save_attention(session.model, connector, media["image"], own["attention"])
        print(f"wrote {written}", file=sys.stderr)
    else:
        new = session.model.generate(batch, max_new_tokens=max_new)
    print(session.chat.tokenizer.decode(new[0], skip_special_tokens=True).strip())
    return 0
