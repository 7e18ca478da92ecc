"""Trained models leave mmbridge: bundle, PEFT and Hugging Face Llava exports, and the Python API.

Checkpoints are made the way a run writes them (assembled from the composed config, each
stage's ``configure_trainable``, ``save_checkpoint``), with their trained tensors set to seeded
random values so that every part (connector, LoRA, prefix) changes the answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_checkpoint, shared_registry
from safetensors.torch import load_file

import mmbridge
from mmbridge.errors import CheckpointError, ConfigError
from mmbridge.export import export
from mmbridge.plugins.encoders._image import example_png
from mmbridge.testing.tiny import build_tiny_clip_vision, build_tiny_dinov2

TINY = [
    "experiment=tiny",
    "encoder.image_size=32",
    "stages.instruct.train.llm=lora",
    "stages.instruct.lora.dropout=0.0",
]
PROMPT = "What colour is the shape?"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    return example_png(tmp_path_factory.mktemp("media"), 1)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """timm tiny ViT -> MLP -> tiny Llama with LoRA (experiment=tiny)."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "final", TINY)


@pytest.fixture(scope="module")
def tiny_bundle(tiny_ckpt, tmp_path_factory) -> Path:
    return export(
        tiny_ckpt,
        tmp_path_factory.mktemp("exp") / "bundle",
        format="bundle",
        registry=shared_registry(),
    )


# -- bundle ---------------------------------------------------------------------------------------


def test_bundle_holds_every_weight_the_files_and_the_versions(tiny_bundle):
    manifest = json.loads((tiny_bundle / "mmbridge.json").read_text())
    assert manifest["format"] == "bundle" and manifest["mmbridge"] == mmbridge.__version__
    assert manifest["components"]["llm"]["package"] == "mmbridge"
    assert manifest["components"]["connector"]["name"] == "mlp"
    assert manifest["files"] == {
        "llm.path": "files/llm.path"
    }  # the timm ViT is random-init: no file
    assert (tiny_bundle / "files/llm.path/tokenizer.json").is_file()
    weights = load_file(str(tiny_bundle / "weights.safetensors"))
    # frozen encoder and LLM base weights are inside, beside the trained connector and LoRA
    assert any(k.startswith("branches.image.encoder.") for k in weights)
    assert any(".base_layer." in k for k in weights) and any("lora_A" in k for k in weights)
    assert "path: files/llm.path" in (tiny_bundle / "config.yaml").read_text()
    card = (tiny_bundle / "README.md").read_text()
    assert "## Components" in card and "mmbridge.load(" in card and "| connector | mlp |" in card


def test_bundle_loads_with_identical_logits_and_answers(tiny_ckpt, tiny_bundle, image):
    a = mmbridge.load(tiny_ckpt, device="cpu", registry=shared_registry())
    b = mmbridge.load(tiny_bundle, device="cpu", registry=shared_registry())
    la, _ = a.logits(PROMPT, image=image)
    lb, _ = b.logits(PROMPT, image=image)
    assert torch.equal(la, lb)
    assert a.generate(PROMPT, image=image, max_new_tokens=8) == b.generate(
        PROMPT, image=image, max_new_tokens=8
    )


# -- bundle round trips of every model family ------------------------------------------------------

# Small sizes of each family's component (the defaults are sized for the CPU quickstart).
QFORMER = [
    "connector=qformer",
    "connector.num_queries=4",
    "connector.hidden_dim=32",
    "connector.num_layers=1",
]
XATTN = [
    "connector=gated_xattn",
    "connector.num_latents=4",
    "connector.hidden_dim=32",
    "connector.depth=1",
    "connector.every=1",
]  # a cross-attention block before every decoder layer


def family_overrides(name: str, whisper: str) -> tuple[list[str], tuple[str, ...]]:
    """The overrides of one model family (on the tiny Llama with LoRA) and the media it takes."""
    audio_only = [*TINY[:1], *TINY[2:]]  # no encoder.image_size: the encoder is Whisper
    return {
        "converter": (TINY, ("image",)),  # timm ViT -> MLP
        "qformer": ([*TINY, *QFORMER], ("image",)),
        "gated_xattn": ([*TINY, *XATTN], ("image",)),
        # a 1-layer random Whisper saved as an openai-whisper file (encoder.checkpoint: a file)
        "audio": (
            [
                *audio_only,
                "encoder=whisper_tiny",
                f"encoder.checkpoint={whisper}",
                "connector=window_qformer",
                "connector.hidden_dim=32",
                "connector.depth=1",
            ],
            ("audio",),
        ),
        "image+audio": (
            [
                *TINY,
                "+branches.audio.encoder.name=whisper",
                f"+branches.audio.encoder.checkpoint={whisper}",
                "+branches.audio.connector.name=pool_mlp",
                "+branches.audio.connector.stride=8",
            ],
            ("image", "audio"),
        ),
        # AlignGPT: level indicators (align stage) and the gate over them (instruct stage)
        "aligngpt": (
            [*TINY, "experiment=aligngpt", "alignment.levels=4", "alignment.gate_hidden=16"],
            ("image",),
        ),
    }[name]


FAMILIES = ("converter", "qformer", "gated_xattn", "audio", "image+audio", "aligngpt")


class Family:
    """One family's checkpoint, its bundle and the media of its prompt."""

    def __init__(self, name: str, ckpt: Path, bundle: Path, media: dict[str, str]) -> None:
        self.name, self.ckpt, self.bundle, self.media = name, ckpt, bundle, media


@pytest.fixture(scope="module")
def families(tiny_ckpt, tiny_bundle, image, tmp_path_factory):
    """Builds each family's checkpoint and bundle once, on first use."""
    from mmbridge.plugins.encoders.whisper_encoder import WhisperEncoder

    root = tmp_path_factory.mktemp("families")
    whisper = WhisperEncoder.for_testing(root)
    files = {"image": image, "audio": whisper.example_media(root, 1)}
    made = {"converter": Family("converter", tiny_ckpt, tiny_bundle, {"image": image})}

    def get(name: str) -> Family:
        if name not in made:
            overrides, media = family_overrides(name, str(whisper.path))
            ckpt = make_checkpoint(root / name / "final", overrides)
            bundle = export(
                ckpt, root / name / "bundle", format="bundle", registry=shared_registry()
            )
            made[name] = Family(name, ckpt, bundle, {m: files[m] for m in media})
        return made[name]

    return get


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_bundle_reloads_with_identical_logits(families, name):
    f = families(name)
    manifest = json.loads((f.bundle / "mmbridge.json").read_text())
    # each model file the config named is inside: the tiny Llama's directory, Whisper's file
    whisper = {
        "audio": ["encoder.checkpoint"],
        "image+audio": ["branches.audio.encoder.checkpoint"],
    }
    assert sorted(manifest["files"]) == sorted(["llm.path", *whisper.get(name, [])])
    assert all((f.bundle / rel).exists() for rel in manifest["files"].values())
    a = mmbridge.load(f.ckpt, device="cpu", registry=shared_registry())
    b = mmbridge.load(f.bundle, device="cpu", registry=shared_registry())
    assert sorted(b.modalities) == sorted(f.media)
    la, _ = a.logits(PROMPT, **f.media)
    lb, _ = b.logits(PROMPT, **f.media)
    print(f"bundle {name}: logits {tuple(la.shape)} max |diff| {(la - lb).abs().max().item():.3g}")
    assert torch.equal(la, lb)
    assert a.generate(PROMPT, max_new_tokens=6, **f.media) == b.generate(
        PROMPT, max_new_tokens=6, **f.media
    )


LOAD_ALL = """\
import json, sys, traceback, torch, mmbridge
# as the test process: a reduction split over more threads rounds differently
torch.set_num_threads(1)
out = {}
for name, bundle, media, prompt, dst in json.loads(sys.argv[1]):
    try:
        m = mmbridge.load(bundle, device="cpu")
        torch.save(m.logits(prompt, **media)[0], dst)
        out[name] = m.generate(prompt, max_new_tokens=6, **media)
    except Exception:
        out[name] = "ERROR " + traceback.format_exc()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def fresh_process(families, tmp_path_factory, request):
    """The selected families' bundles loaded in one fresh process (one interpreter start for
    all) with an empty MMBRIDGE_CACHE and an empty Hugging Face cache, offline, third-party
    plugins off, run from an unrelated directory: ``(answers, logits file, the run's root)``."""
    test = test_every_family_bundle_loads_in_a_fresh_process_with_an_empty_cache.__name__
    wanted = {
        item.callspec.params["name"] for item in request.session.items if item.originalname == test
    }
    root = tmp_path_factory.mktemp("fresh")
    jobs = [
        (f.name, str(f.bundle), f.media, PROMPT, str(root / f"{i}.pt"))
        for i, f in enumerate(families(n) for n in FAMILIES if n in wanted)
    ]
    env = {
        **os.environ,
        "MMBRIDGE_CACHE": str(root / "empty-cache"),
        "HF_HOME": str(root / "empty-hf"),
        "HF_HUB_OFFLINE": "1",
        "MMBRIDGE_DISABLE_PLUGINS": "1",
    }
    (root / "load.py").write_text(LOAD_ALL)
    out = subprocess.run(
        [sys.executable, str(root / "load.py"), json.dumps(jobs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=root,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    answers = json.loads(out.stdout.strip().splitlines()[-1])
    return answers, {name: Path(dst) for name, _, _, _, dst in jobs}, root


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_bundle_loads_in_a_fresh_process_with_an_empty_cache(
    families, fresh_process, name
):
    """No asset cache, no data, no hub cache: the bundle alone gives the checkpoint's logits."""
    answers, logits, root = fresh_process
    assert not answers[name].startswith("ERROR"), answers[name]
    assert not (root / "empty-cache" / "assets").exists()  # nothing was converted
    f = families(name)
    want = mmbridge.load(f.ckpt, device="cpu", registry=shared_registry())
    got = torch.load(logits[name])
    print(
        f"bundle {name} in a fresh process: max |diff| "
        f"{(got - want.logits(PROMPT, **f.media)[0]).abs().max():.3g}"
    )
    assert torch.equal(got, want.logits(PROMPT, **f.media)[0])
    assert answers[name] == want.generate(PROMPT, max_new_tokens=6, **f.media)


def test_a_bundle_whose_plugin_is_missing_names_the_package(tiny_bundle, tmp_path):
    import shutil

    copy = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    manifest = json.loads((copy / "mmbridge.json").read_text())
    manifest["components"]["connector"].update(
        name="fancy", plugin="fancy_plugin", package="mmbridge-fancy", version="2.0"
    )
    (copy / "mmbridge.json").write_text(json.dumps(manifest))
    with pytest.raises(
        CheckpointError, match=r"connector: connector 'fancy'.*pip install mmbridge-fancy"
    ):
        mmbridge.load(copy, device="cpu", registry=shared_registry())


# -- the Python API -------------------------------------------------------------------------------


def test_generate_batches_and_chat_answer_like_single_prompts(tiny_ckpt, image, tmp_path):
    m = mmbridge.load(tiny_ckpt, device="cpu", registry=shared_registry())
    other = example_png(tmp_path, 2)
    one = m.generate(PROMPT, image=image, max_new_tokens=6)
    two = m.generate(PROMPT, image=other, max_new_tokens=6)
    assert isinstance(one, str)
    assert m.generate([PROMPT, PROMPT], image=[image, other], max_new_tokens=6) == [one, two]
    assert m.chat([{"role": "user", "content": PROMPT}], image=image, max_new_tokens=6) == one
    assert m.chat(
        [[{"role": "user", "content": PROMPT}]] * 2, image=[image, other], max_new_tokens=6
    ) == [one, two]
    with pytest.raises(ConfigError, match="no audio encoder; it takes: image"):
        m.generate(PROMPT, audio=image)
    with pytest.raises(ConfigError, match="2 files for a batch of 3 prompts"):
        m.generate([PROMPT] * 3, image=[image, other])


def test_generate_equals_the_generate_command(tiny_ckpt, image, capsys):
    from mmbridge.commands.generate import main

    assert (
        main([f"checkpoint={tiny_ckpt}", f"image={image}", f"prompt={PROMPT}", "device=cpu"]) == 0
    )
    cli = capsys.readouterr().out.strip()
    assert (
        mmbridge.load(tiny_ckpt, device="cpu", registry=shared_registry()).generate(
            PROMPT, image=image
        )
        == cli
    )


# -- peft -----------------------------------------------------------------------------------------


def test_peft_adapters_load_with_peft_and_give_identical_logits(tiny_ckpt, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = export(tiny_ckpt, tmp_path / "peft", format="peft", registry=shared_registry())
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "mmbridge_weights.safetensors",
        "mmbridge.json",
        "README.md",
    } <= {p.name for p in out.iterdir()}
    manifest = json.loads((out / "mmbridge.json").read_text())
    assert manifest["adapter"]["r"] == 16 and manifest["base_model"] == "tiny-llama"
    extra = load_file(str(out / "mmbridge_weights.safetensors"))
    assert extra and all(k.startswith("branches.image.connector.") for k in extra)

    m = mmbridge.load(tiny_ckpt, device="cpu", registry=shared_registry())
    llm = m.session.model.llm
    assert torch.equal(
        extra["branches.image.connector.net.0.weight"],
        m.session.model.branches["image"].connector.net[0].weight,
    )

    def base():
        return AutoModelForCausalLM.from_pretrained(
            llm.local_path, dtype=torch.float32, attn_implementation=llm.attn_implementation
        )

    peft = PeftModel.from_pretrained(base(), str(out)).eval()
    assert (
        json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
        == "tiny-llama"
    )
    ids = torch.tensor([llm.tokenizer("Which shape is red? The circle.")["input_ids"]])
    with torch.no_grad():
        want = llm.model(input_ids=ids).logits
        got = peft(input_ids=ids).logits
        plain = base()(input_ids=ids).logits
    print(f"peft round trip: logits max |diff| {(got - want).abs().max().item():.3g}")
    assert torch.equal(got, want)
    assert not torch.allclose(plain, want, atol=1e-3)  # the adapters do change the LLM


def test_peft_needs_lora(tmp_path):
    ckpt = make_checkpoint(tmp_path / "full", ["experiment=tiny", "encoder.image_size=32"])
    with pytest.raises(
        ConfigError, match="format=peft: the LLM .* carries no LoRA adapters.*format=bundle"
    ):
        export(ckpt, tmp_path / "out", format="peft", registry=shared_registry())
    assert not (tmp_path / "out").exists()


# -- Hugging Face Llava ---------------------------------------------------------------------------


def hf_overrides(tower: Path, *extra: str) -> list[str]:
    return [
        *TINY,
        "encoder=dinov2_small",
        f"encoder.path={tower}",
        "encoder.pool_to=null",
        "encoder.image_size=null",
        "encoder.dtype=float32",
        *extra,
    ]


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("towers")
    build_tiny_clip_vision(root / "clip")
    build_tiny_dinov2(root / "dinov2")
    return {"clip": root / "clip", "dinov2": root / "dinov2"}


@pytest.mark.parametrize(
    "tower,extra",
    [
        ("clip", ["encoder.feature_layer=-2", "connector=mlp"]),  # LLaVA-1.5's choice: penultimate
        ("clip", ["encoder.feature_layer=-1", "connector=linear", "encoder.drop_cls=false"]),
        ("dinov2", ["encoder.feature_layer=[1,0]", "connector=mlp"]),  # two layers concatenated
    ],
)
def test_hf_llava_gives_the_same_logits_and_greedy_answer(towers, tower, extra, image, tmp_path):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    ckpt = make_checkpoint(tmp_path / "final", hf_overrides(towers[tower], *extra))
    out = export(ckpt, tmp_path / "hf", format="hf", registry=shared_registry())
    m = mmbridge.load(ckpt, device="cpu", registry=shared_registry())
    enc = m.session.model.branches["image"].encoder
    # an image of the size the tower's processor resizes to: resizing is then the identity in
    # both of transformers' backends (see below for other sizes)
    side = enc.resize_shortest or enc.size[0]
    raw_image = Image.open(image).convert("RGB").resize((side, side), Image.Resampling.BICUBIC)

    # the llava-hf model card's pattern, unmodified: content parts, the default AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(str(out), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(out))
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}
    ]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=raw_image, text=prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = processor.decode(output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert answer.strip() == m.generate(PROMPT, image=raw_image, max_new_tokens=8)
    want, mask = m.logits(PROMPT, image=raw_image)
    batch = m.encode([[{"from": "human", "value": f"<image>\n{PROMPT}"}]], [{"image": image}])
    ids = torch.where(batch["slots"]["image"], model.config.image_token_id, batch["input_ids"])
    assert torch.equal(inputs["input_ids"], ids)  # the same tokens, the image slots in place
    # a string content with <image> renders as the content parts do
    assert (
        processor.apply_chat_template(
            [{"role": "user", "content": f"<image>\n{PROMPT}"}], add_generation_prompt=True
        )
        == prompt
    )
    with torch.no_grad():
        got = model(**inputs).logits[..., : want.shape[-1]]
    diff = (got - want).abs().max().item()
    print(f"hf export {tower} {extra}: logits max |diff| {diff:.3g}")
    assert diff <= 1e-4

    # any other size: backend="pil" gives mmbridge's pixels exactly; the default (torchvision)
    # backend's bicubic resize differs from PIL's by up to one 8-bit level
    other = Image.open(image).convert("RGB")
    mine = enc.preprocess(other)
    pil = AutoProcessor.from_pretrained(str(out), backend="pil")(
        images=other, text=prompt, return_tensors="pt"
    )
    assert (pil["pixel_values"][0] - mine).abs().max().item() <= 1e-6
    default = processor(images=other, text=prompt, return_tensors="pt")["pixel_values"][0]
    assert (default - mine).abs().max().item() <= 1.01 / 255 / min(enc.std)
    manifest = json.loads((out / "mmbridge.json").read_text())
    assert (
        manifest["lora_merged"] is True
        and manifest["architecture"] == "LlavaForConditionalGeneration"
    )


@pytest.mark.parametrize(
    "extra,match",
    [
        ([], r"encoder 'timm' \(TimmEncoder\) has no Llava vision tower"),
        (["HF", "encoder.pool_to=2"], r"encoder.pool_to=2 pools the patch grid"),
        (
            ["HF", "encoder.feature_layer=[1,0]", "encoder.normalize_layers=true"],
            r"encoder.normalize_layers=true standardises each layer's features",
        ),
        (
            ["HF", "encoder.feature_layer=-1"],
            r"encoder.feature_layer=-1 of Dinov2Model is the final layer norm",
        ),
        (["HF", "encoder.feature_layer=1", "connector=qformer"], r"connector 'qformer' \(QFormer"),
        (
            ["HF", "encoder.feature_layer=1", "connector=mlp", "connector.depth=3"],
            r"connector 'mlp' \(depth=3",
        ),
        (["HF", "encoder.feature_layer=1", "alignment=aligngpt"], r"alignment 'aligngpt'"),
        (
            ["HF", "encoder.feature_layer=1", "encoder.image_aspect_ratio=pad"],
            r"encoder.image_aspect_ratio=pad pads the image to a square",
        ),
    ],
)
def test_hf_refuses_what_llava_cannot_represent(towers, extra, match, tmp_path):
    overrides = hf_overrides(towers["dinov2"], *extra[1:]) if extra[:1] == ["HF"] else TINY
    schedule = ("align", "instruct")
    ckpt = make_checkpoint(tmp_path / "final", overrides, schedule)
    with pytest.raises(ConfigError, match=match) as err:
        export(ckpt, tmp_path / "hf", format="hf", registry=shared_registry())
    assert "Use format=bundle" in str(err.value)
    assert not (tmp_path / "hf").exists()


def test_the_hf_export_asks_components_not_their_classes():
    """Core reads each part through the llava_parts() capability: no plugin class name and no
    private attribute of a component in the exporter."""
    import re

    import mmbridge.export.hf as hf

    source = Path(hf.__file__).read_text()
    assert not re.search(
        r"HFVisionEncoder|MLPConverter|LinearConverter|HFCausalLM|_lora\b|\._extra|"
        r"\.net\[|\.proj\b",
        source,
    )
