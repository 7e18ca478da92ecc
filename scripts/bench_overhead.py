"""What does mmbridge cost per training step? The same tiny image encoder + 2-layer GELU MLP +
causal LM, trained three ways on the same batch, timed in one run, alternating step by step:

* **mmbridge**: the ``tiny`` experiment assembled from its config; a step is what
  ``BridgeModule.training_step`` does (``MultimodalModel.forward`` -> loss, LM head at the
  supervised positions only) plus backward, gradient clipping and the module's AdamW +
  warm-up/cosine step. Timed in a plain loop and, unless ``--no-lightning``, inside a real
  Lightning ``Trainer`` (all of its per-step work included).
* **hand-written**: the same timm ViT module, a hand-written ``Linear-GELU-Linear`` with the
  connector's weights copied in and the same ``LlamaForCausalLM``; ``inputs_embeds`` built by
  hand. Two variants: ``labels=`` (HF's usual path: LM head over every position) and
  ``supervised head`` (the LM head only where labels are set, as mmbridge does).
* **HF LLaVA**: ``LlavaForConditionalGeneration`` with the same Llama and projector weights and a
  CLIP vision tower of the ViT's size (LLaVA needs a vision *config*, so not the timm module:
  CLIP adds a pre-norm, has no final norm on the selected layer, a bias-free patch conv and
  separate q/k/v projections).

Each figure is the median of ``--steps`` steps after ``--warmup``; a ratio is the median over
steps of the paired ratio (the two steps ran back to back, so load changes hit both). Results
(a markdown table) go to stdout, progress to stderr::

    python scripts/bench_overhead.py                       # fp32, 2 threads, 30 steps
    python scripts/bench_overhead.py --bf16 --steps 50
    python scripts/bench_overhead.py --stage instruct      # the LLM trains fully too
    python scripts/bench_overhead.py --profile             # where does mmbridge's time go?
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
IGNORE = -100


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Runner:
    """One implementation's training step: forward -> loss, backward, clip, AdamW, LR step."""

    name: str
    loss_fn: Callable[[], torch.Tensor]
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    clip: float
    amp: Callable[[], contextlib.AbstractContextManager]
    sync: Callable[[], None]
    times: list[float] = field(default_factory=list)

    def step(self) -> None:
        with self.amp():
            loss = self.loss_fn()
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def timed_step(self) -> None:
        self.sync()
        t = time.perf_counter()
        self.step()
        self.sync()
        self.times.append(time.perf_counter() - t)

    @torch.no_grad()
    def loss(self) -> float:
        with self.amp():
            return float(self.loss_fn())


def warn_if_loaded(threads: int) -> None:
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if threads > 1 and load + threads > cores + 0.5:
        log(
            f"note: load average {load:.1f} on {cores} cores: with {threads} torch threads, each "
            "parallel op waits for its slowest (descheduled) thread; "
            "--threads 1 gives steadier figures"
        )


# -- the batch and mmbridge's model -------------------------------------------------------------
def setup(overrides: list[str], stage_name: str, batch_size: int) -> tuple[Any, Any, Any, dict]:
    """(cfg, registry, session, batch): the tiny experiment's model and one collated batch of
    the stage's recipe, images preprocessed (the encoder runs in every step, in all three)."""
    from mmbridge.config import compose
    from mmbridge.registry.plugin_manager import load_registry
    from mmbridge.runtime.session import open_session
    from mmbridge.runtime.stage import prepare_stage

    registry = load_registry()
    if not any(o.startswith("experiment=") for o in overrides):
        overrides = ["experiment=tiny", *overrides]
    cfg = compose(overrides, registry)
    session = open_session(cfg, registry, cache=False)
    stage = session.run.stages[stage_name]
    data = prepare_stage(
        session,
        stage_name,
        samples=session.data_of(stage_name)[stage.split][:batch_size],
        batcher=session.batcher(use_cache=False),
        check=False,
    )
    ds = data.train_ds
    batch = data.batcher.collate([ds[i] for i in range(len(ds))])
    return cfg, registry, session, batch


def check_model(session: Any, train: Any) -> None:
    """The hand-written and LLaVA builds mirror timm ViT -> 2-layer MLP -> HF causal LM."""
    branches = session.model.branches
    problems = []
    if list(branches) != ["image"]:
        problems.append(f"branches {list(branches)} (one image branch needed)")
    else:
        enc, con = branches["image"].encoder, branches["image"].connector
        if (
            type(enc).__name__ != "TimmEncoder"
            or enc.pool_to
            or not enc.drop_cls
            or enc.feature_layer != -1
        ):
            problems.append(
                "encoder must be `timm` with pool_to=null, drop_cls=true, feature_layer=-1"
            )
        if type(con).__name__ != "MLPConverter" or con.depth != 2:
            problems.append("connector must be `mlp` with depth=2")
    if type(session.model.llm).__name__ != "HFCausalLM" or session.model.prefix is not None:
        problems.append("llm must be `hf_causal`, alignment=null")
    if train.llm not in ("frozen", "full"):
        problems.append(
            f"train.llm={train.llm}: the hand-written and LLaVA loops do frozen|full only"
        )
    if problems:
        raise SystemExit("bench_overhead: " + "; ".join(problems))


def make_optimizer(params: list[nn.Parameter], stage: Any) -> tuple[Any, Any]:
    """AdamW + warm-up/cosine as a hand-written loop would set it up (one param group)."""
    from mmbridge.training.module import warmup_cosine

    o = stage.optimizer
    opt = torch.optim.AdamW(
        params, lr=float(o.lr), betas=tuple(o.betas), weight_decay=float(o.weight_decay)
    )
    total = int(stage.max_steps)
    warmup = round(float(o.warmup_ratio) * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, total, warmup, float(o.min_lr_ratio))
    )
    return opt, sched


def trainable(*modules_and_flags: tuple[nn.Module, bool]) -> list[nn.Parameter]:
    params = []
    for module, flag in modules_and_flags:
        module.requires_grad_(flag)
        params += [p for p in module.parameters() if flag]
    return params


# -- (b) the hand-written loop -------------------------------------------------------------------
def hand_written(
    session: Any, batch: dict, train: Any, device: torch.device
) -> dict[str, Callable]:
    """Loss functions of the hand-written loop over copies of mmbridge's modules and weights."""
    branch = session.model.branches["image"]
    vit = copy.deepcopy(branch.encoder.model).to(device).train()
    llama = copy.deepcopy(session.model.llm.model).to(device).train()
    net = branch.connector.net
    mlp = nn.Sequential(
        nn.Linear(net[0].in_features, net[0].out_features),
        nn.GELU(),
        nn.Linear(net[2].in_features, net[2].out_features),
    ).to(device)
    mlp.load_state_dict(net.state_dict())
    params = trainable(
        (vit, bool(train.encoder)), (mlp, bool(train.connector)), (llama, train.llm == "full")
    )
    pixels, ids, attn, labels = (
        batch["media"]["image"]["inputs"],
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
    )
    slots = batch["slots"]["image"].unsqueeze(-1)

    def embeds() -> torch.Tensor:
        with torch.set_grad_enabled(bool(train.encoder)):
            feats = vit.forward_features(pixels)[:, vit.num_prefix_tokens :]  # drop CLS
        text = llama.get_input_embeddings()(ids)
        return text.masked_scatter(slots, mlp(feats).to(text.dtype))  # bf16 under autocast

    def loss_labels() -> torch.Tensor:  # HF's usual path: logits at every position
        return llama(
            inputs_embeds=embeds(), attention_mask=attn, labels=labels, use_cache=False
        ).loss

    def loss_supervised() -> torch.Tensor:  # the LM head only where a next token is supervised
        hidden = llama.model(
            inputs_embeds=embeds(), attention_mask=attn, use_cache=False
        ).last_hidden_state
        target = labels[:, 1:]
        keep = target != IGNORE
        return F.cross_entropy(llama.lm_head(hidden[:, :-1][keep]).float(), target[keep])

    return {"params": params, "labels": loss_labels, "supervised": loss_supervised}


# -- (c) HF LLaVA --------------------------------------------------------------------------------
def llava(session: Any, batch: dict, train: Any, device: torch.device) -> dict[str, Any]:
    """``LlavaForConditionalGeneration`` of the same sizes, with the Llama and MLP weights."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    branch = session.model.branches["image"]
    vit, net = branch.encoder.model, branch.connector.net
    llama = session.model.llm.model
    blk = vit.blocks[0]
    vision = CLIPVisionConfig(
        hidden_size=vit.embed_dim,
        intermediate_size=blk.mlp.fc1.out_features,
        num_hidden_layers=len(vit.blocks),
        num_attention_heads=blk.attn.num_heads,
        image_size=branch.encoder.image_size,
        patch_size=vit.patch_embed.patch_size[0],
        hidden_act="gelu",
        layer_norm_eps=1e-6,
    )
    ids = batch["input_ids"]
    # LLaVA marks image positions by a token id: take one the batch never uses (same vocabulary).
    used = set(ids.unique().tolist())
    image_token = max(i for i in range(llama.config.vocab_size) if i not in used)
    config = LlavaConfig(
        vision_config=vision,
        text_config=copy.deepcopy(llama.config),
        image_token_id=image_token,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=branch.encoder.num_tokens(None),
        multimodal_projector_bias=True,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(llama.model.state_dict())
    model.lm_head.load_state_dict(llama.lm_head.state_dict())
    proj = model.model.multi_modal_projector
    proj.linear_1.load_state_dict(net[0].state_dict())
    proj.linear_2.load_state_dict(net[2].state_dict())
    model.to(device).train()
    params = trainable(
        (model.model.vision_tower, bool(train.encoder)),
        (proj, bool(train.connector)),
        (model.model.language_model, train.llm == "full"),
        (model.lm_head, train.llm == "full"),
    )
    llava_ids = ids.masked_fill(batch["slots"]["image"], image_token)
    pixels = batch["media"]["image"]["inputs"]

    def loss() -> torch.Tensor:
        return model(
            input_ids=llava_ids,
            pixel_values=pixels,
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            use_cache=False,
        ).loss

    return {"params": params, "loss": loss, "attn": model.config.text_config._attn_implementation}


# -- timing --------------------------------------------------------------------------------------
def lightning_run(
    module: Any,
    batch: dict,
    others: list[Runner],
    n_steps: int,
    args: argparse.Namespace,
    cfg: Any,
    sync: Callable[[], None],
) -> list[float]:
    """Fit ``module`` for ``n_steps`` in a real Trainer; after each of its steps, one step of
    every other runner (their time is subtracted). Returns the Trainer's step times."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    class Interleave(L.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.inner: list[float] = []

        def on_train_batch_start(
            self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
        ) -> None:
            sync()
            self.starts.append(time.perf_counter())

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            sync()
            t = time.perf_counter()
            for r in others:
                r.timed_step()
            self.inner.append(time.perf_counter() - t)
            if batch_idx % 10 == 0:
                log(f"  step {batch_idx}/{n_steps}")

    cb = Interleave()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator="gpu" if args.device == "cuda" else "cpu",
            devices=1,
            precision="bf16-mixed" if args.bf16 else "32-true",
            gradient_clip_val=float(cfg.trainer.gradient_clip_val or 0) or None,
            max_steps=n_steps,
            logger=CSVLogger(tmp, name="bench"),
            callbacks=[cb],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=int(cfg.trainer.log_every_n_steps),
            default_root_dir=tmp,
        )
        from torch.utils.data import DataLoader

        # The same pre-collated batch every step, through a real DataLoader (no workers).
        loader = DataLoader([batch] * n_steps, batch_size=None, collate_fn=lambda b: b)
        trainer.fit(module, train_dataloaders=loader)
    return [b - a - inner for a, b, inner in zip(cb.starts, cb.starts[1:], cb.inner)]


def profile(runners: list[Runner], steps: int) -> None:
    """Top operators by self CPU time per runner, to see what one does that another does not."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    tables: dict[str, dict[str, tuple[float, float]]] = {r.name: {} for r in runners}
    for _ in range(steps):  # alternating, one profiled step at a time, as in the timing
        for r in runners:
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                r.step()
            t = tables[r.name]
            for e in prof.key_averages():
                us, n = t.get(e.key, (0.0, 0.0))
                t[e.key] = (us + e.self_cpu_time_total / steps, n + e.count / steps)
    log("profiled " + ", ".join(tables))
    names = list(tables)
    first, second = tables[names[0]], tables[names[-1]]
    # Sorted by how much more time the first runner spends in an operator than the last one.
    ops = sorted(
        set(first) | set(second),
        key=lambda k: -abs(first.get(k, (0, 0))[0] - second.get(k, (0, 0))[0]),
    )[:25]
    print(
        f"\n### Profile: self CPU time per step (us) and calls per step ({steps} steps), "
        f"operators sorted by |{names[0]} - {names[-1]}|\n"
    )
    print("| operator | " + " | ".join(names) + " | difference |")
    print("|---|" + "---|" * (len(names) + 1))
    for k in ops:
        cells = [
            f"{tables[n].get(k, (0, 0))[0]:.0f} ({tables[n].get(k, (0, 0))[1]:.1f})" for n in names
        ]
        diff = first.get(k, (0, 0))[0] - second.get(k, (0, 0))[0]
        print(f"| `{k}` | " + " | ".join(cells) + f" | {diff:+.0f} |")
    counts = [
        k
        for k in sorted(set(first) | set(second))
        if abs(first.get(k, (0, 0))[1] - second.get(k, (0, 0))[1]) > 0.01
    ]
    totals = [sum(v[0] for v in tables[n].values()) for n in names]
    print(
        "| **total** | "
        + " | ".join(f"**{t:.0f}**" for t in totals)
        + f" | {totals[0] - totals[-1]:+.0f} |"
    )
    print(
        f"\nOperators called a different number of times per step ({names[0]} vs {names[-1]}): "
        + (
            ", ".join(
                f"`{k}` {first.get(k, (0, 0))[1]:.0f} vs {second.get(k, (0, 0))[1]:.0f}"
                for k in counts
            )
            or "none"
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: experiment=tiny)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--stage",
        default="align",
        help="stage whose recipe and trainable parts are used "
        "(align: the MLP trains, captions ~32 text tokens; instruct: the LLM too)",
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (Lightning: bf16-mixed)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--no-lightning", action="store_true", help="skip the Lightning Trainer variant"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also profile mmbridge vs hand-written"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    warn_if_loaded(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    load_start = os.getloadavg()[0]

    from mmbridge.data.batcher import to_device
    from mmbridge.model import assemble
    from mmbridge.training.module import BridgeModule
    from mmbridge.training.stages import configure_trainable

    log("composing the config, assembling, building one batch ...")
    cfg, registry, session, batch = setup(args.overrides, args.stage, args.batch_size)
    stage = session.run.stages[args.stage]
    check_model(session, stage.train)
    batch = to_device(batch, device)
    clip = float(cfg.trainer.gradient_clip_val or 0)
    amp = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if args.bf16
        else contextlib.nullcontext
    )

    # (a) mmbridge twice (the plain loop and the Trainer), each with its own weights and optimiser.
    model_a = assemble(cfg, registry)
    model_a.load_state_dict(session.model.state_dict())
    runners = []
    for model in (model_a, session.model):
        configure_trainable(model, stage)
        model.to(device).train()
    mod_a = BridgeModule(model_a, stage)
    opt = mod_a.configure_optimizers()
    # BridgeModule.training_step is `self.model(batch)` plus a self.log call (Trainer-only).
    runners.append(
        Runner(
            "mmbridge (loop)",
            lambda: model_a(batch),
            [p for p in model_a.parameters() if p.requires_grad],
            opt["optimizer"],
            opt["lr_scheduler"]["scheduler"],
            clip,
            amp,
            sync,
        )
    )
    for key, label in (
        ("labels", "hand-written, labels= (head at all positions)"),
        ("supervised", "hand-written, head at supervised positions"),
    ):
        hw = hand_written(session, batch, stage.train, device)  # its own copy of the weights
        o, s = make_optimizer(hw["params"], stage)
        runners.append(Runner(label, hw[key], hw["params"], o, s, clip, amp, sync))
    lv = llava(session, batch, stage.train, device)
    o, s = make_optimizer(lv["params"], stage)
    runners.append(
        Runner("HF LlavaForConditionalGeneration", lv["loss"], lv["params"], o, s, clip, amp, sync)
    )

    ref = runners[0].loss()
    log(
        "step-0 losses (mmbridge and hand-written start from the same weights: they must agree): "
        + ", ".join(f"{r.name}: {r.loss():.5f}" for r in runners)
    )
    for r in runners[1:3]:
        if abs(r.loss() - ref) > 1e-3 * max(1.0, abs(ref)):
            log(f"WARNING: {r.name} loss differs from mmbridge's ({r.loss():.5f} vs {ref:.5f})")

    total = args.warmup + args.steps
    log(f"timing {total} alternating steps per implementation ...")
    lightning_times: list[float] = []
    if args.no_lightning:
        for i in range(total):
            for r in runners:
                r.timed_step()
            if i % 10 == 0:
                log(f"  step {i}/{total}")
    else:
        lightning_times = lightning_run(
            BridgeModule(session.model, stage), batch, runners, total + 1, args, cfg, sync
        )
    series = {r.name: r.times[args.warmup : total] for r in runners}
    if lightning_times:
        series = {
            runners[0].name: series[runners[0].name],
            "mmbridge (Lightning Trainer)": lightning_times[args.warmup : total],
            **{k: v for k, v in list(series.items())[1:]},
        }
    report(series, runners, args, batch, load_start)
    if args.profile:
        profile([runners[0], runners[2]], max(3, args.steps // 2))
    return 0


def report(
    series: dict[str, list[float]],
    runners: list[Runner],
    args: argparse.Namespace,
    batch: dict,
    load_start: float,
) -> None:
    base_name = runners[2].name  # the like-for-like reference: hand-written, supervised head
    base = series[base_name]
    labels_ref = series[runners[1].name]
    text = int(batch["attention_mask"].sum()) / len(batch["ids"]) - int(
        batch["slots"]["image"].sum()
    ) / len(batch["ids"])
    print(f"## Training-step time, tiny ViT -> MLP -> Llama (stage `{args.stage}`)\n")
    print(
        f"batch {len(batch['ids'])}, {int(batch['slots']['image'][0].sum())} visual tokens + "
        f"{text:.0f} text tokens per sample (padded to {batch['input_ids'].shape[1]}); "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}; {args.device}; torch threads {args.threads}; "
        f"{args.steps} timed steps after {args.warmup} warm-up, alternating; "
        f"load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end.\n"
    )
    print(
        "| implementation | median step (ms) | min (ms) | / hand-written, supervised head "
        "| / hand-written, labels= |"
    )
    print("|---|---|---|---|---|")
    for name, times in series.items():
        r1 = statistics.median(a / b for a, b in zip(times, base))
        r2 = statistics.median(a / b for a, b in zip(times, labels_ref))
        print(
            f"| {name} | {1e3 * statistics.median(times):.1f} | {1e3 * min(times):.1f} "
            f"| {r1:.3f} | {r2:.3f} |"
        )
    ratio = statistics.median(a / b for a, b in zip(series[runners[0].name], base))
    verdict = "meets" if ratio <= 1.05 else "MISSES"
    print(
        f"\nmmbridge (loop) / hand-written with the same LM-head placement: {ratio:.3f} "
        f"({verdict} the target <= 1.05). Ratios are medians of per-step paired ratios."
    )


if __name__ == "__main__":
    sys.exit(main())
