"""The contract kit on every registered connector and encoder (components added later by any
plugin are checked automatically), and the kit itself on deliberately broken components."""

from __future__ import annotations

import pytest
import torch
from helpers import shared_registry
from rich.console import Console
from torch import nn

import mmbridge
from mmbridge.registry.plugin_manager import load_registry
from mmbridge.testing.contracts import check_connector, check_encoder
from mmbridge.testing.report import IN_DIM, OUT_DIM, run_contract_checks

# test -> the kind of component it runs on, each registered one (installed plugins included)
OVER_REGISTRY = {"test_connector_contract": "connector", "test_encoder_contract": "encoder"}


def pytest_generate_tests(metafunc):
    # at collection, not import: importing this module builds no registry
    kind = OVER_REGISTRY.get(metafunc.definition.name)
    if kind:
        metafunc.parametrize("name", shared_registry(autoload=True).names(kind))


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from mmbridge.plugins.llms.hf_causal import HFCausalLM

    return HFCausalLM.for_testing(tmp_path_factory.mktemp("llm"))


def test_connector_contract(name, tmp_path, request):
    connector = (
        shared_registry(autoload=True)
        .get("connector", name)
        .cls.for_testing(tmp_path, in_dim=IN_DIM, out_dim=OUT_DIM)
    )
    llm = None if connector.in_sequence else request.getfixturevalue("tiny_llm")
    check_connector(connector, llm=llm)


def test_encoder_contract(name, tmp_path):
    encoder = shared_registry(autoload=True).get("encoder", name).cls.for_testing(tmp_path)
    check_encoder(encoder, tmp_path)


# -- the kit catches broken components ---------------------------------------------------------
class _Linear(mmbridge.Converter):
    """A correct token-wise converter; the subclasses below break one rule each."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(in_dim, out_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def out_tokens(self, n_in: int) -> int:
        return n_in

    def forward(self, features, mask):
        return self.proj(features), mask


class _LeaksPadding(_Linear):
    def forward(self, features, mask):  # a global mean that ignores the mask
        return self.proj(features + features.mean(1, keepdim=True)), mask


class _UnusedParameter(_Linear):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(in_dim, out_dim)
        self.extra = nn.Linear(in_dim, out_dim)


class _WrongCount(_Linear):
    def out_tokens(self, n_in: int) -> int:
        return n_in + 1


class _NaN(_Linear):
    def forward(self, features, mask):
        out = self.proj(features)
        return out.masked_fill(~mask.unsqueeze(-1), float("nan")), mask


class _Random(_Linear):
    def forward(self, features, mask):
        return self.proj(features) + torch.rand(1), mask


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (_LeaksPadding, "padding changes the real output tokens"),
        (_UnusedParameter, "no gradient reaches 2 trainable parameters"),
        (_WrongCount, "expected [2, 6, 32]"),
        (_NaN, "NaN"),
        (_Random, "not deterministic"),
    ],
)
def test_check_connector_catches(cls, message):
    check_connector(_Linear(IN_DIM, OUT_DIM))
    with pytest.raises(AssertionError, match=message.replace("[", r"\[")):
        check_connector(cls(IN_DIM, OUT_DIM))


def test_check_encoder_catches_wrong_num_tokens(tmp_path):
    from mmbridge.plugins.encoders.timm_encoder import TimmEncoder

    class _Miscounts(TimmEncoder):
        def num_tokens(self, x):
            return super().num_tokens(x) - 1

    encoder = _Miscounts.for_testing(tmp_path)
    with pytest.raises(AssertionError, match="num_tokens"):
        check_encoder(encoder, tmp_path)
    encoder.num_tokens = lambda x: TimmEncoder.num_tokens(encoder, x)
    check_encoder(encoder, tmp_path)  # the same encoder, counting right, passes


def test_report_lists_each_component_and_fails_on_a_broken_one():
    class BrokenPlugin:
        @mmbridge.hookimpl
        def register_components(self, registry):
            registry.add_connector("leaky", _LeaksPadding)
            registry.add_connector("fine", _Linear)

    registry = load_registry(autoload=False, extra_plugins={"broken-plugin": BrokenPlugin()})
    console = Console(record=True, width=200)
    assert run_contract_checks(registry, console, kind="connector", plugin="broken-plugin") == 1
    text = console.export_text()
    assert "leaky" in text and "fine" in text and "FAIL" in text and "pass" in text
    assert "padding changes the real output tokens" in text and "1/2 passed" in text

    assert (
        run_contract_checks(registry, Console(record=True), kind="connector", plugin="nobody") == 2
    )
    ok = Console(record=True, width=200)
    assert (
        run_contract_checks(registry, ok, kind="connector", plugin="mmbridge.plugins.converters")
        == 0
    )
    assert "linear" in ok.export_text() and "leaky" not in ok.export_text()
