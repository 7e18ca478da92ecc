"""The typed schema of the non-component config sections, with their defaults in one place.

Component nodes (``encoder``, ``connector``, ``llm``, ``data``, recipes, ...) are checked
against their constructors' signatures (:mod:`mmbridge.config.build`); everything else — ``loader``,
``evaluation``, ``paths``, ``debug``, ``stages.<name>`` and the top-level keys — is described
here by dataclasses whose fields carry their type, default and valid range.
:func:`mmbridge.config.validation.validate_config` checks a composed config against them and reports
every problem at once.

The defaults are written here only: :mod:`mmbridge.config.store` registers these dataclasses
with Hydra as the nodes ``conf/train.yaml`` and ``conf/stage/*.yaml`` start from (those files set
only what differs), and :class:`mmbridge.runtime.config.RunConfig` fills a key that a stored
config lacks from them. ``mmbridge config`` prints the composed config; the reference page
(``docs/reference/config.md``) lists each field with its comment here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from mmbridge.config.model_spec import top_level_nodes

LLM_MODES = ("frozen", "lora", "full")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda|xpu|hpu|npu)(:\d+)?$")


@dataclass(frozen=True)
class Rule:
    """A range check of a field: ``ok(value)`` and the words for what is valid."""

    ok: Callable[[Any], bool]
    valid: str


def ge(lo: float) -> Rule:
    return Rule(lambda v: v >= lo, f">= {lo}")


def gt(lo: float) -> Rule:
    return Rule(lambda v: v > lo, f"> {lo}")


def unit(lo_open: bool = False, hi_open: bool = False) -> Rule:
    """A ratio / probability in [0, 1] (ends optionally open)."""
    lo, hi = "(" if lo_open else "[", ")" if hi_open else "]"
    return Rule(
        lambda v: (v > 0 if lo_open else v >= 0) and (v < 1 if hi_open else v <= 1),
        f"in {lo}0, 1{hi}",
    )


def one_of(*options: str) -> Rule:
    return Rule(lambda v: v in options, "one of " + ", ".join(options))


def _betas(v: list) -> bool:
    return len(v) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in v)


NONEMPTY = Rule(lambda v: len(v) > 0, "not empty")
BETAS = Rule(_betas, "two numbers in [0, 1), e.g. [0.9, 0.98]")
DEVICE = Rule(lambda v: bool(_DEVICE.match(v)), "null, auto, cpu, cuda, cuda:N, mps")
SEED = Rule(lambda v: 0 <= v <= 2**32 - 1, "in 0..4294967295")


def spec(
    default: Any = None, rule: Rule | None = None, *, factory: Callable[[], Any] | None = None
) -> Any:
    """A schema field: its default and its range rule (kept in the field's metadata)."""
    meta = {"rule": rule} if rule else {}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Loader:
    num_workers: int = spec(0, ge(0))
    max_text_tokens: int = spec(256, ge(1))
    # samples whose answer max_text_tokens cuts are counted per split when a stage starts; above
    # this share of a split (or with no answer token left) the stage refuses to train
    max_truncated_share: float = spec(0.05, unit())
    # training batches of samples of one kind (with media / text-only) and similar length, in a
    # shuffled order that is still a function of (seed, epoch): LLaVA's group_by_modality_length
    # (mmbridge.training.loader.ModalityLengthGrouped)
    group_by_length: bool = False


@dataclass
class Evaluation:
    split: str = "test"
    max_samples: int = spec(128, ge(1))
    max_new_tokens: int = spec(12, ge(1))
    batch_size: int = spec(16, ge(1))
    val_samples: int = spec(32, ge(0))
    baselines: bool = True
    wer_qtypes: list[str] = spec(factory=list)
    # a speech recogniser run on the same clips as the reference: the tool reference_asr_tool
    # (`asr`: Whisper's own decoder) on this checkpoint, e.g. whisper-tiny.en; its figures are
    # asr/wer/<qtype> (null: none)
    reference_asr: str | None = None
    reference_asr_tool: str = spec("asr", NONEMPTY)  # the tool that runs reference_asr
    # the same questions answered through Tool Learning callers, one component node per caller
    # (its metrics prefixed by the entry's name), e.g. {pipeline_ocr: {name: pipeline, tools:
    # [ocr]}, llm_caller: {name: llm, tools: [ocr, calculator]}}
    tool_callers: dict[str, Any] = spec(factory=dict)
    tool_max_new_tokens: int = spec(64, ge(1))
    # more data sets evaluated after training (their test split), data nodes keyed by a name
    # that prefixes their metrics; compose one with `data@evaluation.extra_data.NAME: OPTION`
    extra_data: dict[str, Any] = spec(factory=dict)


@dataclass
class Paths:
    """Where runs write and where caches live (a ``paths`` option sets what differs)."""

    output_root: str = "outputs"
    cache_dir: str = "${oc.env:MMBRIDGE_CACHE,${oc.env:HOME}/.cache/mmbridge}"
    data_dir: str = "${.cache_dir}/data"
    feature_cache_dir: str = "${.cache_dir}/features"


@dataclass
class Debug:
    # write each rank's trained sample ids and final trainable weights to RUN_DIR/debug/ (a
    # test aid for exact resume)
    record_sample_ids: bool = False


#: ``stages.<name>.train.encoder`` options (``false`` / ``true`` mean ``frozen`` / ``full``).
ENCODER_MODES = ("frozen", "lora", "last_n", "full")
ENCODER_MODE = Rule(
    lambda v: isinstance(v, bool) or v in ENCODER_MODES,
    "one of " + ", ".join(ENCODER_MODES) + " (or false / true)",
)


@dataclass
class Train:
    # the encoder: frozen (false), lora (encoder_lora), last_n (encoder_last_n) or full (true)
    encoder: bool | str = spec(False, ENCODER_MODE)
    encoder_last_n: int | None = spec(None, ge(1))  # train.encoder=last_n: its last N blocks train
    connector: bool = True
    llm: str = spec("frozen", one_of(*LLM_MODES))


#: The keys of ``peft.LoraConfig`` that mmbridge sets itself or names differently.
LORA_RENAMED = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
LORA_MANAGED = (
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "lora_alpha",
    "lora_dropout",
)
LORA_TARGETS = Rule(
    lambda v: v == "all-linear" or (isinstance(v, list) and len(v) > 0),
    "a non-empty list of module names, or all-linear",
)


def _peft_lora_keys() -> dict[str, Any]:
    """Every other ``peft.LoraConfig`` field (``use_dora``, ``modules_to_save``,
    ``layers_to_transform``, ...), passed through as written."""
    from peft import LoraConfig  # only when a LoRA section has a key beyond the common ones

    return {
        f.name: Any
        for f in fields(LoraConfig)
        if f.name not in LORA_MANAGED and not f.name.startswith("_")
    }


@dataclass
class Lora:
    """``stages.<name>.lora``: PEFT's ``LoraConfig`` (2106.09685), ``alpha`` / ``dropout``
    standing for ``lora_alpha`` / ``lora_dropout``; any other ``LoraConfig`` key passes through
    (checked against its fields, see :data:`extra_keys`)."""

    r: int = spec(16, ge(1))  # LoRA rank
    alpha: float = spec(32, gt(0))  # LoRA scaling numerator (scale = alpha / r); lora_alpha
    dropout: float = spec(0.05, unit(hi_open=True))  # dropout on the LoRA input; lora_dropout
    # module names that get adapters, or all-linear (every linear layer but the output head)
    target_modules: list[str] | str = spec(
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], rule=LORA_TARGETS
    )
    use_dora: bool = False  # weight-decomposed LoRA (DoRA, 2402.09353)
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r) (2312.03732)
    bias: str = spec("none", one_of("none", "all", "lora_only"))  # which biases train too
    modules_to_save: list[str] | None = None  # modules trained in full beside the adapters
    extra_keys = staticmethod(_peft_lora_keys)
    extra_source = "peft.LoraConfig"


@dataclass
class EncoderLora(Lora):
    """``stages.<name>.encoder_lora``: the encoder's adapters (``train.encoder: lora``), the
    same keys as :class:`Lora` (repeated here: the reference page documents each field)."""

    r: int = spec(16, ge(1))  # LoRA rank
    alpha: float = spec(32, gt(0))  # LoRA scaling numerator (scale = alpha / r); lora_alpha
    dropout: float = spec(0.05, unit(hi_open=True))  # dropout on the LoRA input; lora_dropout
    # module names that get adapters; all-linear: every linear layer of the encoder
    target_modules: list[str] | str = spec("all-linear", LORA_TARGETS)
    use_dora: bool = False  # weight-decomposed LoRA (DoRA, 2402.09353)
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r) (2312.03732)
    bias: str = spec("none", one_of("none", "all", "lora_only"))  # which biases train too
    modules_to_save: list[str] | None = None  # modules trained in full beside the adapters


#: ``stages.<name>.optimizer.name`` options (torch.optim; see BridgeModule.configure_optimizers).
OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor")


@dataclass
class Optimizer:
    name: str = spec("adamw", one_of(*OPTIMIZERS))
    lr: float = spec(1.0e-3, gt(0))
    connector_lr: float | None = spec(None, gt(0))  # the connector's lr (mm_projector_lr); null: lr
    encoder_lr: float | None = spec(None, gt(0))  # the encoder's lr; null: lr
    llm_lr: float | None = spec(None, gt(0))  # the LLM's (and its adapters') lr; null: lr
    weight_decay: float = spec(0.0, ge(0))
    betas: list[float] = spec(factory=lambda: [0.9, 0.98], rule=BETAS)  # adamw, adam
    momentum: float = spec(0.9, unit(hi_open=True))  # sgd (Nesterov when > 0)
    warmup_ratio: float = spec(0.05, unit())
    min_lr_ratio: float = spec(0.1, unit())


#: ``conversation.name`` options (mmbridge.data.conversation; conf/conversation/).
CONVERSATIONS = ("native", "plain", "vicuna_v1", "llama_2", "chatml")


@dataclass
class Conversation:
    """The conversation format (``conversation=NAME``; a stage's own:
    ``stages.<name>.conversation``)."""

    name: str = spec("native", one_of(*CONVERSATIONS))
    system: str | None = None  # null: the format's own system line
    image_first: bool = False  # LLaVA: each turn's media placeholders moved to its front


@dataclass
class Stage:
    """One ``stages.<name>`` entry (``conf/stage/*.yaml``; ``recipe`` is a component node)."""

    train: Train = spec(factory=Train)
    lora: Lora = spec(factory=Lora)
    encoder_lora: EncoderLora = spec(factory=EncoderLora)  # train.encoder=lora
    optimizer: Optimizer = spec(factory=Optimizer)
    split: str = "train"
    # optimiser steps of the stage (an upper bound with a budget); null: from epochs
    max_steps: int | None = spec(100, ge(1))
    # passes over the stage's data; when set, they decide the steps (not max_steps)
    epochs: float | None = spec(None, gt(0))
    batch_size: int = spec(16, ge(1))
    val_every: int = spec(50, ge(1))
    # steps between resumable checkpoints (null: every val_every steps)
    checkpoint_every: int | None = spec(None, ge(1))
    # this stage's share of budget_minutes (null: equal shares)
    budget_fraction: float | None = spec(None, unit(lo_open=True))
    recipe: dict[str, Any] | None = None  # a component node, checked by build.py
    prefix: dict[str, Any] | None = None  # the sequence prefix's own settings (it checks them)
    # the stage's own data (a data-set node or a mixture); null: the run's `data`
    data: dict[str, Any] | None = None
    conversation: dict[str, Any] | None = None  # null: the run's `conversation` (a Conversation)


#: ``loggers`` options (mmbridge.training.loggers.make_loggers).
LOGGERS = ("csv", "tensorboard", "wandb")
LOGGER_LIST = Rule(lambda v: all(x in LOGGERS for x in v), "a list of " + ", ".join(LOGGERS))


@dataclass
class Root:
    """The top-level keys that are not component nodes or sections."""

    schedule: list[str] = spec(factory=lambda: ["align"], rule=NONEMPTY)
    seed: int = spec(0, SEED)
    # RUN_DIR: continue that run (its config.yaml; finished stages are skipped and the
    # interrupted one resumes from its last checkpoint)
    resume: str | None = None
    # start from another run's trained weights: RUN_DIR (its checkpoints/final) or RUN_DIR:STAGE
    # (its checkpoints/STAGE_final), e.g. LLaVA's stage 2 from the stage-1 projector
    init_from: str | None = None
    cache_features: bool = True
    run_name: str = spec("run", NONEMPTY)
    # wall-clock budget of the training stages in minutes (data, model and feature cache
    # included, not the evaluation after them): the stages share what is left when each starts
    # by stages.<name>.budget_fraction and each stops at max_steps or when its share is used
    # (null: step-based)
    budget_minutes: float | None = spec(None, gt(0))
    # where the model runs outside the trainer's fit (feature-cache fill, evaluation): cpu,
    # cuda, cuda:N (null: the trainer's accelerator; auto: CUDA when available)
    device: str | None = spec(None, DEVICE)
    # without a terminal, a progress log line every this many steps (or 30 s)
    progress_every: int = spec(50, ge(1))
    # where each stage logs (under RUN_DIR/logs): csv (logs/<stage>/metrics.csv), tensorboard
    # (logs/tb_<stage>; without the tensorboard package: CSV only, one warning), wandb
    # (offline, logs/wandb; `wandb sync` uploads it later; needs the wandb package)
    loggers: list[str] = spec(factory=lambda: ["csv", "tensorboard"], rule=LOGGER_LIST)


#: section key -> its dataclass (``stages`` maps every stage name to :class:`Stage`).
SECTIONS: dict[str, type] = {
    "loader": Loader,
    "evaluation": Evaluation,
    "paths": Paths,
    "debug": Debug,
    "conversation": Conversation,
}

#: component nodes at the top level: key -> registry kind (``None``: a mapping of nodes).
#: The model's nodes (llm, encoder, connector, alignment, branches) from mmbridge.config.model_spec.
COMPONENTS: dict[str, str | None] = {
    **top_level_nodes(),
    "data": "dataset",
    "trainer": None,
    "tools": None,
}
