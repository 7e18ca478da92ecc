"""Reuse of the shared prefix's keys/values (``llm.reuse_prefix_kv``,
:mod:`mmbridge.model.prefix_kv`): the loss and the gradients equal the plain forward's on a seeded
tiny model (frozen LLM, LoRA, fully trained LLM; right-padded batches, with and without a system
prompt), and it switches itself off, with its reason, where it cannot apply."""

from __future__ import annotations

import pytest
import torch

from mmbridge.config import compose
from mmbridge.data.batcher import Batcher
from mmbridge.data.chat import IGNORE, ChatEncoder
from mmbridge.errors import ConfigError
from mmbridge.model import assemble
from mmbridge.model.prefix_kv import plan_prefix, shared_prefix_length
from mmbridge.testing.tiny import build_tiny_llama

#: forward's loss on the four image samples of conftest (as in test_collator_and_loss.py).
PINNED_LOSS = 7.184994
SYSTEM = "You are a helpful assistant: answer the question about the image with a few words."


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_prefix")
    build_tiny_llama(path, seed=0)
    return path


def make_model(registry, llm_dir, *overrides: str):
    """The conftest's tiny model (seed 0), a fresh copy this test may change."""
    cfg = compose(["experiment=tiny", f"llm.path={llm_dir}", *overrides], registry)
    torch.manual_seed(0)
    return assemble(cfg, registry)


def batch_of(model, samples, system: bool = False, left_pad: bool = False):
    chat = ChatEncoder(model.llm.tokenizer, list(model.branches), max_length=256)
    if system:
        samples = [
            s.replace(conversations=[{"from": "system", "value": SYSTEM}, *s.conversations])
            for s in samples
        ]
    return Batcher.from_model(model, chat, left_pad=left_pad).batch(samples)


def loss_and_grads(model, batch, reuse):
    model.llm.reuse_prefix_kv = reuse
    model.zero_grad(set_to_none=True)
    loss = model(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, model.prefix_plan


def assert_same(model, batch, constant, length, atol=1e-5):
    plain, g_plain, off = loss_and_grads(model, batch, False)
    reused, g_reused, on = loss_and_grads(model, batch, "auto")
    assert off.length == 0 and off.reason == "off: llm.reuse_prefix_kv=false"
    assert (on.length, on.constant) == (length, constant), on.reason
    assert reused == pytest.approx(plain, abs=atol)
    assert g_plain.keys() == g_reused.keys() and g_plain
    for name, g in g_plain.items():
        torch.testing.assert_close(g_reused[name], g, atol=atol, rtol=1e-4, msg=name)
    return plain


@pytest.mark.parametrize("system", [False, True], ids=["no-system", "system-prompt"])
def test_frozen_llm_keeps_a_constant_prefix_and_matches_the_plain_forward(
    registry, llm_dir, image_samples, system
):
    model = make_model(registry, llm_dir)
    model.llm.requires_grad_(False)  # the align stage: only the connector trains
    batch = batch_of(model, image_samples, system=system)
    # "<s><|user|>\n" before the image slots; with the system turn, its text and "<|user|>\n" too
    length = 33 if system else 3
    assert shared_prefix_length(batch) == length
    loss = assert_same(model, batch, constant=True, length=length)
    if not system:
        assert loss == pytest.approx(PINNED_LOSS, abs=1e-4)
    # kept: the second step reuses the very tensors; a weight update recomputes them
    state = model._prefix_store._state
    model(batch)
    assert model._prefix_store._state is state
    with torch.no_grad():
        model.llm.decoder_layers[0].self_attn.k_proj.weight.mul_(1.5)
    assert_same(model, batch, constant=True, length=length)
    assert model._prefix_store._state is not state


@pytest.mark.parametrize("system", [False, True], ids=["no-system", "system-prompt"])
def test_lora_and_a_fully_trained_llm_get_the_plain_gradients(
    registry, llm_dir, image_samples, system
):
    model = make_model(registry, llm_dir)
    batch = batch_of(model, image_samples, system=system)
    length = 33 if system else 3
    assert_same(model, batch, constant=False, length=length)  # everything trains, embeddings too
    model.llm.apply_lora(
        r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    model.train()
    _, grads, plan = loss_and_grads(model, batch, "auto")
    assert plan.length == length and any("lora_" in n for n in grads)
    assert_same(model, batch, constant=False, length=length)


def test_bf16_autocast_matches_within_bf16_tolerance(registry, llm_dir, image_samples):
    model = make_model(registry, llm_dir)
    model.llm.requires_grad_(False)
    batch = batch_of(model, image_samples, system=True)
    out = {}
    for reuse in (False, "auto"):
        model.llm.reuse_prefix_kv = reuse
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out[reuse] = model(batch).item()
    assert model.prefix_plan.length == 33
    assert out["auto"] == pytest.approx(out[False], abs=0.05)


def test_supervised_labels_end_the_prefix(registry, llm_dir, image_samples):
    model = make_model(registry, llm_dir)
    batch = batch_of(model, image_samples, system=True)
    batch["labels"][:, 10] = batch["input_ids"][:, 10]  # position 10 predicted from hidden 9
    assert shared_prefix_length(batch) == 9
    assert_same(model, batch, constant=False, length=9)


def test_it_switches_itself_off_with_a_reason(registry, llm_dir, image_samples):
    model = make_model(registry, llm_dir)
    model.llm.requires_grad_(False)
    batch = batch_of(model, image_samples)

    other = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()}
    other["input_ids"][1, 0] += 1
    assert plan_prefix(model, other).reason == "off: the rows share no leading text token"

    left = batch_of(model, image_samples, left_pad=True)
    assert (
        plan_prefix(model, left).reason
        == "off: left padding (a real token after a padded position)"
    )
    model.llm.reuse_prefix_kv = "auto"
    with torch.no_grad():  # off, it gives the plain (padding-side-free) loss
        assert model(left).item() == pytest.approx(PINNED_LOSS, abs=1e-4)

    model.llm.requires_grad_(True)
    model.llm.apply_lora(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"])
    model.train()
    assert (
        plan_prefix(model, batch).reason
        == "off: dropout 0.1 (LoRA's or the model's) is active in training"
    )
    model.eval()
    assert plan_prefix(model, batch).length == 3  # evaluation: no dropout

    model.llm.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model.train()
    assert (
        plan_prefix(model, batch).reason
        == "off: gradient checkpointing drops the key/value cache in training"
    )
    # called anyway, the LLM refuses rather than attend to the suffix alone
    with pytest.raises(RuntimeError, match="did not use the prefix keys/values"):
        model.llm.prefix_states(model.embed(batch)[:1, :3])
    model.clear_context()

    aligngpt = make_model(registry, llm_dir, "alignment=aligngpt")
    assert plan_prefix(aligngpt, batch).reason.startswith("off: the sequence prefix component (")

    xattn = make_model(registry, llm_dir, "connector=gated_xattn")
    assert plan_prefix(xattn, batch).reason.startswith(
        "off: gated cross-attention layers attached to the LLM"
    )


def test_the_switch_is_a_checked_constructor_argument(registry, llm_dir):
    assert make_model(registry, llm_dir, "llm.reuse_prefix_kv=false").llm.reuse_prefix_kv is False
    with pytest.raises(ConfigError, match="llm.reuse_prefix_kv"):
        make_model(registry, llm_dir, "llm.reuse_prefix_kv=sometimes")


def test_labels_stay_ignored_before_the_first_answer(registry, llm_dir, image_samples):
    """The invariant the suffix-only loss rests on: the prefix positions carry no label."""
    model = make_model(registry, llm_dir)
    batch = batch_of(model, image_samples, system=True)
    assert (batch["labels"][:, : shared_prefix_length(batch) + 1] == IGNORE).all()
