"""Training at scale on the tiny real model: gradient checkpointing, the optimizer chosen in
config, and ``init_from`` (a run starting from another run's stage weights)."""

from __future__ import annotations

import pytest
import torch
from helpers import shared_registry, stage_of

from mmbridge.config import compose
from mmbridge.config.schema import Optimizer, Stage
from mmbridge.config.validation import config_errors
from mmbridge.errors import CheckpointError, ConfigError
from mmbridge.model import assemble
from mmbridge.plugins.llms.hf_causal import HFCausalLM
from mmbridge.runtime.config import RunConfig
from mmbridge.training.checkpoint import save_checkpoint
from mmbridge.training.init_from import init_checkpoint, load_init_weights
from mmbridge.training.module import BridgeModule
from mmbridge.training.stages import configure_trainable
from mmbridge.training.strategies import make_strategy

BASE = ["experiment=tiny", "encoder.image_size=32"]
CONNECTOR = "branches.image.connector."


def make(*overrides: str, seed: int = 0):
    cfg = compose([*BASE, *overrides], shared_registry())
    torch.manual_seed(seed)
    return assemble(cfg, shared_registry()), cfg


def init_weights(model, cfg) -> list[str]:
    """``init_from`` as a run applies it: from the run's top-level and scheduled stages."""
    run = RunConfig.parse(cfg)
    return load_init_weights(model, run.root, run.scheduled, shared_registry())


# -- gradient checkpointing ----------------------------------------------------------------------
def _grads(llm: HFCausalLM, embeds: torch.Tensor, mask: torch.Tensor) -> tuple[dict, int]:
    """Gradients of a loss through the decoder, and the elements autograd kept for the backward
    pass during the forward pass (what checkpointing saves)."""
    kept = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t.numel())
        return t

    llm.train()
    llm.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = llm.logits(llm.hidden(embeds, mask)).float().logsumexp(-1).mean()
    n_kept = sum(kept)
    loss.backward()
    return {n: p.grad.clone() for n, p in llm.named_parameters() if p.grad is not None}, n_kept


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    plain = HFCausalLM.for_testing(tmp_path / "a")
    ckpt = HFCausalLM.for_testing(tmp_path / "b", gradient_checkpointing=True)
    ckpt.model.load_state_dict(plain.model.state_dict())
    assert ckpt.gradient_checkpointing and not plain.gradient_checkpointing
    torch.manual_seed(0)
    embeds = torch.randn(2, 7, plain.hidden_size)
    mask = torch.tensor([[1] * 7, [0, 0] + [1] * 5])
    g_plain, kept_plain = _grads(plain, embeds, mask)
    g_ckpt, kept_ckpt = _grads(ckpt, embeds, mask)
    assert kept_ckpt < kept_plain  # the blocks' activations were not kept ...
    # every parameter but the input embedding (the test feeds embeddings) has a gradient
    assert g_plain.keys() == g_ckpt.keys() and len(g_plain) == len(list(plain.parameters())) - 1
    for name, g in g_plain.items():  # ... and were recomputed to the same gradients
        torch.testing.assert_close(g_ckpt[name], g, rtol=1e-5, atol=1e-6, msg=name)
    ckpt.set_gradient_checkpointing(False)
    assert _grads(ckpt, embeds, mask)[1] == kept_plain


def test_gradient_checkpointing_from_config_reaches_the_frozen_llm_input():
    """Through the config; with a frozen LLM the connector still gets its gradient."""
    model, cfg = make("++llm.gradient_checkpointing=true")
    assert model.llm.gradient_checkpointing
    configure_trainable(model, stage_of(cfg, "align"))  # only the connector trains
    model.train()
    embeds = torch.randn(1, 5, model.llm.hidden_size, requires_grad=True)
    model.llm.hidden(embeds, torch.ones(1, 5, dtype=torch.long)).sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="llm.gradient_checkpointing: expected true or false"):
        model.llm.set_gradient_checkpointing("yes")


# -- optimizer from config ----------------------------------------------------------------------
def _optimizer(llm: HFCausalLM, **opt: object) -> torch.optim.Optimizer:
    settings: dict = {
        "lr": 0.1,
        "weight_decay": 0.01,
        "betas": [0.9, 0.98],
        "momentum": 0.9,
        "warmup_ratio": 0.0,
        "min_lr_ratio": 0.1,
        **opt,
    }
    stage = Stage(max_steps=10, optimizer=Optimizer(**settings))
    return BridgeModule(llm, stage).configure_optimizers()["optimizer"]


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        (None, torch.optim.AdamW),
        ("adamw", torch.optim.AdamW),
        ("adam", torch.optim.Adam),
        ("sgd", torch.optim.SGD),
        ("adafactor", torch.optim.Adafactor),
    ],
)
def test_optimizer_is_chosen_by_name(tmp_path, name, cls):
    llm = HFCausalLM.for_testing(tmp_path)
    opt = _optimizer(llm, **({"name": name} if name else {}))
    assert type(opt) is cls
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(
        p.dim() < 2 for p in no_decay["params"]
    )
    if cls is torch.optim.SGD:
        assert decay["momentum"] == 0.9 and decay["nesterov"]
    if cls in (torch.optim.AdamW, torch.optim.Adam):
        assert decay["betas"] == (0.9, 0.98)


def test_sgd_step_is_plain_sgd(tmp_path):
    llm = HFCausalLM.for_testing(tmp_path)
    opt = _optimizer(llm, name="sgd", momentum=0.0, weight_decay=0.0)
    w = llm.model.get_input_embeddings().weight
    before = w.detach().clone()
    llm.embed(torch.tensor([[3, 4]])).sum().backward()
    grad = w.grad.clone()
    opt.step()
    torch.testing.assert_close(w.detach(), before - 0.1 * grad)


def test_unknown_optimizer_is_refused_by_validation():
    cfg = compose([*BASE, "stages.align.optimizer.name=lion"], shared_registry())
    errors = config_errors(cfg, shared_registry())
    assert errors == [
        "stages.align.optimizer.name='lion': expected one of adamw, adam, sgd, adafactor"
    ]


# -- init_from ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A run directory whose align stage trained the connector (seed 1) and whose instruct stage
    trained LoRA adapters too."""
    model, cfg = make("stages.instruct.train.llm=lora", seed=1)
    run = tmp_path_factory.mktemp("src") / "run"
    configure_trainable(model, stage_of(cfg, "align"))
    save_checkpoint(
        model, cfg, run / "checkpoints" / "align_final", ["align"], registry=shared_registry()
    )
    configure_trainable(model, stage_of(cfg, "instruct"))
    with torch.no_grad():  # make the adapters differ from a fresh injection
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    save_checkpoint(
        model,
        cfg,
        run / "checkpoints" / "instruct_final",
        ["align", "instruct"],
        registry=shared_registry(),
    )
    save_checkpoint(
        model, cfg, run / "checkpoints" / "final", ["align", "instruct"], registry=shared_registry()
    )
    return run, model


def test_init_from_stage_loads_its_weights(source_run):
    run, source = source_run
    model, cfg = make(f"init_from={run}:align", seed=2)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    names = init_weights(model, cfg)
    assert names and all(n.startswith(CONNECTOR) for n in names)
    assert set(names) == {n for n, _ in source.named_parameters() if n.startswith(CONNECTOR)}
    state = model.state_dict()
    for n in names:
        torch.testing.assert_close(state[n], source.state_dict()[n])
        assert not torch.equal(state[n], fresh[n])  # seed 2 differed before
    assert set(names) <= model.ever_trained  # this run's checkpoints keep them
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_init_from_run_loads_final_with_its_lora(source_run):
    run, source = source_run
    model, cfg = make(f"init_from={run}", seed=2)
    names = init_weights(model, cfg)
    lora = [n for n in names if "lora_B" in n]
    assert lora and model.llm.lora_config is not None
    for n in lora:
        torch.testing.assert_close(model.state_dict()[n], source.state_dict()[n])
    assert init_checkpoint(str(run)) == run / "checkpoints" / "final"


def test_init_from_errors_name_what_exists(source_run, tmp_path):
    run, _ = source_run
    with pytest.raises(
        ConfigError,
        match=r"init_from=.*:pretrain: no checkpoints/pretrain_final.*"
        r"finished stages there: align, instruct",
    ):
        init_checkpoint(f"{run}:pretrain")
    with pytest.raises(ConfigError, match="does not exist"):
        init_checkpoint(str(tmp_path / "nowhere"))
    model, cfg = make(f"init_from={run}:align", "connector.depth=3")
    with pytest.raises(
        CheckpointError,
        match=r"does not fit this model(.|\n)*2 tensor\(s\) of a loaded connector/prefix missing"
        r"(.|\n)*connector.net.4.bias",
    ):
        init_weights(model, cfg)
    model, cfg = make()
    assert init_weights(model, cfg) == []


# -- FSDP wrap policy -----------------------------------------------------------------------------
def test_fsdp_wraps_each_decoder_and_encoder_block():
    from lightning.pytorch.strategies import FSDPStrategy
    from timm.models.vision_transformer import Block
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model, cfg = make("trainer=fsdp")
    strategy = make_strategy(cfg.trainer, model)
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert policy._module_classes == {LlamaDecoderLayer, Block}  # the tiny Llama's and ViT's blocks
    assert strategy.kwargs["use_orig_params"] and strategy.sharding_strategy.name == "FULL_SHARD"
    assert (
        make_strategy(compose([*BASE, "trainer=gpu_ddp"], shared_registry()).trainer, model)
        == "ddp"
    )
