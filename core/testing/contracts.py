"""The contract kit: assertions every connector and encoder must pass, usable from any
plugin's pytest::

    from mmbridge.testing.contracts import check_connector, check_encoder

    def test_my_connector(tmp_path):
        check_connector(MyConnector.for_testing(tmp_path, in_dim=24, out_dim=32))

Each check raises :class:`AssertionError` with a message naming the component and the broken
rule. mmbridge's own suite runs them on every registered component (tests/test_contracts.py),
and ``mmbridge plugins check`` runs them from the command line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmbridge.contracts.connector import Connector
from mmbridge.contracts.encoder import ModalityEncoder
from mmbridge.errors import MMBridgeError


def _name(obj: Any) -> str:
    return type(obj).__name__


def _close(a: torch.Tensor, b: torch.Tensor, atol: float) -> tuple[bool, float]:
    """``(a ≈ b, max |a - b|)`` with ``atol`` scaled by the magnitude of ``b``."""
    if a.shape != b.shape:
        return False, float("inf")
    diff = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    return diff <= atol * max(1.0, b.float().abs().max().item() if b.numel() else 0.0), diff


def _dtype_atol(module: torch.nn.Module, atol: float) -> float:
    """``atol`` for a batch row against the same sample run alone: at least 8 steps of the
    module's lowest-precision floating weights. bf16 / fp16 matmul kernels block the work by
    batch size (oneDNN with AMX does), so a bf16 encoder's row moves by a few bf16 steps between
    batch sizes; fp32 weights keep ``atol``."""
    eps = [torch.finfo(p.dtype).eps for p in module.parameters() if p.is_floating_point()]
    return max(atol, 8 * max(eps)) if eps else atol


def _check_output(who: str, out: Any, batch: int, n_tokens: int | None, dim: int) -> None:
    assert isinstance(out, tuple) and len(out) == 2, (
        f"{who}: forward must return (tokens, mask), got {type(out).__name__}"
    )
    tokens, mask = out
    assert isinstance(tokens, torch.Tensor) and tokens.dim() == 3, (
        f"{who}: tokens must be a [B, M, D] tensor, got {getattr(tokens, 'shape', type(tokens))}"
    )
    b, m, d = tokens.shape
    want = f"[{batch}, {n_tokens if n_tokens is not None else 'M'}, {dim}]"
    assert b == batch and d == dim and (n_tokens is None or m == n_tokens), (
        f"{who}: tokens have shape {list(tokens.shape)}, expected {want}"
    )
    assert tokens.is_floating_point(), f"{who}: tokens must be floating point, got {tokens.dtype}"
    assert torch.isfinite(tokens).all(), f"{who}: output contains NaN or inf"
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool, (
        f"{who}: mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}"
    )
    assert tuple(mask.shape) == (b, m), (
        f"{who}: mask has shape {list(mask.shape)}, expected [{b}, {m}]"
    )


def _missing_grads(module: torch.nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]


# -- connectors --------------------------------------------------------------------------------
def check_connector(
    connector: Connector,
    *,
    batch: int = 2,
    n_in: int = 5,
    n_alt: int | None = None,
    masked: bool = True,
    llm: Any = None,
    atol: float = 1e-5,
    seed: int = 0,
) -> None:
    """Check a :class:`~mmbridge.Connector` against the contract.

    * ``out_tokens(N)`` is an int and the output is ``[B, out_tokens(N), D_out]`` + a bool mask
      ``[B, M]`` for ``N = n_in`` and ``N = n_alt`` (default ``n_in + 4``) when the class accepts
      that ``N`` (a connector refuses an ``N`` by raising ``ValueError``/``MMBridgeError`` in
      ``out_tokens``); connectors with ``in_sequence = False`` must say ``out_tokens(N) == 0``;
    * no NaN/inf; eval mode is deterministic;
    * ``masked``: a sample padded inside a batch (garbage features under a False mask) gives the
      same real output tokens as the sample alone, and its padding receives no gradient;
    * a loss on the output gives every trainable parameter a finite gradient, and the input too;
    * with ``llm`` (a :class:`~mmbridge.LanguageModel`) and ``in_sequence = False``: ``attach`` +
      ``set_context`` reach the LLM and give gradients to the added layers; ``clear_context``
      restores the LLM's own output.
    """
    who = f"connector {_name(connector)}"
    assert isinstance(connector, Connector), f"{who}: not a subclass of mmbridge.Connector"
    assert connector.family in ("converter", "perceiver"), f"{who}: family is {connector.family!r}"
    gen = torch.Generator().manual_seed(seed)
    d_in, d_out = connector.in_dim, connector.out_dim
    was_training = connector.training
    connector.eval()
    try:
        sizes = []
        for n in (n_in, n_alt if n_alt is not None else n_in + 4):
            try:
                m = connector.out_tokens(n)
            except (ValueError, MMBridgeError):
                if n == n_in:
                    raise AssertionError(
                        f"{who}: out_tokens({n_in}) refused N={n_in}; pass n_in"
                    ) from None
                continue
            assert isinstance(m, int) and not isinstance(m, bool), (
                f"{who}: out_tokens({n}) returned {m!r}, not an int"
            )
            if not connector.in_sequence:
                assert m == 0, (
                    f"{who}: in_sequence=False but out_tokens({n}) = {m} (expected 0 slots)"
                )
            else:
                assert m >= 1, f"{who}: out_tokens({n}) = {m}"
            sizes.append(n)
            feats = torch.randn(batch, n, d_in, generator=gen)
            mask = torch.ones(batch, n, dtype=torch.bool)
            with torch.no_grad():
                out = connector(feats, mask)
                _check_output(
                    f"{who} (N={n})", out, batch, m if connector.in_sequence else None, d_out
                )
                again = connector(feats, mask)
            ok, diff = _close(again[0], out[0], 0.0)
            assert ok and torch.equal(again[1], out[1]), (
                f"{who}: eval mode is not deterministic (max |diff| {diff:.3g})"
            )
            assert out[1].any(dim=1).all(), f"{who} (N={n}): a sample has no real output token"

        feats = torch.randn(batch, n_in, d_in, generator=gen)
        mask = torch.ones(batch, n_in, dtype=torch.bool)
        n_real = max(1, n_in - 2)
        if masked and connector.in_sequence and n_real < n_in:
            try:
                connector.out_tokens(n_real)
            except (ValueError, MMBridgeError):
                n_real = n_in
        if masked and n_real < n_in:
            # Sample 0 has n_real real features; its padding holds large garbage values.
            mask[0, n_real:] = False
            feats[0, n_real:] = 100 * torch.randn(n_in - n_real, d_in, generator=gen) + 50
            with torch.no_grad():
                alone, alone_mask = connector(
                    feats[:1, :n_real], torch.ones(1, n_real, dtype=torch.bool)
                )
                padded, padded_mask = connector(feats, mask)
            assert torch.isfinite(padded).all(), (
                f"{who}: output contains NaN or inf in a padded batch (padded positions too must "
                f"stay finite: a NaN survives masking by multiplication)"
            )
            k_alone, k_pad = int(alone_mask[0].sum()), int(padded_mask[0].sum())
            assert k_alone == k_pad, (
                f"{who}: a sample with {n_real} features gives {k_alone} real "
                f"tokens alone but {k_pad} when padded to {n_in} in a batch"
            )
            ok, diff = _close(padded[0][padded_mask[0]], alone[0][alone_mask[0]], atol)
            assert ok, (
                f"{who}: padding changes the real output tokens (sample alone vs padded "
                f"in a batch: max |diff| {diff:.3g}); padded features must be ignored"
            )

        connector.train()
        connector.zero_grad(set_to_none=True)
        x = feats.clone().requires_grad_(True)
        tokens, out_mask = connector(x, mask)
        weight = torch.randn(tokens.shape, generator=gen)
        (tokens * weight * out_mask.unsqueeze(-1)).sum().backward()
        missing = _missing_grads(connector)
        assert not missing, (
            f"{who}: no gradient reaches {len(missing)} trainable parameters: {missing[:5]}"
        )
        bad = [
            n
            for n, p in connector.named_parameters()
            if p.grad is not None and not torch.isfinite(p.grad).all()
        ]
        assert not bad, f"{who}: non-finite gradients in {bad[:5]}"
        assert x.grad is not None and x.grad[mask].abs().sum() > 0, (
            f"{who}: no gradient reaches the input features"
        )
        if masked and not mask.all():
            assert x.grad[~mask].abs().max() == 0, f"{who}: padded input positions receive gradient"
        connector.zero_grad(set_to_none=True)
        if llm is not None and not connector.in_sequence:
            _check_attach(who, connector, llm, feats, mask, gen)
    finally:
        connector.train(was_training)


def _check_attach(
    who: str,
    connector: Connector,
    llm: Any,
    feats: torch.Tensor,
    mask: torch.Tensor,
    gen: torch.Generator,
) -> None:
    """Layers added inside the LLM by ``attach`` read the context and train."""
    batch, t = feats.shape[0], 6
    embeds = torch.randn(batch, t, llm.hidden_size, generator=gen)
    attn = torch.ones(batch, t, dtype=torch.long)
    with torch.no_grad():
        before = llm.hidden(embeds, attn)
    connector.attach(llm)
    try:
        tokens, out_mask = connector(feats, mask)
        connector.set_context(tokens, out_mask)
        hidden = llm.hidden(embeds, attn)
        (hidden * torch.randn(hidden.shape, generator=gen)).sum().backward()
        missing = _missing_grads(connector)
        assert not missing, (
            f"{who}: after attach, no gradient reaches {missing[:5]} through the LLM"
        )
        connector.clear_context()
        with torch.no_grad():
            after = llm.hidden(embeds, attn)
        ok, diff = _close(after, before, 1e-5)
        assert ok, f"{who}: with the context cleared the LLM output changed (max |diff| {diff:.3g})"
    finally:
        connector.clear_context()
        detach = getattr(connector, "detach", None)  # connectors that hook into the LLM
        if detach is not None:
            detach()
        connector.zero_grad(set_to_none=True)
        llm.zero_grad(set_to_none=True)


# -- encoders ----------------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def check_encoder(encoder: ModalityEncoder, tmp_dir: str | Path, *, atol: float = 1e-4) -> None:
    """Check a :class:`~mmbridge.ModalityEncoder` against the contract.

    On two files from ``example_media``: ``load`` -> ``preprocess`` (deterministic) ->
    ``collate`` -> ``forward`` gives features ``[B, N, out_dim]`` (finite) and a bool mask
    ``[B, N]`` that is True exactly at the first ``num_tokens(x)`` positions of each sample; a
    sample encoded alone equals its row of the batch; eval mode is deterministic;
    ``cache_identity()`` is a stable, JSON-serialisable dict; when the encoder has trainable
    parameters, a loss on the features gives every one of them a finite gradient.
    """
    who = f"encoder {_name(encoder)}"
    tmp_dir = Path(tmp_dir)
    assert isinstance(encoder, ModalityEncoder), (
        f"{who}: not a subclass of mmbridge.ModalityEncoder"
    )
    assert isinstance(encoder.modality, str) and encoder.modality, f"{who}: modality is not set"
    dim = encoder.out_dim
    assert isinstance(dim, int) and dim > 0, f"{who}: out_dim is {dim!r}"
    paths = [encoder.example_media(tmp_dir, i) for i in (0, 1)]
    for p in paths:
        assert Path(p).is_file(), f"{who}: example_media returned {p!r}, which is not a file"
    xs = [encoder.preprocess(encoder.load(p)) for p in paths]
    for p, x in zip(paths, xs):
        assert _same(encoder.preprocess(encoder.load(p)), x), (
            f"{who}: preprocess is not deterministic on {p}"
        )
    ns = [encoder.num_tokens(x) for x in xs]
    assert all(isinstance(n, int) and n > 0 for n in ns), f"{who}: num_tokens gave {ns}"
    batch = encoder.collate(xs)
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            out = encoder(batch)
            _check_output(who, out, len(xs), None, dim)
            feats, mask = out
            again = encoder(batch)
        assert feats.shape[1] >= max(ns), (
            f"{who}: {feats.shape[1]} tokens, but num_tokens says {ns}"
        )
        for i, n in enumerate(ns):
            want = torch.arange(feats.shape[1]) < n
            assert torch.equal(mask[i].cpu(), want), (
                f"{who}: sample {i}: num_tokens(x) = {n} but the mask marks "
                f"{int(mask[i].sum())} real tokens (they must be the first {n})"
            )
        ok, diff = _close(again[0], feats, 0.0)
        assert ok, f"{who}: eval mode is not deterministic (max |diff| {diff:.3g})"
        batch_atol = _dtype_atol(encoder, atol)
        for i, (x, n) in enumerate(zip(xs, ns)):
            with torch.no_grad():
                alone, _ = encoder(encoder.collate([x]))
            ok, diff = _close(alone[0, :n], feats[i, :n], batch_atol)
            assert ok, (
                f"{who}: sample {i} encoded alone differs from its row in the batch "
                f"(max |diff| {diff:.3g})"
            )

        ident = encoder.cache_identity()
        assert isinstance(ident, dict) and "class" in ident, (
            f"{who}: cache_identity() must be a dict with 'class'"
        )
        try:
            text = json.dumps(ident, sort_keys=True)
        except TypeError as exc:
            raise AssertionError(
                f"{who}: cache_identity() is not JSON-serialisable: {exc}"
            ) from None
        assert json.dumps(encoder.cache_identity(), sort_keys=True) == text, (
            f"{who}: cache_identity() changes between calls"
        )

        if any(p.requires_grad for p in encoder.parameters()):
            encoder.zero_grad(set_to_none=True)
            with torch.enable_grad():
                feats, mask = encoder(batch)
                weight = torch.randn(feats.shape, generator=torch.Generator().manual_seed(0))
                (feats * weight.to(feats.device) * mask.unsqueeze(-1)).sum().backward()
            missing = _missing_grads(encoder)
            assert not missing, (
                f"{who}: no gradient reaches {len(missing)} trainable parameters "
                f"(remove or freeze what the features do not use): {missing[:5]}"
            )
            bad = [
                n
                for n, p in encoder.named_parameters()
                if p.grad is not None and not torch.isfinite(p.grad).all()
            ]
            assert not bad, f"{who}: non-finite gradients in {bad[:5]}"
            encoder.zero_grad(set_to_none=True)
    finally:
        encoder.train(was_training)
