"""Perceiver connectors (qformer, resampler, gated_xattn) and the abstractor converter.

Real modules throughout: the Q-Former and the Llama used by the gated cross-attention tests are
saved with ``save_pretrained`` and loaded back through the code a user's run takes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmbridge.errors import ConfigError
from mmbridge.plugins.converters.abstractor import Abstractor, masked_adaptive_pool
from mmbridge.plugins.perceivers._attention import num_parameters
from mmbridge.plugins.perceivers.gated_xattn import GatedCrossAttention
from mmbridge.plugins.perceivers.qformer import QUERY_TOKENS_FILE, QFormer
from mmbridge.plugins.perceivers.resampler import Resampler

IN, OUT = 12, 20


def make(name: str, tmp_path, **kwargs):
    cls = {
        "qformer": QFormer,
        "resampler": Resampler,
        "gated_xattn": GatedCrossAttention,
        "abstractor": Abstractor,
    }[name]
    torch.manual_seed(0)
    if kwargs:
        return cls(IN, OUT, **kwargs).eval()
    return cls.for_testing(tmp_path, IN, OUT).eval()


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("qformer", {"num_queries": 5, "hidden_dim": 16, "num_heads": 2}, {3: 5, 16: 5, 40: 5}),
        ("resampler", {"num_latents": 6, "hidden_dim": 16, "num_heads": 2}, {3: 6, 16: 6, 40: 6}),
        # 16 = 4x4 grid -> 2x2; 9 = 3x3 -> 2x2; 1 -> 1; sequences of 3 and 10 -> min(4, N)
        ("abstractor", {"num_tokens": 4, "hidden_dim": 8}, {1: 1, 3: 3, 9: 4, 10: 4, 16: 4}),
        ("abstractor", {"num_tokens": 16, "hidden_dim": 8}, {4: 4, 9: 9, 10: 10, 36: 16, 50: 16}),
    ],
)
def test_out_tokens_match_forward(name, kwargs, expected, tmp_path):
    conn = make(name, tmp_path, **kwargs)
    for n, m in expected.items():
        assert conn.out_tokens(n) == m
        tokens, mask = conn(torch.randn(2, n, IN), torch.ones(2, n, dtype=torch.bool))
        assert tokens.shape == (2, m, OUT) and mask.shape == (2, m) and mask.all()
        assert torch.isfinite(tokens).all()


def test_gated_xattn_takes_no_slots_but_yields_latents(tmp_path):
    conn = make("gated_xattn", tmp_path)
    assert conn.in_sequence is False and conn.out_tokens(10) == 0 and conn.num_latents == 4
    tokens, mask = conn(torch.randn(2, 10, IN), torch.ones(2, 10, dtype=torch.bool))
    assert tokens.shape == (2, 4, OUT) and mask.all()


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("qformer", {}),
        ("resampler", {}),
        ("gated_xattn", {}),
        ("abstractor", {"num_tokens": 4, "hidden_dim": 8, "depth": 2, "layout": "sequence"}),
        ("abstractor", {"num_tokens": 16, "hidden_dim": 8, "layout": "sequence"}),  # fewer than 16
    ],
)
def test_padding_never_leaks(name, kwargs, tmp_path):
    """A sample alone == the same sample right-padded in a batch, even with NaN padding."""
    conn = make(name, tmp_path, **kwargs)
    torch.manual_seed(1)
    n, total = 7, 12
    alone = torch.randn(1, n, IN)
    batch = torch.randn(2, total, IN)
    batch[0, :n] = alone[0]
    batch[0, n:] = float("nan")
    mask = torch.ones(2, total, dtype=torch.bool)
    mask[0, n:] = False
    ref, ref_mask = conn(alone, torch.ones(1, n, dtype=torch.bool))
    out, out_mask = conn(batch, mask)
    m = ref.shape[1]
    assert out_mask[0, :m].equal(ref_mask[0]) and not out_mask[0, m:].any()
    torch.testing.assert_close(out[0, :m], ref[0], atol=1e-5, rtol=0)
    assert torch.isfinite(out[1]).all() and out_mask[1].all()


def test_sample_without_features_is_masked_not_nan(tmp_path):
    for name in ("qformer", "resampler", "abstractor"):
        conn = make(name, tmp_path)
        mask = torch.ones(2, 9, dtype=torch.bool)
        mask[1] = False
        tokens, out_mask = conn(torch.randn(2, 9, IN), mask)
        assert torch.isfinite(tokens).all(), name
        assert out_mask[0].all() and not out_mask[1].any(), name


# -- abstractor's pooling ------------------------------------------------------------------


def test_grid_pool_recovers_quadrant_constants():
    grid = torch.zeros(4, 4, 3)
    consts = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    for i in range(2):
        for j in range(2):
            grid[2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = consts[i, j] * torch.tensor(
                [1.0, -1.0, 10.0]
            )
    pooled, mask = masked_adaptive_pool(
        grid.reshape(1, 16, 3), torch.ones(1, 16, dtype=torch.bool), num_tokens=4, grid=True
    )
    assert mask.all()
    expected = consts.reshape(4, 1) * torch.tensor([1.0, -1.0, 10.0])
    assert torch.equal(pooled[0], expected)


def test_pool_matches_torch_adaptive_pooling_on_full_masks():
    torch.manual_seed(0)
    x = torch.randn(2, 49, 5)
    full = torch.ones(2, 49, dtype=torch.bool)
    pooled, _ = masked_adaptive_pool(
        x, full, num_tokens=9, grid=True
    )  # 7x7 -> 3x3, overlapping bins
    ref = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(2, 5, 7, 7), 3).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pooled, ref)
    pooled, _ = masked_adaptive_pool(x[:, :10], full[:, :10], num_tokens=4, grid=False)
    ref = F.adaptive_avg_pool1d(x[:, :10].transpose(1, 2), 4).transpose(1, 2)
    torch.testing.assert_close(pooled, ref)


def test_masked_grid_pool_averages_real_positions_only():
    x = torch.arange(16.0).reshape(1, 16, 1)
    mask = torch.ones(1, 16, dtype=torch.bool)
    mask[0, [0, 1, 4]] = False  # top-left quadrant keeps only position 5
    pooled, out_mask = masked_adaptive_pool(x, mask, num_tokens=4, grid=True)
    assert pooled[0, :, 0].tolist() == [
        5.0,
        (2 + 3 + 6 + 7) / 4,
        (8 + 9 + 12 + 13) / 4,
        (10 + 11 + 14 + 15) / 4,
    ]
    assert out_mask.all()


def test_abstractor_config_errors():
    with pytest.raises(ConfigError, match="connector.num_tokens"):
        Abstractor(IN, OUT, num_tokens=5, layout="grid")
    with pytest.raises(ConfigError, match="connector.layout"):
        Abstractor(IN, OUT, layout="spiral")
    with pytest.raises(ConfigError, match="connector.layout=grid"):
        Abstractor(IN, OUT, num_tokens=4, layout="grid").out_tokens(10)


def test_resampler_max_positions(tmp_path):
    conn = make("resampler", tmp_path)  # max_positions=64
    assert conn.out_tokens(64) == 4
    with pytest.raises(ConfigError, match="connector.max_positions"):
        conn.out_tokens(65)
    with pytest.raises(ConfigError, match="connector.max_positions"):
        conn(torch.randn(1, 65, IN), torch.ones(1, 65, dtype=torch.bool))


def test_default_configs_fit_the_cpu_budget():
    """The conf/connector defaults for DINOv2-S (384) -> SmolLM2 (576) stay under 5M params."""
    for cls in (QFormer, Resampler, Abstractor):
        assert num_parameters(cls(384, 576)) < 5_000_000, cls.__name__


# -- Q-Former init_from ----------------------------------------------------------------------


def _tiny_blip2_qformer(tmp_path, freq=2):
    from safetensors.torch import save_file
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    torch.manual_seed(3)
    config = Blip2QFormerConfig(
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=40,
        cross_attention_frequency=freq,
        encoder_hidden_size=IN,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    hf = Blip2QFormerModel(config).eval()
    hf.save_pretrained(tmp_path)
    query_tokens = torch.randn(1, 5, 16)
    save_file({"query_tokens": query_tokens}, str(tmp_path / QUERY_TOKENS_FILE))
    return hf, query_tokens


def test_qformer_init_from_matches_the_hf_module(tmp_path):
    hf, query_tokens = _tiny_blip2_qformer(tmp_path)
    conn = QFormer(
        IN,
        OUT,
        num_queries=5,
        num_layers=3,
        hidden_dim=16,
        num_heads=2,
        cross_attention_freq=2,
        init_from=str(tmp_path),
    ).eval()
    ours = conn.qformer.state_dict()
    theirs = hf.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert torch.equal(conn.query_tokens.data, query_tokens)
    # intermediate_size (40) came from the saved config, not from 4 * hidden_dim
    assert conn.qformer.config.intermediate_size == 40

    features, mask = torch.randn(2, 9, IN), torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.no_grad():
        tokens, _ = conn(features, mask)
        ref = hf(
            query_embeds=query_tokens.expand(2, -1, -1),
            encoder_hidden_states=features,
            encoder_attention_mask=mask.long(),
        ).last_hidden_state
    torch.testing.assert_close(tokens, conn.proj(ref), atol=1e-6, rtol=0)


def test_qformer_init_from_mismatch_is_a_config_error(tmp_path):
    _tiny_blip2_qformer(tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"connector.init_from.*cross_attention_freq=1.*cross_attention_frequency=2",
    ):
        QFormer(
            IN,
            OUT,
            num_queries=5,
            num_layers=3,
            hidden_dim=16,
            num_heads=2,
            cross_attention_freq=1,
            init_from=str(tmp_path),
        )
    with pytest.raises(ConfigError, match="connector.num_queries"):
        QFormer(
            IN,
            OUT,
            num_queries=8,
            num_layers=3,
            hidden_dim=16,
            num_heads=2,
            cross_attention_freq=2,
            init_from=str(tmp_path),
        )
    with pytest.raises(ConfigError, match="connector.init_from.*no config.json"):
        QFormer(IN, OUT, init_from=str(tmp_path / "missing"))


# -- gated cross-attention inside a real (tiny) Llama ----------------------------------------


class TinyLlama(nn.Module):
    """Minimal LanguageModel stand-in: a saved-and-reloaded HF Llama exposing decoder_layers."""

    def __init__(self, path):
        super().__init__()
        from transformers import LlamaForCausalLM

        self.model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.hidden_size = self.model.config.hidden_size
        self.decoder_layers = self.model.model.layers


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=OUT,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _logits(llm, ids):
    with torch.no_grad():
        return llm.model(input_ids=ids).logits


def test_gated_xattn_is_identity_at_init_and_reads_media_after(llama_dir, tmp_path):
    llm = TinyLlama(llama_dir)
    llm_keys = list(llm.state_dict())
    ids = torch.randint(0, 64, (2, 11))
    before = _logits(llm, ids)

    conn = GatedCrossAttention(
        IN,
        OUT,
        num_latents=3,
        depth=1,
        hidden_dim=16,
        num_heads=2,
        max_positions=32,
        every=2,
        xattn_heads=2,
        xattn_head_dim=8,
    )
    conn.attach(llm)
    assert sorted(conn.blocks) == ["0", "2"]  # before layers 0 and 2 of 3
    assert list(llm.state_dict()) == llm_keys  # the LLM's tree is untouched
    assert any(k.startswith("blocks.2.attn.to_q") for k in conn.state_dict())
    media = conn(torch.randn(2, 8, IN), torch.ones(2, 8, dtype=torch.bool))
    conn.set_context(*media)
    assert torch.equal(_logits(llm, ids), before)  # tanh(0) gates: bit-identical

    with torch.no_grad():
        conn.blocks["2"].attn_gate.fill_(0.5)
    changed = _logits(llm, ids)
    assert not torch.allclose(changed, before, atol=1e-4)

    # text of sample 0 reads only sample 0's media
    other = conn(torch.randn(2, 8, IN), torch.ones(2, 8, dtype=torch.bool))
    conn.set_context(torch.stack([media[0][0], other[0][1]]), media[1])
    mixed = _logits(llm, ids)
    assert torch.equal(mixed[0], changed[0]) and not torch.allclose(mixed[1], changed[1], atol=1e-4)

    conn.clear_context()
    assert torch.equal(_logits(llm, ids), before)  # no media: the LLM runs unchanged
    conn.detach()
    conn.set_context(*media)
    assert torch.equal(_logits(llm, ids), before)  # hooks removed


def test_gated_xattn_gates_get_gradients_with_a_frozen_llm(llama_dir):
    llm = TinyLlama(llama_dir).requires_grad_(False)
    conn = GatedCrossAttention(
        IN,
        OUT,
        num_latents=3,
        depth=1,
        hidden_dim=16,
        num_heads=2,
        max_positions=32,
        every=1,
        xattn_heads=2,
        xattn_head_dim=8,
    )
    conn.attach(llm)
    assert len(conn.blocks) == 3
    ids = torch.randint(0, 64, (2, 11))
    conn.set_context(*conn(torch.randn(2, 8, IN), torch.ones(2, 8, dtype=torch.bool)))
    llm.model(input_ids=ids, labels=ids).loss.backward()
    for block in conn.blocks.values():
        assert block.attn_gate.grad is not None and block.attn_gate.grad.abs().item() > 0
        assert block.ff_gate.grad is not None and block.ff_gate.grad.abs().item() > 0
    assert all(p.grad is None for p in llm.parameters())
    with pytest.raises(Exception, match="already attached"):
        conn.attach(llm)


def test_gated_xattn_state_dict_round_trip_and_expanded_batch(llama_dir):
    llm = TinyLlama(llama_dir)
    kwargs = {
        "num_latents": 3,
        "depth": 1,
        "hidden_dim": 16,
        "num_heads": 2,
        "max_positions": 32,
        "every": 2,
        "xattn_heads": 2,
        "xattn_head_dim": 8,
    }
    torch.manual_seed(0)
    conn = GatedCrossAttention(IN, OUT, **kwargs)
    conn.attach(llm)
    with torch.no_grad():
        for block in conn.blocks.values():
            block.attn_gate.fill_(0.7)
            block.ff_gate.fill_(-0.3)
    features, mask = torch.randn(1, 8, IN), torch.ones(1, 8, dtype=torch.bool)
    ids = torch.randint(0, 64, (1, 9))
    conn.set_context(*conn(features, mask))
    expected = _logits(llm, ids)
    # a text batch of 2 rows (e.g. 2 beams) over 1 media sample reads it in both rows
    doubled = _logits(llm, ids.repeat(2, 1))
    torch.testing.assert_close(doubled, expected.repeat(2, 1, 1), atol=1e-5, rtol=0)
    conn.detach()

    torch.manual_seed(1)
    fresh = GatedCrossAttention(IN, OUT, **kwargs)
    fresh.load_state_dict(conn.state_dict())  # strict: the blocks are made from the keys
    assert sorted(fresh.blocks) == ["0", "2"]
    fresh.attach(llm)
    fresh.set_context(*fresh(features, mask))
    assert torch.equal(_logits(llm, ids), expected)
