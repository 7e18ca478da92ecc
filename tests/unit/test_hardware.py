"""Precision and device decided from the hardware ([M] item 1-2): every case of the decision,
the cached probe, ``dtype: auto`` resolution, and the device each path of a run uses."""

from __future__ import annotations

import json
import os

import pytest
import torch
from omegaconf import OmegaConf

from mmbridge.config.model_spec import ModelConfig
from mmbridge.errors import ConfigError
from mmbridge.model import precision as hwmod
from mmbridge.model.precision import Hardware, decide_precision, probe_cpu_bf16, resolve_auto_dtypes
from mmbridge.runtime.config import RunConfig
from mmbridge.training.trainer import resolve_device, trainer_kwargs

AVX2 = Hardware(
    cuda=False, cuda_bf16=False, cpu_flags=frozenset({"avx2", "fma"}), cpu_model="AMD EPYC"
)
ZEN4 = Hardware(
    cuda=False,
    cuda_bf16=False,
    cpu_flags=frozenset({"avx2", "avx512_bf16"}),
    cpu_model="AMD EPYC 9004",
)
SPR = Hardware(
    cuda=False,
    cuda_bf16=False,
    cpu_flags=frozenset({"avx2", "amx_bf16", "avx512_bf16"}),
    cpu_model="Xeon",
)
A100 = Hardware(cuda=True, cuda_bf16=True, cpu_flags=frozenset({"avx2"}), cpu_model="Xeon")
V100 = Hardware(cuda=True, cuda_bf16=False, cpu_flags=frozenset({"avx2"}), cpu_model="Xeon")


def never(hw):
    raise AssertionError("the probe must not run here")


@pytest.mark.parametrize(
    ("hw", "accelerator", "probe", "want", "weights", "why"),
    [
        (AVX2, "auto", never, "32-true", "float32", "without amx_bf16 / avx512_bf16"),
        (AVX2, "cpu", never, "32-true", "float32", "emulated"),
        (
            ZEN4,
            "auto",
            lambda hw: {"fp32_gflops": 80.0, "bf16_gflops": 160.0},
            "bf16-mixed",
            "bfloat16",
            "x2.00",
        ),
        (
            SPR,
            "cpu",
            lambda hw: {"fp32_gflops": 150.0, "bf16_gflops": 700.0},
            "bf16-mixed",
            "bfloat16",
            "amx_bf16",
        ),
        # flags present but the measured bf16 is slower (a VM hiding the unit, an old oneDNN): fp32
        (
            ZEN4,
            "auto",
            lambda hw: {"fp32_gflops": 80.0, "bf16_gflops": 8.0},
            "32-true",
            "float32",
            "fp32 is faster",
        ),
        (A100, "auto", never, "bf16-mixed", "bfloat16", "CUDA device with bf16"),
        (A100, "gpu", never, "bf16-mixed", "bfloat16", "CUDA device with bf16"),
        (V100, "auto", never, "32-true", "float32", "without bf16"),
        # a CUDA machine told to train on the CPU decides for its CPU
        (A100, "cpu", never, "32-true", "float32", "emulated"),
    ],
)
def test_auto_precision_per_machine_class(hw, accelerator, probe, want, weights, why):
    d = decide_precision("auto", accelerator, hw=hw, probe=probe)
    assert (d.precision, d.weight_dtype) == (want, weights)
    assert why in d.reason


@pytest.mark.parametrize(
    ("requested", "weights"),
    [
        ("32-true", "float32"),
        ("bf16-mixed", "bfloat16"),
        ("bf16-true", "bfloat16"),
        ("16-mixed", "float32"),
    ],
)
def test_an_explicit_precision_is_kept(requested, weights):
    d = decide_precision(requested, "auto", hw=AVX2, probe=never)
    assert (d.precision, d.weight_dtype) == (requested, weights)
    assert "was set" in d.reason


def test_the_probe_is_measured_once_per_machine_and_cached(tmp_path, monkeypatch):
    calls = []

    def fake(dtypes, *a, **k):
        calls.extend(dtypes)
        return {dt: {torch.float32: 75.0, torch.bfloat16: 0.7}[dt] for dt in dtypes}

    monkeypatch.setattr(hwmod, "_matmul_gflops", fake)
    first = probe_cpu_bf16(tmp_path, ZEN4)
    again = probe_cpu_bf16(tmp_path, ZEN4)
    assert first == again == {"fp32_gflops": 75.0, "bf16_gflops": 0.7}
    assert calls == [torch.float32, torch.bfloat16]  # the second call read the cache
    (entry,) = tmp_path.glob("hardware-*.json")
    assert json.loads(entry.read_text())["cpu_model"] == "AMD EPYC 9004"
    probe_cpu_bf16(tmp_path, SPR)  # another CPU: measured again, its own entry
    assert len(calls) == 4 and len(list(tmp_path.glob("hardware-*.json"))) == 2
    entry.write_text("{broken")  # an unreadable entry is measured again, not an error
    assert probe_cpu_bf16(tmp_path, ZEN4) == first and len(calls) == 6


def test_the_probe_measures_real_matmuls():
    speeds = probe_cpu_bf16(None, hwmod.detect_hardware())
    assert speeds["fp32_gflops"] > 0 and speeds["bf16_gflops"] > 0


def test_an_instruction_set_limit_is_its_own_probe_entry(tmp_path, monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 makes bf16 slow on an AVX512-BF16 CPU: a cached figure of the
    unlimited CPU must not decide for it."""
    speeds = {
        "": {torch.float32: 190.0, torch.bfloat16: 900.0},
        "AVX2": {torch.float32: 60.0, torch.bfloat16: 2.0},
    }
    monkeypatch.setattr(
        hwmod,
        "_matmul_gflops",
        lambda dtypes, *a, **k: {
            dt: speeds[os.environ.get("ONEDNN_MAX_CPU_ISA", "")][dt] for dt in dtypes
        },
    )
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    probe = lambda hw: probe_cpu_bf16(tmp_path, hw)  # noqa: E731
    assert decide_precision("auto", "cpu", hw=ZEN4, probe=probe).precision == "bf16-mixed"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    d = decide_precision("auto", "cpu", hw=ZEN4, probe=probe)
    assert d.precision == "32-true" and "bf16 matmul 2 vs fp32 60" in d.reason
    assert len(list(tmp_path.glob("hardware-*.json"))) == 2


def test_dtype_auto_is_resolved_in_every_component_node():
    cfg = OmegaConf.create(
        {
            "llm": {"name": "hf_causal", "dtype": "auto"},
            "encoder": {"name": "hf_vision", "dtype": "auto"},
            "connector": {"name": "mlp"},
            "branches": {
                "audio": {
                    "encoder": {"name": "whisper", "dtype": "auto"},
                    "connector": {"name": "pool_mlp"},
                }
            },
        }
    )
    run = RunConfig.parse(cfg)
    out = resolve_auto_dtypes(run.model, run.scheduled, run.trainer, "bfloat16")
    dtypes = (out["llm"]["dtype"], out["encoder"]["dtype"], out["branches"]["audio"]["encoder"])
    assert dtypes[:2] == ("bfloat16", "bfloat16") and dtypes[2]["dtype"] == "bfloat16"
    # the run's config (and so its checkpoint) keeps `auto`
    assert cfg.llm.dtype == run.model["llm"]["dtype"] == "auto"
    fixed = ModelConfig({"llm": {"name": "hf_causal", "dtype": "float32"}})
    assert resolve_auto_dtypes(fixed, [], {}, "bfloat16")["llm"]["dtype"] == "float32"


def test_no_shipped_preset_pins_bf16_weights():
    from pathlib import Path

    conf = Path(__file__).resolve().parents[2] / "conf"
    pinned = [
        str(p.relative_to(conf))
        for p in conf.rglob("*.yaml")
        if "bfloat16" in p.read_text() and p.parent.name in ("experiment", "llm", "encoder")
    ]
    assert pinned == []


@pytest.mark.parametrize(
    ("device", "accelerator", "want"),
    [
        (None, "cpu", "cpu"),
        ("cpu", "auto", "cpu"),
        (None, "auto", "cuda:0" if torch.cuda.is_available() else "cpu"),
    ],
)
def test_device_resolution(device, accelerator, want):
    assert str(resolve_device(device, accelerator)) == want


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("tpu", "not a device"),
        ("meta", "only cpu, cuda"),
        ("cuda:x", "not a device"),
        *(
            []
            if torch.cuda.is_available()
            else [("cuda", "CUDA is not available"), ("cuda:1", "CUDA is not available")]
        ),
    ],
)
def test_a_bad_device_names_the_value(device, message):
    with pytest.raises(ConfigError, match=f"device={device}: .*{message}"):
        resolve_device(device, "auto")


def test_trainer_kwargs_follow_the_decision_and_the_device():
    cfg = OmegaConf.create(
        {
            "device": "cpu",
            "trainer": {
                "accelerator": "auto",
                "devices": 1,
                "precision": "auto",
                "enable_progress_bar": True,
            },
        }
    )
    d = decide_precision("auto", "cpu", hw=AVX2, probe=never)
    run = RunConfig.parse(cfg)
    kw = trainer_kwargs(run.trainer, run.device, d, torch.device("cpu"), interactive=False)
    assert kw["precision"] == "32-true" and kw["accelerator"] == "cpu"
    assert kw["enable_progress_bar"] is False  # no terminal: log lines instead
    again = trainer_kwargs(run.trainer, run.device, d, torch.device("cpu"), interactive=True)
    assert again["enable_progress_bar"] is True
