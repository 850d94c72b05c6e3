"""The contract is complete: a plugin of every family written from composer.contract alone builds,
trains a step, decodes with its own cache and is planned; the contract layer is a leaf."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import small_model_dict

from composer import ConfigError, compose
from composer.contract import FAMILIES
from composer.plan import plan
from tests.plugins import contract_only

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def plugins():
    saved = {family: dict(reg._entries) for family, reg in FAMILIES.items()}
    for family, (name, cls, config) in contract_only.PLUGINS.items():
        FAMILIES[family].register(name, config=config)(cls)
    yield {family: name for family, (name, _, _) in contract_only.PLUGINS.items()}
    for family, reg in FAMILIES.items():
        reg._entries.clear()
        reg._entries.update(saved[family])


def test_the_plugin_module_imports_only_the_contract():
    tree = ast.parse(Path(contract_only.__file__).read_text())
    project = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            project.add(node.module)
        elif isinstance(node, ast.Import):
            project.update(a.name for a in node.names)
    ours = {m for m in project if m.split(".")[0] in ("composer", "components")}
    assert ours == {"composer.contract"}


def _model_dict(names: dict) -> dict:
    return small_model_dict(
        attention={"type": names["attention"], "num_heads": 2},
        ffn={"type": names["ffn"]},
        norm={"type": names["norm"]},
        position={"type": names["position"]},
        head={"type": names["head"]},
        block={"type": names["block"]},
        num_layers=2,
    )


def test_a_plugin_of_every_family_trains_a_step(plugins):
    model = compose(_model_dict(plugins), seed=0).train()
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"ScaleNorm", "SquaredRelu", "Sinusoid", "CausalLinearMix", "ScaledLMHead", "ScaledResidual"} <= kinds
    assert model.tied, "the plugin head tied itself to the embedding"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = model(x, labels=x).loss
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_the_plugins_decode_with_their_own_cache(plugins):
    model = compose(_model_dict(plugins), seed=0).eval()
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :3], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(3, 8):
            out = model(x[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    assert cache.length == 8


def test_the_plugins_are_planned_from_their_own_costs(plugins):
    report = plan(_model_dict(plugins), batch_size=2, seq_len=16, precision="32-true", device="cpu")
    assert report.not_planned == []
    assert report.params_total == compose(_model_dict(plugins), device="meta").num_parameters()
    mix = compose(_model_dict(plugins), device="meta").layers[0].attn
    assert report.kv_cache_bytes_per_token == 2 * 2 * 32 * 4  # two layers, K and V of C, float32
    assert report.flops_forward_per_token > 2 * sum(p.numel() for p in mix.parameters())


def test_a_component_without_a_cost_is_reported_as_not_planned(plugins, monkeypatch):
    monkeypatch.delattr(contract_only.SquaredRelu, "cost")
    report = plan(_model_dict(plugins), batch_size=2, seq_len=16)
    assert report.not_planned == ["tests.plugins.contract_only.SquaredRelu"]
    assert any("not planned: tests.plugins.contract_only.SquaredRelu has no cost method" in n for n in report.notes)
    assert report.params_total == compose(_model_dict(plugins), device="meta").num_parameters()


def test_a_module_without_its_own_forward_is_refused(plugins):
    class NoForward(torch.nn.Module):
        def __init__(self, cfg, ctx):
            super().__init__()

    FAMILIES["ffn"].register("no_forward", config=contract_only.SquaredReluConfig)(NoForward)
    with pytest.raises(ConfigError) as info:
        compose(small_model_dict(ffn={"type": "no_forward"}), device="meta")
    assert "missing method 'forward()'" in str(info.value)


def test_the_contract_and_the_components_are_leaves():
    """Importing the contract or a component imports neither the model nor Hydra, Lightning or OmegaConf."""
    code = textwrap.dedent("""
        import sys
        import composer.contract, components.attention, components.block
        heavy = {"composer.model", "composer.schema", "hydra", "omegaconf", "lightning", "composer.plan"}
        loaded = sorted(heavy & set(sys.modules))
        assert not loaded, loaded
        print("leaf")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and "leaf" in out.stdout, out.stderr


def test_a_head_without_a_cost_is_reported_as_not_planned(plugins, monkeypatch):
    monkeypatch.delattr(contract_only.ScaledLMHead, "cost")
    report = plan(_model_dict(plugins), batch_size=2, seq_len=16)
    assert report.not_planned == ["tests.plugins.contract_only.ScaledLMHead"]
    assert report.flops_forward_per_token > 0, "the layers are still planned"
