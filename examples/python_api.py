"""The Python API end to end: train the tiny smoke experiment, answer with it, export a bundle,
and answer again from the bundle (the same text).

    python examples/python_api.py                   # a short tiny run (10 + 20 steps), then answers
    python examples/python_api.py --steps 60 150    # the full tiny schedule: it names colours
    python examples/python_api.py --checkpoint outputs/tiny/<time>/checkpoints/final   # no training

A run this short has barely started learning: its answers may be empty or wrong; the point is
that the checkpoint, the chat call and the bundle all give the same text.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import mmbridge
from mmbridge.export import export
from mmbridge.plugins.encoders._image import example_png

PROMPT = "What colour is the shape?"


def train_overrides(align_steps: int, instruct_steps: int) -> list[str]:
    """``experiment=tiny`` with ``align_steps`` + ``instruct_steps`` steps and a small data set."""
    return [
        "experiment=tiny",
        f"stages.align.max_steps={align_steps}",
        f"stages.instruct.max_steps={instruct_steps}",
        "data.n_train=64",
        "data.n_val=8",
        "data.n_test=8",
        "evaluation.max_samples=8",
        "evaluation.val_samples=4",
        "trainer.enable_progress_bar=false",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", help="answer with this checkpoint or bundle instead of training one"
    )
    parser.add_argument(
        "--steps",
        type=int,
        nargs=2,
        default=(10, 20),
        metavar=("ALIGN", "INSTRUCT"),
        help="steps of the two stages of the tiny run (default: 10 20)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where the run and the bundle go (default: a new temporary directory)",
    )
    args = parser.parse_args(argv)
    root = (args.out or Path(tempfile.mkdtemp(prefix="mmbridge-api-"))).resolve()

    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
    else:
        run = mmbridge.train(train_overrides(*args.steps), run_dir=root / "run")
        test = run.metrics.get("test", {})
        print("run:", run.run_dir)
        print(
            f"test exact match: {test.get('exact_match')} "
            f"(no media {test.get('no_media/exact_match')}, "
            f"chance {test.get('chance/exact_match')})"
        )
        checkpoint = run.checkpoint

    image = example_png(root, 1)
    model = mmbridge.load(checkpoint, device="cpu")
    answer = model.generate(PROMPT, image=image, max_new_tokens=8)
    print("checkpoint answer:", repr(answer))
    print(
        "chat answer:",
        repr(model.chat([{"role": "user", "content": PROMPT}], image=image, max_new_tokens=8)),
    )

    bundle = export(checkpoint, root / "bundle", format="bundle", overwrite=True)
    from_bundle = mmbridge.load(bundle, device="cpu").generate(
        PROMPT, image=image, max_new_tokens=8
    )
    print("bundle:", bundle)
    print(
        "bundle answer:",
        repr(from_bundle),
        "(the same)" if from_bundle == answer else "(DIFFERENT)",
    )


if __name__ == "__main__":
    main()
