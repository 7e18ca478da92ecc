"""AlignGPT (2405.14129) and the Data-Driven recipes: alignment levels, the indicator prefix and
its gate on the tiny real model with every kind of connector, and the mixing recipes."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from helpers import shared_registry, stage_of

from mmbridge.config import compose
from mmbridge.config.build import build
from mmbridge.config.schema import Stage
from mmbridge.contracts.prefix import PREFIX_SLOT
from mmbridge.contracts.types import Sample
from mmbridge.data.batcher import Batcher
from mmbridge.data.chat import IGNORE, ChatEncoder
from mmbridge.data.llava import read_llava
from mmbridge.errors import ConfigError, DataError
from mmbridge.model import assemble
from mmbridge.plugins.alignment.aligngpt import AlignGPTPrefix
from mmbridge.plugins.datasets.shapes import ShapesDataset
from mmbridge.plugins.recipes.align_levels import apply_edges, assign_levels
from mmbridge.plugins.recipes.caption_pretrain import CaptionPretrainRecipe
from mmbridge.plugins.recipes.instruct_mix import QA_TEMPLATES, InstructMixRecipe
from mmbridge.training.stages import configure_trainable

LEVELS = 4
BASE = ["experiment=aligngpt", f"alignment.levels={LEVELS}", "stages.instruct.train.llm=frozen"]


pytestmark = pytest.mark.usefixtures("one_thread")


def stage(mode: str, **extra) -> Stage:
    return Stage(prefix={"mode": mode, **extra})


# -- levels ------------------------------------------------------------------------------------


def test_equal_count_levels_on_known_scores():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4])
    levels, edges = assign_levels(scores, 4, "count")
    assert levels.tolist() == [3, 0, 2, 1, 2, 0, 3, 1]  # two per level, best = N-1
    assert edges.tolist() == pytest.approx([0.3, 0.5, 0.8])
    assert apply_edges(scores, edges).tolist() == levels.tolist()
    assert apply_edges(torch.tensor([0.0, 0.45, 5.0]), edges).tolist() == [0, 1, 3]
    # ties and uneven sizes: counts differ by at most one, ranks decide
    levels, _ = assign_levels(torch.tensor([1.0] * 5 + [2.0] * 5), 4, "count")
    assert sorted(Counter(levels.tolist()).values()) == [2, 2, 3, 3]
    assert levels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]


def test_equal_width_levels_on_known_scores():
    scores = torch.tensor([0.0, 0.1, 0.26, 0.5, 0.74, 0.99, 1.0])
    levels, edges = assign_levels(scores, 4, "width")
    assert edges.tolist() == pytest.approx([0.25, 0.5, 0.75])
    assert levels.tolist() == [0, 0, 1, 2, 2, 3, 3]
    levels, _ = assign_levels(torch.tensor([0.3, 0.3]), 4, "width")  # one value: all best
    assert levels.tolist() == [3, 3]
    with pytest.raises(ConfigError, match="recipe.binning: 'quantile'"):
        assign_levels(scores, 4, "quantile")


# -- the prefix alone ----------------------------------------------------------------------------


def test_level_mode_uses_exactly_each_samples_indicator():
    torch.manual_seed(0)
    prefix = AlignGPTPrefix(dim=16, levels=LEVELS)
    prefix.configure(stage("level"))
    embeds, mask = torch.randn(4, 7, 16), torch.ones(4, 7, dtype=torch.bool)
    out = prefix(embeds, mask, {"meta": {"align_level": torch.tensor([2, 0, 3, -1])}})
    assert out.shape == (4, 1, 16)
    # -1 (no level, e.g. a held-out sample) takes the global, best-aligned level N-1
    assert torch.equal(out[:, 0], prefix.indicators.detach()[[2, 0, 3, 3]])
    with pytest.raises(DataError, match="outside 0..3"):
        prefix(embeds, mask, {"meta": {"align_level": torch.tensor([0, 1, 4, 0])}})


def test_gate_weights_sum_to_one_and_the_global_level_is_always_added():
    torch.manual_seed(0)
    prefix = AlignGPTPrefix(dim=16, levels=LEVELS, gate_hidden=8)
    embeds = torch.randn(3, 9, 16)
    mask = torch.rand(3, 9) > 0.3
    meta = {"meta": {"align_level": torch.tensor([0, 0, 0])}}  # ignored outside level mode
    w = prefix.gate_weights(embeds, mask)
    assert w.shape == (3, LEVELS - 1) and bool((w > 0).all())
    torch.testing.assert_close(w.sum(-1), torch.ones(3))
    h = prefix.indicators.detach()
    expect = {
        "gate": h[-1] + w @ h[:-1],
        "local_only": w @ h[:-1],
        "uniform": (h[-1] + h[:-1].mean(0)).expand(3, -1),
        "global_only": h[-1].expand(3, -1),
    }
    for mode, value in expect.items():
        prefix.configure(stage(mode))
        torch.testing.assert_close(prefix(embeds, mask, meta)[:, 0], value)
    # the gate pools the prompt: positions outside the mask do not matter
    changed = embeds.clone()
    changed[~mask] = 100.0
    torch.testing.assert_close(prefix.gate_weights(changed, mask), w)


def test_configure_sets_mode_and_trainable_parts():
    prefix = AlignGPTPrefix(dim=8, levels=LEVELS)
    prefix.configure(stage("level"))
    assert prefix.indicators.requires_grad and not any(
        p.requires_grad for p in prefix.gate.parameters()
    )
    prefix.configure(stage("gate"))
    assert not prefix.indicators.requires_grad and all(
        p.requires_grad for p in prefix.gate.parameters()
    )
    prefix.configure(stage("uniform"))
    assert not any(p.requires_grad for p in prefix.parameters())
    prefix.configure(stage("gate", train_indicators=True))
    assert prefix.indicators.requires_grad
    prefix.configure(Stage())  # a stage without settings: the default mode
    assert prefix.mode == "gate"
    with pytest.raises(ConfigError, match="prefix.mode: 'lvl' is not one of level, gate"):
        prefix.configure(stage("lvl"))
    with pytest.raises(
        ConfigError, match="prefix.mdoe: not a setting .* valid: mode, train_indicators"
    ):
        prefix.configure(Stage(prefix={"mdoe": "gate"}))
    with pytest.raises(ConfigError, match="alignment.levels"):
        AlignGPTPrefix(dim=8, levels=1)


# -- in the tiny model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm():
    cfg = compose(BASE, shared_registry())
    return build(shared_registry(), "llm", cfg.llm, "llm")


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    files = ShapesDataset(
        n_train=6, n_val=0, n_test=0, image_size=32, caption_noise={"unrelated": 0.5}
    ).prepare(tmp_path_factory.mktemp("data"))
    raw = read_llava(files.splits["train"], files.media_root)
    recipe = CaptionPretrainRecipe()
    return [
        recipe(s, random.Random(i)).replace(meta={**s.meta, "align_level": i % LEVELS})
        for i, s in enumerate(raw)
    ]


def make_model(llm, connector: str):
    cfg = compose([*BASE, f"connector={connector}", "encoder.image_size=32"], shared_registry())
    torch.manual_seed(0)
    return assemble(cfg, shared_registry(), llm=llm), cfg


def collate(model, samples: list[Sample], generation: bool = False) -> dict:
    chat = ChatEncoder(
        model.llm.tokenizer,
        list(model.branches),
        max_length=256,
        prefix_tokens=model.prefix.n_tokens,
        meta_keys=model.prefix.meta_keys,
    )
    if generation:
        samples = [s.replace(conversations=s.conversations[:1]) for s in samples]
    return Batcher.from_model(model, chat).batch(samples, generation=generation)


def test_indicator_slot_after_bos_ignored_and_gate_blind_to_answers(llm, samples):
    model, cfg = make_model(llm, "mlp")
    configure_trainable(model, stage_of(cfg, "instruct"))
    model.eval()
    a = collate(model, samples[:2])
    bos = model.llm.tokenizer.bos_token_id
    assert a["input_ids"][:, 0].tolist() == [bos, bos]
    slot = a["slots"][PREFIX_SLOT]
    assert slot.sum(1).tolist() == [1, 1] and slot[:, 1].all()
    assert (a["labels"][slot] == IGNORE).all()
    assert a["meta"]["align_level"].tolist() == [0, 1]
    # the same prompts with other (longer) answers: the gated indicator is unchanged
    other = [
        s.replace(conversations=[s.conversations[0], {"from": "gpt", "value": "A black star " * 5}])
        for s in samples[:2]
    ]
    b = collate(model, other)
    assert a["input_ids"].shape[1] != b["input_ids"].shape[1]
    with torch.no_grad():
        ea, eb = model.embed(a), model.embed(b)
    torch.testing.assert_close(ea[a["slots"][PREFIX_SLOT]], eb[b["slots"][PREFIX_SLOT]])
    # ... and it does depend on the prompt (another image)
    c = collate(model, samples[2:4])
    with torch.no_grad():
        ec = model.embed(c)
    assert not torch.allclose(ea[a["slots"][PREFIX_SLOT]], ec[c["slots"][PREFIX_SLOT]])


def _steps(model, batch, n: int = 2) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)  # rows without gradient stay put
    losses = []
    for _ in range(n):
        loss = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("connector", ["mlp", "qformer", "resampler", "abstractor"])
def test_two_stages_train_the_right_parts_with_any_connector(llm, samples, connector):
    model, cfg = make_model(llm, connector)
    model.train()
    batch = collate(model, samples[:3])  # levels 0, 1, 2
    prefix = model.prefix
    conn = model.branches["image"].connector
    ind0, gate0 = (
        prefix.indicators.detach().clone(),
        [p.detach().clone() for p in prefix.gate.parameters()],
    )
    conn0 = [p.detach().clone() for p in conn.parameters()]

    configure_trainable(model, stage_of(cfg, "align"))  # stage 1: level indicators + connector
    assert prefix.mode == "level"
    losses = _steps(model, batch)
    assert all(torch.isfinite(torch.tensor(losses)))
    used = sorted(set(batch["meta"]["align_level"].tolist()))
    assert used == [0, 1, 2]
    moved = (prefix.indicators.detach() - ind0).abs().sum(-1) > 0
    assert moved.nonzero().flatten().tolist() == used  # only the levels in the batch learn
    assert all(torch.equal(g, p) for g, p in zip(gate0, prefix.gate.parameters()))
    assert any(not torch.equal(c, p) for c, p in zip(conn0, conn.parameters()))

    # stage 2: frozen indicators, the gate learns
    configure_trainable(model, stage_of(cfg, "instruct"))
    assert prefix.mode == "gate" and not prefix.indicators.requires_grad
    ind1 = prefix.indicators.detach().clone()
    model.zero_grad(set_to_none=True)
    model(batch).backward()
    assert prefix.indicators.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prefix.gate.parameters())
    model.zero_grad()
    _steps(model, batch)
    assert torch.equal(prefix.indicators.detach(), ind1)
    assert any(not torch.equal(g, p) for g, p in zip(gate0, prefix.gate.parameters()))

    model.eval()  # at inference the gate decides, from the prompt alone
    new = model.generate(collate(model, samples[:2], generation=True), max_new_tokens=2)
    assert new.shape[0] == 2


# -- recipes -------------------------------------------------------------------------------------


def _shape_sample(i: int, source: str = "a") -> Sample:
    conv = [
        {"from": "human", "value": "<image>\nWhat colour is the circle?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "How many shapes are there?"},
        {"from": "gpt", "value": "2"},
    ]
    return Sample(
        f"s{i}",
        media={"image": f"/x/{i}.png"},
        conversations=conv,
        meta={
            "caption": "A red circle and a blue square.",
            "qtypes": ["colour", "count"],
            "source": source,
        },
    )


def test_instruct_mix_draws_tasks_by_the_mixing_ratios():
    recipe = build(
        shared_registry(),
        "recipe",
        {"name": "instruct_mix", "mix": {"caption": 0.3, "qa": 0.7}},
        "recipe",
    )
    outs = [recipe(_shape_sample(i), random.Random(f"0:{i}")) for i in range(3000)]
    tasks = Counter(o.meta["task"] for o in outs)
    assert abs(tasks["caption"] / 3000 - 0.3) < 0.03
    caption = next(o for o in outs if o.meta["task"] == "caption")
    assert caption.conversations[1]["value"] == "A red circle and a blue square."
    assert caption.conversations[0]["value"].startswith("<image>\n")
    qa = [o for o in outs if o.meta["task"] == "qa"]
    firsts = Counter(o.conversations[0]["value"] for o in qa)
    assert len(firsts) == len(QA_TEMPLATES)  # every template used
    for o in qa:  # questions rewritten, answers and placeholders kept
        assert (
            o.conversations[0]["value"].startswith("<image>\n")
            and "<image>" not in o.conversations[2]["value"]
        )
        assert "What colour is the circle?" in o.conversations[0]["value"]
        assert [t["value"] for t in o.conversations[1::2]] == ["red", "2"]
    # the same sample and rng draw the same way
    assert recipe(_shape_sample(5), random.Random("x")) == recipe(
        _shape_sample(5), random.Random("x")
    )
    # a sample without a caption can only be QA; mix weights renormalise
    no_caption = _shape_sample(1).replace(meta={})
    assert all(recipe(no_caption, random.Random(i)).meta["task"] == "qa" for i in range(50))
    only_caption = build(
        shared_registry(),
        "recipe",
        {"name": "instruct_mix", "mix": {"caption": 1.0, "qa": 0}},
        "recipe",
    )
    assert only_caption(_shape_sample(1), random.Random(0)).meta["task"] == "caption"


def test_instruct_mix_resamples_sources_and_checks_config():
    recipe = InstructMixRecipe(sources={"a": 0.25, "b": 0.75}, seed=1)
    data = [_shape_sample(i, "a") for i in range(80)] + [
        _shape_sample(100 + i, "b") for i in range(20)
    ]
    out = recipe.annotate(data)
    assert len(out) == 100 and Counter(s.meta["source"] for s in out) == {"a": 25, "b": 75}
    assert out == recipe.annotate(data)  # seeded
    with pytest.raises(ConfigError, match="missing: b"):
        InstructMixRecipe(sources={"a": 1.0}).annotate(data)
    with pytest.raises(ConfigError, match="recipe.mix.ocr: unknown; valid: caption, qa"):
        InstructMixRecipe(mix={"ocr": 1.0})
    with pytest.raises(ConfigError, match="no {question} field"):
        InstructMixRecipe(templates={"qa": ["Answer briefly."]})


def test_caption_pretrain_templates_per_modality():
    recipe = CaptionPretrainRecipe(
        instructions={"image": ["Caption it.", "Describe it."]}, caption_key="alt"
    )
    s = _shape_sample(0).replace(meta={"alt": "Two shapes."})
    drawn = Counter(recipe(s, random.Random(i)).conversations[0]["value"] for i in range(40))
    assert set(drawn) == {"<image>\nCaption it.", "<image>\nDescribe it."}
    out = recipe(s, random.Random(0))
    assert (
        out.conversations[1] == {"from": "gpt", "value": "Two shapes."}
        and out.meta["task"] == "caption"
    )
    with pytest.raises(
        ConfigError, match="recipe.instructions.image: leave out the media placeholders"
    ):
        CaptionPretrainRecipe(instructions={"image": ["<image> Describe."]})
    with pytest.raises(ConfigError, match="recipe.instructions.smell: not a modality"):
        CaptionPretrainRecipe(instructions={"smell": ["Sniff."]})


@pytest.mark.parametrize(
    ("experiment", "n_train"), [("aligngpt_ablation", None), ("aligngpt_quickstart_ablation", 2000)]
)
def test_configs_compose_for_the_ablation(experiment, n_train):
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = compose([f"experiment={experiment}"], shared_registry(), return_hydra_config=True)
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)[0]
    assert len(jobs) == 12
    seen = {}
    for job in (j for j in jobs if "seed=0" in j):
        c = compose([f"experiment={experiment}", *job], shared_registry())
        a = c.get("alignment")
        seen[job[0]] = (
            a.levels if a else None,
            (c.stages.instruct.get("prefix") or {}).get("mode"),
        )
        assert (
            c.data.caption_noise.unrelated == 0.2 and c.stages.align.recipe.name == "align_levels"
        )
        assert n_train is None or (c.data.n_train == n_train and c.llm.name == "hf_causal")
    assert seen == {
        "alignment=none": (None, None),
        "alignment=aligngpt_n4": (4, "gate"),
        "alignment=aligngpt": (8, "gate"),
        "alignment=aligngpt_local_only": (8, "local_only"),
        "alignment=aligngpt_uniform": (8, "uniform"),
        "alignment=aligngpt_global_only": (8, "global_only"),
    }


# -- a real run ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_run_aligngpt_end_to_end(tmp_path):
    """``train()`` on experiment=aligngpt: levels from the contrastive scorer (a tiny random BERT
    text side), indicators learned in stage 1 and frozen in stage 2, the gate at inference."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    from mmbridge.runtime.config import RunConfig
    from mmbridge.runtime.session import session_from_checkpoint
    from mmbridge.runtime.train import train
    from mmbridge.testing.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer(tmp_path / "bert")
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            pad_token_id=tok.pad_token_id,
        )
    ).save_pretrained(tmp_path / "bert")
    overrides = [
        *BASE,
        "stages.align.max_steps=2",
        "stages.instruct.max_steps=2",
        "stages.align.val_every=2",
        "stages.instruct.val_every=2",
        "stages.align.batch_size=8",
        "stages.instruct.batch_size=8",
        "data.n_train=32",
        "data.n_val=8",
        "data.n_test=8",
        "data.image_size=32",
        "encoder.image_size=32",
        "evaluation.max_samples=8",
        "evaluation.val_samples=4",
        "evaluation.batch_size=8",
        "evaluation.baselines=false",
        "trainer.enable_progress_bar=false",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"stages.align.recipe.scorer.text_model={tmp_path / 'bert'}",
        "stages.align.recipe.scorer.batch_size=16",
    ]
    cfg = compose(overrides, shared_registry())
    metrics = train(RunConfig.parse(cfg), shared_registry(), tmp_path / "run")
    assert 0 <= metrics["test"]["exact_match"] <= 1 and metrics["stages"]["instruct"]["steps"] == 2
    assert list(
        (tmp_path / "cache" / "scorer").glob("text-*.pt")
    )  # the align stage scored its pairs
    ckpts = tmp_path / "run" / "checkpoints"
    after_align = load_file(next((ckpts / "align_final").glob("*.safetensors")))
    final = load_file(next((ckpts / "final").glob("*.safetensors")))
    assert "prefix.gate.0.weight" not in after_align  # the gate first trains in stage 2
    torch.testing.assert_close(
        final["prefix.indicators"], after_align["prefix.indicators"], rtol=0, atol=0
    )
    session, _ = session_from_checkpoint(
        str(ckpts / "final"), with_data=False, registry=shared_registry()
    )
    assert session.model.prefix.mode == "gate"
    torch.testing.assert_close(
        session.model.prefix.gate[0].weight.detach(), final["prefix.gate.0.weight"]
    )


def test_evaluation_records_what_the_gate_decided(llm, samples):
    """Each held-out answer of a gated model carries its gate weights (predictions.jsonl); the
    metrics summarise them; a prefix without a gate records its mode only."""
    from mmbridge.evaluation.qa import exact_match, gate_summary, qa_items

    model, cfg = make_model(llm, "mlp")
    configure_trainable(model, stage_of(cfg, "instruct"))
    chat = ChatEncoder(
        model.llm.tokenizer,
        list(model.branches),
        max_length=256,
        prefix_tokens=model.prefix.n_tokens,
        meta_keys=model.prefix.meta_keys,
    )
    qa = [
        s.replace(
            conversations=[
                {"from": "human", "value": "<image>\nWhat colour is it?"},
                {"from": "gpt", "value": "red"},
            ],
            meta={**s.meta, "qtypes": ["colour"]},
        )
        for s in samples[:3]
    ]
    items = qa_items(qa)
    records: list[dict] = []
    out = exact_match(
        model,
        items,
        Batcher.from_model(model, chat),
        records=records,
        max_new_tokens=2,
        batch_size=2,
        progress=False,
    )
    gates = [r["prefix"]["gate"] for r in records]
    assert len(gates) == 3 and all(len(g) == LEVELS - 1 for g in gates)
    assert all(abs(sum(g) - 1) < 1e-3 for g in gates)
    # the run report's gate plot: each level's mean weight over the question type
    from mmbridge.reporting.run_report import gate_section

    assert f"level 1 colour: {sum(g[0] for g in gates) / 3:.3f}" in gate_section(records)
    # the weights recorded are the gate's on each question's own prompt (batch of 2, then 1)
    model.eval()
    with torch.no_grad():
        batch = collate(model, qa[2:3], generation=True)
        emb = model.embed(batch)
        prompt = batch["attention_mask"].bool() & ~batch["slots"][PREFIX_SLOT]
        direct = model.prefix.gate_weights(emb, prompt)[0].tolist()
    assert gates[2] == pytest.approx(direct, abs=1e-3)
    assert 0.0 <= out["gate/entropy"] <= 1.0 and 1 / (LEVELS - 1) <= out["gate/max_weight"] <= 1.0
    assert out == {**out, **gate_summary([r["prefix"] for r in records])}
    # known weights: uniform -> entropy 1; one-hot -> entropy 0, max weight 1
    assert gate_summary([{"gate": [1 / 3] * 3}])["gate/entropy"] == pytest.approx(1.0)
    assert gate_summary([{"gate": [1.0, 0.0, 0.0]}]) == pytest.approx(
        {"gate/entropy": 0.0, "gate/max_weight": 1.0}, abs=1e-9
    )

    model.prefix.configure(stage("uniform"))
    records = []
    out = exact_match(
        model,
        items,
        Batcher.from_model(model, chat),
        records=records,
        max_new_tokens=2,
        progress=False,
    )
    assert [r["prefix"] for r in records] == [{"mode": "uniform"}] * 3
    assert "gate/entropy" not in out
