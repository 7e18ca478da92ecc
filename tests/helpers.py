"""Plain helpers shared by the test modules (imported as ``helpers``: ``tests/`` is on the
path through pytest's ``pythonpath``). Fixtures live in ``conftest.py``."""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mmbridge.config.schema import Stage
    from mmbridge.registry import Registry

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

#: The overrides of a fast tiny run through the CLI (tiny models, a few samples, small batches);
#: e2e tests add their schedule, steps and checks.
TINY_FAST = [
    "experiment=tiny",
    "data.n_train=48",
    "data.n_val=8",
    "data.n_test=8",
    "evaluation.max_samples=8",
    "evaluation.val_samples=4",
    "evaluation.batch_size=8",
    "trainer.enable_progress_bar=false",
    "stages.align.batch_size=8",
    "stages.instruct.batch_size=8",
]


def mmbridge_exe() -> str:
    """The ``mmbridge`` console script of the interpreter running the tests."""
    exe = VENV_BIN / "mmbridge"
    return str(exe) if exe.exists() else "mmbridge"


@cache
def shared_registry(autoload: bool = False) -> Registry:
    """The registry of the built-in components (``autoload=True``: and of the installed
    plugins), built on first use and shared by the test session: importing or collecting a test
    module builds none (modules that parametrise over it do so in ``pytest_generate_tests``).
    Tests that register components build their own."""
    from mmbridge.registry.plugin_manager import load_registry

    return load_registry(autoload=autoload)


def stage_of(cfg, name: str) -> Stage:
    """Stage ``name`` of a composed config, typed as the run reads it
    (``RunConfig.parse(cfg).stages[name]``)."""
    from mmbridge.runtime.config import RunConfig

    return RunConfig.parse(cfg).stages[name]


def make_checkpoint(
    out: Path,
    overrides: list[str],
    schedule: tuple[str, ...] = ("align", "instruct"),
    seed: int = 0,
) -> Path:
    """A checkpoint as a run writes it (assembled, each stage's ``configure_trainable``,
    ``save_checkpoint``), its trained tensors seeded random so that the media change the answer;
    no training step runs (about 3 s)."""
    import torch

    from mmbridge.config import compose
    from mmbridge.model import assemble
    from mmbridge.training.checkpoint import save_checkpoint
    from mmbridge.training.stages import configure_trainable

    registry = shared_registry()
    cfg = compose([*overrides, f"schedule=[{','.join(schedule)}]"], registry)
    torch.manual_seed(seed)
    model = assemble(cfg, registry)
    for stage in schedule:
        configure_trainable(model, stage_of(cfg, stage))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in model.ever_trained:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_checkpoint(model, cfg, out, list(schedule), registry)
    return out
