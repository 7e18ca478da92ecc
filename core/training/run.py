"""One training run: stages in order, each a Lightning ``fit``; then the test-split evaluation
and ``metrics.json``. ``resume`` continues a killed run from its last checkpoint."""

from __future__ import annotations

import json
import logging
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from mmbridge.data.dataset import Collator, ConversationDataset
from mmbridge.registry import Registry
from mmbridge.training import evaluate as ev
from mmbridge.training.checkpoint import load_weights, read_checkpoint, save_checkpoint
from mmbridge.training.module import BridgeModule
from mmbridge.training.session import Session, open_session
from mmbridge.training.stages import check_schedule, configure_trainable

log = logging.getLogger(__name__)


class _DropLightningAdverts(logging.Filter):
    """Drops Lightning's "try installing litlogger" tip (printed at every ``fit``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def _tidy_lightning_output() -> None:
    """One line per Lightning message, no adverts, no warnings about what is meant.

    The ``lightning`` package installs its own console handler and also propagates to the root
    logger; under Hydra (whose handlers write the console and the run's log file) every message
    appeared twice. With root handlers present, Lightning's own handler is removed, so its
    records go through the run's logging only. Two warnings that describe this framework's
    intended state are silenced: frozen modules kept in eval mode (the frozen encoder and LLM),
    and a deprecation inside Lightning's own pytree helper.
    """
    import warnings

    lightning_logger = logging.getLogger("lightning")
    if logging.getLogger().hasHandlers():
        for handler in list(lightning_logger.handlers):
            lightning_logger.removeHandler(handler)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLightningAdverts) for f in rank_zero.filters):
        rank_zero.addFilter(_DropLightningAdverts())
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def resolve_precision(value: str, accelerator: str) -> str:
    """``auto`` -> ``bf16-mixed`` on a GPU or a CPU with fast bf16 (AMX / AVX512-BF16), else
    ``32-true``."""
    if value != "auto":
        return value
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "32-true"
    return "bf16-mixed" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "32-true"


def _trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    kw = dict(OmegaConf.to_container(cfg.trainer, resolve=True))
    kw["precision"] = resolve_precision(str(kw.get("precision", "auto")), str(kw.get("accelerator", "auto")))
    return kw


def _loader(ds, batch_size: int, collate, shuffle: bool, cfg: DictConfig, seed: int) -> DataLoader:
    workers = int(cfg.loader.num_workers)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
                      num_workers=workers, persistent_workers=workers > 0, generator=gen)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_json(path: Path, data: dict) -> None:
    _atomic_text(path, json.dumps(data, indent=2, default=float))


class _Evaluator:
    """Exact match on the validation split's questions (a fixed small subset)."""

    def __init__(self, session: Session, n: int, max_new_tokens: int, batch_size: int) -> None:
        self.items = ev.qa_items(session.splits.get("val", []))[:n]
        self.session = session
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def __call__(self, model) -> dict[str, float]:
        if not self.items:
            return {}
        res = ev.exact_match(model, self.items, self.session.reader(), self.session.chat,
                             max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, progress=False)
        return {"exact_match": res["exact_match"]}


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_stage(session: Session, name: str, out_dir: Path, resume: bool) -> dict[str, Any]:
    cfg, model = session.cfg, session.model
    stage = cfg.stages[name]
    configure_trainable(model, stage)
    recipe_node = stage.recipe
    from mmbridge.build import build

    recipe = build(session.registry, "recipe", recipe_node, f"stages.{name}.recipe")
    if stage.split not in session.splits:
        from mmbridge.errors import ConfigError

        raise ConfigError(f"stages.{name}.split: '{stage.split}' is not a split of the data set; "
                          f"splits: {', '.join(session.splits)}")
    from mmbridge.recipe import RecipeContext

    recipe.setup(RecipeContext(cfg, session.registry, model, session.tables, Path(cfg.paths.cache_dir)))
    train_samples = recipe.annotate(session.splits[stage.split])
    val_samples = recipe.annotate(session.splits["val"]) if "val" in session.splits else []
    reader = session.reader()
    seed = int(cfg.seed)
    train_ds = ConversationDataset(train_samples, recipe, reader, session.chat, seed=seed)
    val_ds = ConversationDataset(val_samples, recipe, reader, session.chat, seed=seed + 1)
    collate = Collator(session.chat.pad_id, model)
    bs = int(stage.batch_size)
    train_dl = _loader(train_ds, bs, collate, True, cfg, seed)
    val_dl = _loader(val_ds, bs, collate, False, cfg, seed) if len(val_ds) else None
    ev_cfg = cfg.evaluation
    evaluator = _Evaluator(session, int(ev_cfg.get("val_samples", 32)), int(ev_cfg.max_new_tokens),
                           int(ev_cfg.batch_size))
    module = BridgeModule(model, stage, evaluator=evaluator)
    record = bool(cfg.get("debug", {}).get("record_sample_ids", False))
    if record:
        module.seen_ids = []
    ckpt_dir = out_dir / "checkpoints" / name
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                 every_n_train_steps=int(stage.get("checkpoint_every", stage.val_every)))]
    if cfg.trainer.get("enable_progress_bar", True):
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks.append(RichProgressBar())
    loggers = [CSVLogger(out_dir / "logs", name=name, version=""),
               TensorBoardLogger(out_dir / "logs", name=f"tb_{name}", version="")]
    _tidy_lightning_output()
    trainer = L.Trainer(max_steps=int(stage.max_steps), val_check_interval=int(stage.val_every),
                        check_val_every_n_epoch=None, callbacks=callbacks, logger=loggers,
                        num_sanity_val_steps=0, enable_model_summary=False,
                        default_root_dir=str(out_dir), **_trainer_kwargs(cfg))
    last = ckpt_dir / "last.ckpt"
    ckpt_path = str(last) if resume and last.is_file() else None
    t0 = time.perf_counter()
    if ckpt_path is None and val_dl is not None:
        trainer.validate(module, val_dl, verbose=False)  # the starting point of the val curve
    trainer.fit(module, train_dl, val_dl, ckpt_path=ckpt_path)
    wall = time.perf_counter() - t0
    if record:
        _write_debug(out_dir, name, trainer.global_rank, module)
    times = module.step_times[3:] or module.step_times
    return {"history": module.history, "wall_s": wall,
            "step_time_s": statistics.median(times) if times else float("nan"),
            "samples_per_s": bs / statistics.median(times) if times else float("nan"),
            "steps": int(trainer.global_step), "rank": trainer.global_rank}


def _write_debug(out_dir: Path, stage: str, rank: int, module: BridgeModule) -> None:
    from safetensors.torch import save_file

    d = out_dir / "debug"
    d.mkdir(exist_ok=True)
    _atomic_json(d / f"{stage}_rank{rank}_ids.json", {"ids": module.seen_ids})
    state = {k: v.contiguous().cpu() for k, v in module.model.trainable_state_dict().items()}
    save_file(state, str(d / f"{stage}_rank{rank}_weights.safetensors"))


def train(cfg: DictConfig, registry: Registry, out_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Run every scheduled stage, evaluate on the test split, write metrics.json; return it."""
    t_start = time.perf_counter()
    check_schedule(cfg)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    session = open_session(cfg, registry)
    model = session.model
    done: list[str] = []
    stage_metrics: dict[str, Any] = {}
    state_file = out_dir / "state.json"
    state = json.loads(state_file.read_text()) if resume and state_file.is_file() else {}
    for name in cfg.schedule:
        export = out_dir / "checkpoints" / f"{name}_final"
        if name in state.get("stages_done", []) and (export / "weights.safetensors").is_file():
            configure_trainable(model, cfg.stages[name])  # same structure (LoRA) as when it ran
            _, weights, _ = read_checkpoint(export)
            load_weights(model, weights, str(export))
            done.append(name)
            stage_metrics[name] = state.get("stage_metrics", {}).get(name, {})
            log.info("stage %s: already done, loaded %s", name, export)
            continue
        stage_metrics[name] = run_stage(session, name, out_dir, resume)
        done.append(name)
        if stage_metrics[name]["rank"] == 0:
            save_checkpoint(model, cfg, export, done)
            _atomic_json(state_file, {"stages_done": done, "stage_metrics": stage_metrics})
    final = out_dir / "checkpoints" / "final"
    rank0 = all(m.get("rank", 0) == 0 for m in stage_metrics.values())
    if rank0:
        save_checkpoint(model, cfg, final, done)
    metrics = {"stages": stage_metrics, "checkpoint": str(final), "seed": int(cfg.seed),
               "parameters": model.parameter_counts(),
               "visual_tokens": visual_tokens(session),
               "cache": session.cache_stats}
    if rank0:
        metrics["test"] = evaluate_session(session, cfg, predictions=out_dir / "predictions.jsonl")
    metrics["peak_memory_mb"] = _peak_memory_mb()
    metrics["wall_s"] = time.perf_counter() - t_start
    last_stage = stage_metrics[done[-1]] if done else {}
    metrics["step_time_s"] = last_stage.get("step_time_s")
    metrics["samples_per_s"] = last_stage.get("samples_per_s")
    hist = [h for m in stage_metrics.values() for h in m.get("history", []) if "val_loss" in h]
    if hist:
        metrics["val_loss_first"] = hist[0]["val_loss"]
        metrics["val_loss_last"] = hist[-1]["val_loss"]
    if rank0:
        _atomic_json(out_dir / "metrics.json", metrics)
    return metrics


def visual_tokens(session: Session) -> dict[str, float]:
    """Tokens per media item that each connector adds to the sequence (or as context)."""
    out = {}
    for modality, branch in session.model.branches.items():
        table = session.tables.get(modality)
        if table is not None and len(table.lengths):
            n = int(table.lengths.float().mean().round())
        else:
            s = next((x for v in session.splits.values() for x in v if modality in x.media), None)
            if s is None:
                continue
            _, n, _, _ = session.reader(False).read(modality, s.media[modality])
        c = branch.connector
        out[modality] = c.out_tokens(n) if c.in_sequence else getattr(c, "num_latents", 0)
    return out


def evaluate_session(session: Session, cfg: DictConfig, split: str | None = None,
                     max_samples: int | None = None,
                     predictions: Path | None = None) -> dict[str, float]:
    """Exact match on the split's questions (word error rate for ``evaluation.wer_qtypes``),
    with the no-media and chance baselines, the answers through the Tool Learning callers
    (``evaluation.tool_callers``, :mod:`mmbridge.training.tool_eval`), the reference recogniser
    (``evaluation.reference_asr``) and the extra evaluation sets (``evaluation.extra_data``,
    keys prefixed with their name); every answer is written to ``predictions`` (JSON lines,
    atomically) when given."""
    ev_cfg = cfg.evaluation
    split = split or ev_cfg.split
    if split not in session.splits:
        return {}
    records: list[dict] = []
    limit = int(max_samples or ev_cfg.max_samples)
    items = ev.qa_items(session.splits[split])[:limit]
    out = _evaluate_items(session, ev_cfg, items, "", records, session.reader(),
                          train=session.splits.get("train"))
    out["n"] = len(items)
    for name, data_cfg in (ev_cfg.get("extra_data") or {}).items():
        samples = _extra_split(session, name, data_cfg, split)
        items = ev.qa_items(samples)[:limit]
        extra = _evaluate_items(session, ev_cfg, items, f"{name}/", records, session.reader(False),
                                train=None)
        extra[f"{name}/n"] = len(items)
        out.update(extra)
    if predictions is not None:
        predictions.parent.mkdir(parents=True, exist_ok=True)
        _atomic_text(predictions, "".join(json.dumps(r) + "\n" for r in records))
    return out


def _evaluate_items(session: Session, ev_cfg: DictConfig, items: list, prefix: str,
                    records: list[dict], reader, train) -> dict[str, Any]:
    kw = {"max_new_tokens": int(ev_cfg.max_new_tokens), "batch_size": int(ev_cfg.batch_size),
          "wer_qtypes": list(ev_cfg.get("wer_qtypes") or [])}
    out: dict[str, Any] = ev.exact_match(session.model, items, reader, session.chat, prefix=prefix,
                                         records=records, **kw)
    if ev_cfg.get("baselines", True):
        out.update(ev.exact_match(session.model, items, reader, session.chat,
                                  prefix=f"{prefix}no_media/", without_media=True, records=records, **kw))
        if train:
            out.update(ev.chance(ev.qa_items(train), items, prefix=f"{prefix}chance/"))
    for cname, node in (ev_cfg.get("tool_callers") or {}).items():
        from mmbridge.training.tool_eval import build_caller, caller_exact_match

        key = f"evaluation.tool_callers.{cname}"
        caller = session.eval_helper(key, lambda: build_caller(session.registry, node, key))
        out.update(caller_exact_match(session.model, session.chat, reader, items, caller,
                                      prefix=f"{prefix}{cname}/", records=records,
                                      max_new_tokens=int(ev_cfg.get("tool_max_new_tokens", 64))))
    ref = ev_cfg.get("reference_asr")
    if ref and kw["wer_qtypes"]:
        tool = _asr_tool(session, str(ref))
        out.update(ev.reference_asr(items, tool, kw["wer_qtypes"], prefix=f"{prefix}asr/", records=records))
    return out


def _asr_tool(session: Session, checkpoint: str):
    """The registered ``asr`` tool on ``checkpoint`` (evaluation.reference_asr), built once."""
    from mmbridge.build import build

    node = OmegaConf.create({"name": "asr", "checkpoint": checkpoint})
    return session.eval_helper(f"evaluation.reference_asr:{checkpoint}",
                               lambda: build(session.registry, "tool", node, "evaluation.reference_asr"))


def _extra_split(session: Session, name: str, data_cfg: DictConfig, split: str) -> list:
    """The ``split`` (else ``test``, else the only split) of the extra evaluation set ``name``."""
    from mmbridge.errors import ConfigError
    from mmbridge.training.session import check_media, read_source

    splits = read_source(session.cfg, session.registry, data_cfg, f"evaluation.extra_data.{name}")
    chosen = split if split in splits else ("test" if "test" in splits else None)
    if chosen is None:
        if len(splits) != 1:
            raise ConfigError(f"evaluation.extra_data.{name}: no '{split}' or 'test' split; "
                              f"splits: {', '.join(splits)}")
        chosen = next(iter(splits))
    check_media({f"{name}:{chosen}": splits[chosen]}, session.model)
    return splits[chosen]
