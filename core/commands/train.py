"""``mmbridge train [overrides]``: a Hydra app (so ``-m``/``--multirun``, ``--cfg job`` and
launchers/sweepers work as in any Hydra app)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mmbridge.config import searchpath_override
from mmbridge.errors import ConfigError, MMBridgeError
from mmbridge.plugin_manager import load_registry

HELP = "train a model (Hydra overrides; no arguments = the default experiment)"
log = logging.getLogger("mmbridge.train")

USAGE = """usage: mmbridge train [group=option ...] [key=value ...] [-m] [--cfg job]

Train the model that the composed config describes: every stage of `schedule` in order, then
the test-split evaluation. Writes into outputs/<run_name>/<time>/: config.yaml, metrics.json,
checkpoints/<stage>_final and checkpoints/final (trainable weights + config, safetensors),
logs/ (CSV and TensorBoard).

examples:
  mmbridge train                                  # the default experiment
  mmbridge train experiment=tiny connector=linear
  mmbridge train stages.align.max_steps=20 trainer=gpu
  mmbridge train resume=outputs/tiny/2026-11-22_10-00-00   # continue a killed run
  mmbridge train -m connector=linear,mlp seed=0,1           # a sweep (see `mmbridge sweep`)

`mmbridge config --groups` lists every option; `mmbridge config [overrides]` prints the config.
"""


def run_task(cfg: DictConfig, output_dir: Path) -> dict:
    """The body of a training job (also used by the sweep command's jobs)."""
    from mmbridge.training.run import train

    registry = load_registry()
    resume = cfg.get("resume")
    if resume:
        run_dir = Path(str(resume)).expanduser()
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"resume={resume}: no config.yaml there (pass a run directory "
                              f"written by `mmbridge train`)")
        cfg = OmegaConf.load(saved)
        log.info("resuming %s", run_dir)
        return train(cfg, registry, run_dir, resume=True)
    return train(cfg, registry, output_dir)


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    import hydra
    from hydra.core.hydra_config import HydraConfig

    registry = load_registry()
    status = {"code": 0}

    @hydra.main(config_path="pkg://mmbridge.conf", config_name="train", version_base="1.3")
    def task(cfg: DictConfig) -> float | None:
        out = Path(HydraConfig.get().runtime.output_dir)
        try:
            metrics = run_task(cfg, out)
        except MMBridgeError as exc:
            print(f"mmbridge train: error: {exc}", file=sys.stderr)
            status["code"] = 1
            return None
        test = metrics.get("test", {})
        log.info("run directory: %s", out)
        if test:
            log.info("test exact match %.3f (no media %.3f, chance %.3f)", test.get("exact_match", 0),
                     test.get("no_media/exact_match", float("nan")), test.get("chance/exact_match", float("nan")))
        return test.get("exact_match")

    old = sys.argv
    sys.argv = ["mmbridge-train", *argv, *searchpath_override(registry)]
    try:
        task()
    finally:
        sys.argv = old
    return status["code"]
