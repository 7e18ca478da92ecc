"""Mixed precision as the field means it ([F] issue 25 item 5): precision decided once
(mmbridge.model.precision), every trained parameter an fp32 master weight under ``bf16-mixed`` with
bf16 compute, frozen weights bf16; FSDP all fp32 with a MixedPrecision policy; the plan and a
run apply the same rule."""

from __future__ import annotations

import random

import lightning as L
import pytest
import torch
from helpers import shared_registry, stage_of
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from mmbridge.config import compose
from mmbridge.config.model_spec import ModelConfig
from mmbridge.data.batcher import Batcher
from mmbridge.data.chat import ChatEncoder
from mmbridge.data.llava import read_llava
from mmbridge.model import assemble
from mmbridge.model.precision import (
    PrecisionDecision,
    component_dtypes,
    fsdp_mixed_precision,
    keep_trained_fp32,
    plan_precision,
    resolve_auto_dtypes,
)
from mmbridge.plugins.datasets.shapes import ShapesDataset
from mmbridge.plugins.recipes.caption_pretrain import CaptionPretrainRecipe
from mmbridge.runtime.config import RunConfig
from mmbridge.training.module import BridgeModule
from mmbridge.training.stages import configure_trainable

pytestmark = pytest.mark.usefixtures("one_thread")

BF16 = PrecisionDecision("bf16-mixed", "bfloat16", "test")
BASE = ["experiment=tiny", "encoder.image_size=32", "llm.dtype=auto", "schedule=[align,instruct]"]


def _dtypes(cfg: DictConfig, decision: PrecisionDecision) -> dict[str, str]:
    run = RunConfig.parse(cfg)
    return component_dtypes(run.model, run.scheduled, run.trainer, decision)


def _resolved(cfg: DictConfig, decision: PrecisionDecision | str) -> ModelConfig:
    """The model nodes a run assembles (``dtype: auto`` decided)."""
    run = RunConfig.parse(cfg)
    return resolve_auto_dtypes(run.model, run.scheduled, run.trainer, decision)


def _cfg(**stages_llm: str) -> DictConfig:
    return OmegaConf.create(
        {
            "schedule": list(stages_llm),
            "trainer": {"strategy": "auto"},
            "llm": {"name": "hf_causal", "dtype": "auto"},
            "encoder": {"name": "hf_vision", "dtype": "auto"},
            "branches": {"audio": {"encoder": {"name": "whisper", "dtype": "auto"}}},
            "stages": {
                s: {"train": {"llm": mode, "encoder": False}} for s, mode in stages_llm.items()
            },
        }
    )


@pytest.mark.parametrize(
    ("strategy", "precision", "llm_mode", "want_llm", "want_enc"),
    [
        ("auto", "bf16-mixed", "full", "float32", "bfloat16"),  # the LLM trains: fp32 masters
        ("auto", "bf16-mixed", "lora", "bfloat16", "bfloat16"),  # frozen base under adapters
        ("auto", "bf16-mixed", "frozen", "bfloat16", "bfloat16"),
        ("fsdp", "bf16-mixed", "frozen", "float32", "float32"),  # one dtype per flat parameter
        (
            "deepspeed_stage_3",
            "bf16-mixed",
            "full",
            "bfloat16",
            "bfloat16",
        ),  # DeepSpeed's own masters
        ("auto", "bf16-true", "full", "bfloat16", "bfloat16"),  # pure bf16 was asked for
    ],
)
def test_component_dtypes_follow_what_trains(strategy, precision, llm_mode, want_llm, want_enc):
    cfg = _cfg(align="frozen", instruct=llm_mode)
    cfg.trainer.strategy = strategy
    got = _dtypes(cfg, PrecisionDecision(precision, "bfloat16", "test"))
    assert got == {"llm": want_llm, "encoder": want_enc, "branches.audio.encoder": want_enc}
    run = RunConfig.parse(cfg)
    resolved = resolve_auto_dtypes(
        run.model, run.scheduled, run.trainer, PrecisionDecision(precision, "bfloat16", "test")
    )
    assert (resolved["llm"]["dtype"], resolved["encoder"]["dtype"]) == (want_llm, want_enc)
    assert resolved["branches"]["audio"]["encoder"]["dtype"] == want_enc
    assert run.model["llm"]["dtype"] == cfg.llm.dtype == "auto"  # the run's config keeps `auto`


def test_a_trained_encoder_is_fp32_and_a_bare_dtype_means_its_mixed_precision():
    cfg = _cfg(align="frozen")
    cfg.stages.align.train.encoder = "last_n"
    assert _dtypes(cfg, BF16)["encoder"] == "float32"
    cfg.stages.align.train.encoder = "lora"
    assert _dtypes(cfg, BF16)["encoder"] == "bfloat16"
    # resolve_auto_dtypes(..., "bfloat16") (the unsharded copy after FSDP): bf16-mixed's rule
    cfg.stages.align.train.llm = "full"
    assert _resolved(cfg, "bfloat16")["llm"]["dtype"] == "float32"
    assert _resolved(cfg, "float32")["encoder"]["dtype"] == "float32"


def test_plan_and_fsdp_use_the_same_decision():
    assert plan_precision({"accelerator": "gpu", "precision": "auto"}).precision == "bf16-mixed"
    assert plan_precision({"accelerator": "cpu", "precision": "auto"}).precision == "32-true"
    policy = fsdp_mixed_precision("bf16-mixed")
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert fsdp_mixed_precision("32-true") is None


def test_lora_base_stays_bf16_and_its_adapters_are_fp32():
    cfg = compose([*BASE, "stages.instruct.train.llm=lora"], shared_registry())
    model = assemble(_resolved(cfg, BF16), shared_registry())
    configure_trainable(model, stage_of(cfg, "instruct"))
    trained = {n: p.dtype for n, p in model.llm.named_parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.llm.parameters() if not p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert set(trained.values()) == {torch.float32} and frozen == {torch.bfloat16}
    assert keep_trained_fp32(model) == 0  # nothing left to cast


@pytest.fixture(scope="module")
def loader(tmp_path_factory):
    model = assemble(compose(BASE, shared_registry()), shared_registry())
    files = ShapesDataset(n_train=4, n_val=0, n_test=0, image_size=32).prepare(
        tmp_path_factory.mktemp("data")
    )
    recipe = CaptionPretrainRecipe()
    samples = [
        recipe(s, random.Random(i))
        for i, s in enumerate(read_llava(files.splits["train"], files.media_root))
    ]
    batcher = Batcher.from_model(
        model, ChatEncoder(model.llm.tokenizer, list(model.branches), max_length=128)
    )
    return DataLoader(
        [batcher.encode(s) for s in samples], batch_size=4, collate_fn=batcher.collator
    )


def test_bf16_mixed_fit_keeps_fp32_masters_and_updates_below_bf16_resolution(loader):
    """A real Lightning fit under bf16-mixed: the fully trained LLM holds fp32 weights, and one
    AdamW step moves its final norm weights (all 1.0) by about lr = 1e-4, which is below
    bf16's spacing at 1.0 (2^-7): pure bf16 weights would not have moved at all."""
    cfg = compose(
        [
            *BASE,
            "stages.instruct.train.llm=full",
            "stages.instruct.optimizer.lr=1e-4",
            "stages.instruct.optimizer.warmup_ratio=0",
        ],
        shared_registry(),
    )
    model = assemble(_resolved(cfg, BF16), shared_registry())
    assert {p.dtype for p in model.llm.parameters()} == {torch.float32}  # loaded as fp32 masters
    configure_trainable(model, stage_of(cfg, "instruct"))
    norm = model.llm.decoder.norm.weight
    before = norm.detach().clone()
    module = BridgeModule(model, stage_of(cfg, "instruct"))
    trainer = L.Trainer(
        max_steps=1,
        precision="bf16-mixed",
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, loader)
    assert module.total_steps == 1
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    delta = (norm.detach() - before).abs()
    spacing = 2.0**-7  # bf16 keeps 8 significant bits: the next value above 1.0 is 1 + 2^-7
    assert before.eq(1.0).all() and delta.max() < spacing / 2
    assert (delta > 0).float().mean() > 0.9  # the fp32 master moved ...
    assert norm.detach().bfloat16().eq(1.0).all()  # ... by less than bf16 could have kept


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fsdp_clips_by_norm_and_keeps_fp32_shards_on_cuda(loader):
    """Under FSDP Lightning refuses norm clipping; BridgeModule clips through the root FSDP
    module, with the MixedPrecision policy of bf16-mixed (one GPU: a process group of one)."""
    from mmbridge.training.strategies import make_strategy

    cfg = compose(
        [*BASE, "trainer=fsdp", "trainer.devices=1", "stages.instruct.train.llm=full"],
        shared_registry(),
    )
    model = assemble(_resolved(cfg, BF16), shared_registry())
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # FSDP: every weight fp32
    configure_trainable(model, stage_of(cfg, "instruct"))
    module = BridgeModule(model, stage_of(cfg, "instruct"))
    trainer = L.Trainer(
        max_steps=2,
        precision="bf16-mixed",
        accelerator="gpu",
        devices=1,
        strategy=make_strategy(cfg.trainer, model, precision="bf16-mixed"),
        gradient_clip_val=1e-3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, loader)
    assert trainer.global_step == 2
