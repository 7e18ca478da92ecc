"""The pictures written by runs and reports: a run's and a sweep's report.html (self-contained,
their numbers from the run's files), attention maps of the Perceiver connectors (recorded rows,
their shapes, the overlay PNG) and ``mmbridge generate ... attention=``."""

from __future__ import annotations

import base64
import io
import json
import os
import re
from pathlib import Path

import pytest
import torch
from helpers import shared_registry
from picture_runs import qformer_run, shared_dir, two_by_two_sweep
from PIL import Image

from mmbridge.errors import ConfigError
from mmbridge.plugins.perceivers.gated_xattn import GatedCrossAttention, GatedXAttnBlock
from mmbridge.plugins.perceivers.qformer import QFormer
from mmbridge.plugins.perceivers.resampler import Resampler
from mmbridge.reporting.attention_maps import feature_grid, overlay, recording
from mmbridge.reporting.report_html import forest_chart, nice_ticks
from mmbridge.reporting.run_report import GALLERY_EACH
from mmbridge.reporting.sweep_report import exact_match_interval

# the tiny run is trained once per session (tests/picture_runs.py); xdist keeps these together
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.xdist_group("pictures")]


@pytest.fixture(scope="module")
def picture_run(tmp_path_factory) -> Path:
    """The session's tiny Q-Former run (tests/picture_runs.py), trained once."""
    return qformer_run(shared_dir(tmp_path_factory))


@pytest.fixture(scope="module")
def picture_sweep(tmp_path_factory) -> Path:
    return two_by_two_sweep(shared_dir(tmp_path_factory))


def data_images(html: str) -> list[Image.Image]:
    """Every ``<img>`` of a page, decoded; fails on any source that is not a PNG data URI."""
    out = []
    for src in re.findall(r'<img[^>]* src="([^"]*)"', html):
        assert src.startswith("data:image/png;base64,"), src[:60]
        out.append(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))
    return out


def test_nice_ticks_and_forest_chart_values():
    assert nice_ticks(0.0, 1.0) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(5.8, 7.1) == pytest.approx([5.5, 6.0, 6.5, 7.0, 7.5])
    svg = forest_chart([("b", 0.25, 0.1, 0.4, True), ("c", -0.1, -0.3, 0.1, False)], "t", "x")
    assert svg.count("<circle") == 2 and 'fill="white"' in svg  # the second one is open
    assert "+0.250 [+0.100, +0.400]" in svg


# -- attention recording -------------------------------------------------------------------
@pytest.mark.parametrize("cls", [QFormer, Resampler])
def test_recording_changes_nothing_and_rows_sum_to_one(cls, tmp_path):
    torch.manual_seed(0)
    x, mask = torch.randn(2, 16, 8), torch.ones(2, 16, dtype=torch.bool)
    mask[1, 12:] = False  # padded features get no weight
    c = cls.for_testing(tmp_path, 8, 12).eval()
    plain, _ = c(x, mask)
    c.record_attention = True
    recorded, _ = c(x, mask)
    c.record_attention = False
    assert torch.equal(plain, recorded)  # recording is read-only
    queries = c.num_queries if cls is QFormer else c.num_latents
    extra = 0 if cls is QFormer else queries  # the resampler's keys are [features; latents]
    for w in c.layer_attention():
        assert w.shape == (2, queries, 16 + extra)
        assert torch.allclose(w.sum(-1), torch.ones(2, queries), atol=1e-5)
    maps = c.attention_maps()
    assert maps.shape == (2, queries, 16)
    assert torch.allclose(maps.sum(-1), torch.ones(2, queries), atol=1e-5)
    assert maps[1, :, 12:].abs().max() == 0
    c(x, mask)  # off: nothing new is recorded
    assert torch.equal(c.attention_maps(), maps)


def test_gated_xattn_text_tokens_read_the_patches(tmp_path):
    torch.manual_seed(0)
    c = GatedCrossAttention.for_testing(tmp_path, 8, 16).eval()
    for key in ("0", "1"):  # two blocks, as attach() makes for a 2-layer LLM
        c.blocks[key] = GatedXAttnBlock(*c._block_args)
    c.record_attention = True
    media, mmask = c(torch.randn(1, 9, 8), torch.ones(1, 9, dtype=torch.bool))
    c.set_context(media, mmask)
    text = torch.randn(1, 5, 16)
    for key in ("0", "1"):
        c._hook(c.blocks[key])(torch.nn.Identity(), (text,), {})
    c.record_attention = False
    assert c.text_attention().shape == (1, 5, c.num_latents)
    maps = c.attention_maps()
    assert maps.shape == (1, 5, 9)
    assert torch.allclose(maps.sum(-1), torch.ones(1, 5), atol=1e-5)


def test_overlay_size_and_grid():
    img = Image.new("RGB", (50, 40), "red")
    maps = torch.softmax(torch.randn(4, 17), -1)
    sheet = overlay(img, maps, feature_grid(None, 17), size=64, cols=3)
    # panels: the image, the mean, 4 queries = 6 -> 3 columns x 2 rows of 64 + 16 px caption
    assert sheet.size == (3 * 64, 2 * (64 + 16))
    assert feature_grid(None, 17) == (4, 4, 1) and feature_grid(None, 64) == (8, 8, 0)
    with pytest.raises(ConfigError, match="no square"):
        feature_grid(None, 7)
    # the brightest patch of a one-hot map lands where it should: query 0 looks at patch (0, 0)
    one_hot = torch.zeros(1, 17)
    one_hot[0, 1] = 1.0
    panel = overlay(img, one_hot, (4, 4, 1), size=64, cols=3).crop((128, 16, 192, 80))
    px = panel.convert("L")
    assert px.getpixel((2, 2)) > px.getpixel((60, 60))


# -- run report ----------------------------------------------------------------------------
@pytest.mark.slow  # the shared tiny training (about 35-60 s on 2 busy cores)
def test_run_report_numbers_gallery_and_attention(tmp_path, picture_run):
    run = picture_run
    metrics = json.loads((run / "metrics.json").read_text())
    preds = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    media = [p for p in preds if p["mode"] == "media"]
    from mmbridge.commands.report import main

    assert main([str(run), "--out", str(tmp_path)]) == 0
    html = (tmp_path / "report.html").read_text()
    # self-contained: nothing to fetch (the SVG namespace is a name, not a download)
    assert not re.search(r"https?://", html.replace('xmlns="http://www.w3.org/2000/svg"', ""))
    assert html.count("<svg") == len(metrics["stages"]) + 1  # a curve per stage, the bars
    test = metrics["test"]
    for key in ("exact_match", "no_media/exact_match", "chance/exact_match"):
        assert f"{test[key]:.3f}" in html
    right = min(GALLERY_EACH, sum(p["correct"] for p in media))
    wrong = min(GALLERY_EACH, sum(not p["correct"] for p in media))
    assert html.count('class="card ok"') == right and html.count('class="card bad"') == wrong
    assert f"{right} answered right (green), {wrong} wrong (red), of {len(media)}" in html
    thumbs = data_images(html)
    assert len(thumbs) == right + wrong and all(t.size == (64, 64) for t in thumbs)
    # the run itself wrote its report, with the Q-Former's maps drawn by its model
    own = (run / "report.html").read_text()
    assert 'id="attention"' in own
    sheets = [i for i in data_images(own) if i.size[0] > 160]
    assert sheets and sheets[0].size == (6 * 128, 2 * (128 + 16))  # image, mean, 8 queries


@pytest.mark.slow  # the shared tiny training (about 35-60 s on 2 busy cores)
def test_generate_writes_the_attention_map_of_a_photograph(tmp_path, capsys, picture_run):
    """The Q-Former's queries over a real photograph (scikit-image's astronaut, offline); with
    MMBRIDGE_SCREENSHOTS=DIR the sheet is kept there as attention_qformer.png (for the docs)."""
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (the `data` extra)")
    from mmbridge.commands.generate import main

    run = picture_run
    image = tmp_path / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(image)
    keep = os.environ.get("MMBRIDGE_SCREENSHOTS")
    out = Path(keep) / "attention_qformer.png" if keep else tmp_path / "attention.png"
    assert (
        main(
            [
                f"checkpoint={run / 'checkpoints' / 'final'}",
                f"image={image}",
                "prompt=What is in the image?",
                "max_new_tokens=2",
                "device=cpu",
                f"attention={out}",
            ]
        )
        == 0
    )
    assert f"wrote {out}" in capsys.readouterr().err
    with Image.open(out) as sheet:
        # image, the mean, 8 queries: 10 panels of 128 px in rows of 6, 16 px captions
        assert sheet.format == "PNG" and sheet.size == (6 * 128, 2 * (128 + 16))
        first = sheet.convert("RGB").crop((0, 16, 128, 144))
    with Image.open(image) as photo:  # the first panel is the photograph itself
        ref = photo.convert("RGB").resize((128, 128), Image.Resampling.BICUBIC)
    assert list(first.getdata()) == list(ref.getdata())
    with pytest.raises(ConfigError, match="needs image"):
        main([f"checkpoint={run / 'checkpoints' / 'final'}", "prompt=x", f"attention={out}"])


@pytest.mark.slow  # the shared tiny training (about 35-60 s on 2 busy cores)
def test_sweep_report_table_forest_curves_and_disagreements(picture_sweep):
    from mmbridge.reporting.tables import write_report

    root = picture_sweep
    report = write_report(root, baseline=["+variant=a"], n_resamples=200)
    html = (root / "report.html").read_text()
    assert root / "report.html" in report.files
    assert "4 runs in 2 configurations" in html
    comps = report.comparisons[report.rows[1].config]
    (comp,) = [c for c in comps if c.metric == "test/exact_match"]
    assert f"{comp.diff:+.3f} [{comp.low:+.3f}, {comp.high:+.3f}]" in html  # table and forest plot
    assert 'id="forest"' in html and 'id="curves"' in html
    # each configuration's own 95 % interval around its exact match (from its predictions)
    for row in report.rows:  # seeded: the page's interval is the one computed here
        mean, low, high = exact_match_interval(row)
        assert low <= mean <= high and mean == pytest.approx(row.mean["test/exact_match"])
        assert f"[{low:.3f}, {high:.3f}]" in html
    n = sum(
        json.loads(x)["mode"] == "media"
        for x in (root / "variant=a,seed=0" / "predictions.jsonl").read_text().splitlines()
    )
    assert f"2 of {n} held-out questions are answered right by some configurations" in html
    assert html.count('class="card"') == 2
    assert all(i.size[0] == 64 for i in data_images(html))


def test_gate_section_means_per_question_type():
    from mmbridge.reporting.run_report import gate_section

    def pred(mode: str, qtype: str, gate: list[float]) -> dict:
        return {"mode": mode, "qtype": qtype, "prefix": {"mode": "gate", "gate": gate}}

    preds = [
        pred("media", "colour", [0.5, 0.3, 0.2]),
        pred("media", "colour", [0.1, 0.1, 0.8]),
        pred("media", "count", [0.2, 0.2, 0.6]),
        pred("no_media", "count", [1.0, 0.0, 0.0]),
    ]
    html = gate_section(preds)
    # colour: level 1 mean 0.30, level 3 mean 0.50; count: 0.20 / 0.60 (no-media rows left out)
    assert "level 1 colour: 0.300" in html and "level 3 colour: 0.500" in html
    assert "level 1 count: 0.200" in html and "level 3 count: 0.600" in html
    assert gate_section([{"mode": "media", "qtype": "x"}]) == ""


def test_gallery_cards_without_a_picture_say_what_the_question_had():
    from mmbridge.reporting.run_report import gallery_section

    html = gallery_section(
        [
            {
                "mode": "media",
                "id": "a",
                "qtype": "asr",
                "question": "<audio>\nWhat is said?",
                "answer": "hello",
                "prediction": "hello",
                "correct": True,
                "media": {"audio": "/data/clips/0001.wav"},
            },
            {
                "mode": "media",
                "id": "b",
                "qtype": "colour",
                "question": "<image>\nColour?",
                "answer": "red",
                "prediction": "",
                "correct": False,
                "media": {"image": "/nowhere/gone.png"},
            },
        ]
    )
    assert "(audio: 0001.wav)" in html and "(image not found)" in html
    assert "prediction: <b>(empty)</b>" in html and html.count("<img") == 0


@pytest.mark.parametrize("connector", ["resampler", "gated_xattn"])
def test_recording_through_generation_leaves_the_answer_unchanged(connector, tmp_path):
    """Through the real tiny model and its generate loop (gated cross-attention: the blocks run
    as hooks of the LLM's layers, once for the prompt, then once per new token)."""
    from mmbridge.config import compose
    from mmbridge.contracts.types import Sample
    from mmbridge.data.batcher import Batcher
    from mmbridge.data.chat import ChatEncoder
    from mmbridge.model import assemble
    from mmbridge.testing.tiny import build_tiny_llama

    build_tiny_llama(tmp_path / "llm", seed=0)
    registry = shared_registry()
    cfg = compose(
        [
            "experiment=tiny",
            f"connector={connector}",
            f"llm.path={tmp_path / 'llm'}",
            "connector.num_latents=4",
            "connector.hidden_dim=32",
            "connector.depth=1",
        ],
        registry,
    )
    torch.manual_seed(0)
    model = assemble(cfg, registry).eval()
    image = tmp_path / "red.png"
    Image.new("RGB", (64, 64), "red").save(image)
    sample = Sample("s", {"image": str(image)}, [{"from": "human", "value": "<image>\nWhat?"}])
    chat = ChatEncoder(model.llm.tokenizer, list(model.branches), max_length=256)
    batch = Batcher.from_model(model, chat).batch([sample], generation=True)
    plain = model.generate(batch, max_new_tokens=3)
    with recording(model) as rec:
        again = model.generate(batch, max_new_tokens=3)
    assert torch.equal(plain, again)
    maps = rec.attention_maps()[0]
    assert maps.shape[-1] == 64  # the tiny ViT's 8 x 8 patches
    assert torch.allclose(maps.sum(-1), torch.ones(len(maps)), atol=1e-5)
    if connector == "gated_xattn":  # one row per text token: the prompt, then the new tokens
        prompt = int(batch["attention_mask"].shape[1])
        assert len(maps) == prompt + again.shape[1] - 1, (len(maps), prompt, again.shape)
    else:
        assert len(maps) == 4
    assert feature_grid(model, 64) == (8, 8, 0)
