"""The Python API end to end: train the tiny smoke experiment, answer with it, export a bundle,
and answer again from the bundle (the same text).

    python examples/python_api.py            # about a minute on 2 CPU cores
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mmbridge
from mmbridge.export import export
from mmbridge.plugins.encoders._image import example_png

PROMPT = "What colour is the shape?"


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="mmbridge-api-"))
    run = mmbridge.train(["experiment=tiny", "stages.align.max_steps=10", "stages.instruct.max_steps=20",
                          "data.n_train=64", "data.n_val=8", "data.n_test=8", "evaluation.max_samples=8"],
                         run_dir=root / "run")
    print("run:", run.run_dir, "test exact match:", run.metrics.get("test", {}).get("exact_match"))
    image = example_png(root, 1)
    model = mmbridge.load(run.checkpoint, device="cpu")
    print("checkpoint:", model.generate(PROMPT, image=image, max_new_tokens=8))
    print("chat:", model.chat([{"role": "user", "content": PROMPT}], image=image, max_new_tokens=8))
    bundle = export(run.checkpoint, root / "bundle", format="bundle")
    print("bundle:", mmbridge.load(bundle, device="cpu").generate(PROMPT, image=image, max_new_tokens=8))


if __name__ == "__main__":
    main()
