"""The registry: decorator registration, dotted-path and entry-point plugins, interface checks,
the catalogue, and components/ staying free of Hydra / Lightning."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import small_model_dict
from torch import nn

import composer.registry as registry
from components.protocols import ComponentConfig
from composer import ConfigError, compose, load_config
from composer.catalogue import catalogue, component_yaml, options, render, selectors
from composer.registry import FAMILIES, FFN, NORM
from composer.schema import option

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
PLUGIN = "tests.plugins.my_attention.MyAttention"


@pytest.fixture
def clean_registry(monkeypatch):
    """Registrations made by a test are undone afterwards; the repo root is importable so the
    ``tests.plugins`` modules resolve by dotted path."""
    monkeypatch.syspath_prepend(str(REPO))
    for reg in FAMILIES.values():
        reg.names()  # built-ins register on first lookup (module import): do it before the snapshot
    saved = {family: dict(reg._entries) for family, reg in FAMILIES.items()}
    state = dict(registry._state)
    yield
    for family, reg in FAMILIES.items():
        reg._entries.clear()
        reg._entries.update(saved[family])
    registry._state.update(state)


def ids(b: int = 2, t: int = 6) -> torch.Tensor:
    return torch.randint(0, 64, (b, t), generator=torch.Generator().manual_seed(0))


# ============================================================================ decorator
def test_decorator_registration(clean_registry):
    @dataclass
    class ScaledConfig(ComponentConfig):
        """Feed-forward that scales a linear map of its input."""

        scale: float = option(2.0, help="output multiplier", min=0.0)

    @FFN.register("scaled_linear", config=ScaledConfig)
    class ScaledLinear(nn.Module):
        def __init__(self, cfg, ctx):
            super().__init__()
            self.scale = cfg.scale
            self.proj = nn.Linear(ctx.hidden_size, ctx.hidden_size)

        def forward(self, x):
            return self.scale * self.proj(x)

    assert "scaled_linear" in FFN.names() and "scaled_linear" in FFN
    entry = FFN.get("scaled_linear")
    assert entry.cls is ScaledLinear and entry.description == "Feed-forward that scales a linear map of its input."
    model = compose(small_model_dict(ffn={"type": "scaled_linear", "scale": 3.0}), seed=0)
    ffn = model.layers[0].ffn
    assert isinstance(ffn, ScaledLinear) and ffn.scale == 3.0
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(ffn(x), 3.0 * ffn.proj(x))
    assert model(ids()).logits.shape == (2, 6, 64)
    with pytest.raises(ConfigError, match=r"model\.ffn\.scal.*did you mean 'scale'"):
        compose(small_model_dict(ffn={"type": "scaled_linear", "scal": 3.0}))
    with pytest.raises(ConfigError, match=r"model\.ffn\.scale.*below the minimum"):
        compose(small_model_dict(ffn={"type": "scaled_linear", "scale": -1.0}))
    with pytest.raises(ValueError, match="already registered"):
        FFN.register("scaled_linear")(type("Other", (nn.Module,), {}))
    FFN.register("scaled_linear", config=ScaledConfig)(ScaledLinear)  # re-registering the same class is fine
    with pytest.raises(TypeError, match="ComponentConfig dataclass"):
        FFN.register("bad_config", config=dict)(ScaledLinear)


# ============================================================================ dotted path
def test_dotted_path_plugin_builds_and_runs(clean_registry):
    model = compose(
        small_model_dict(attention={"type": PLUGIN, "temperature": 2.0}, position={"type": "rope"}), seed=0
    ).eval()
    attn = model.layers[0].attn
    assert type(attn).__module__ == "tests.plugins.my_attention" and attn.head_dim == 8
    torch.testing.assert_close(attn.log_temperature, torch.full((4,), math.log(2.0)))
    assert attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.2), "initialised like the built-ins"
    x = ids(2, 8)
    full = model(x, labels=x)
    assert full.logits.shape == (2, 8, 64) and torch.isfinite(full.loss)
    full.loss.backward()
    assert attn.log_temperature.grad is not None
    # causal, and decodes with its own KV cache
    with torch.no_grad():
        cache = model.allocate_cache(2, 8)
        steps = [model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(8)]
    torch.testing.assert_close(torch.cat(steps, 1), full.logits.detach(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match=r"model\.attention\.temprature.*did you mean 'temperature'"):
        compose(small_model_dict(attention={"type": PLUGIN, "temprature": 2.0}))


def test_dotted_path_plugin_from_yaml(clean_registry, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "plugged.yaml").write_text(
        textwrap.dedent(f"""\
        defaults: [_base, {{ffn: swiglu}}, {{norm: rmsnorm}}, {{position: rope}}, {{head: lm}}, _self_]
        vocab_size: 64
        hidden_size: 32
        num_layers: 2
        num_heads: 4
        max_position_embeddings: 32
        ffn: {{multiple_of: 16}}
        attention:
          type: {PLUGIN}
          temperature: 0.5
        layers:
          - select: 1
            attention: {{type: mha}}
        """)
    )
    cfg = load_config(["model=plugged"], config_dirs=[tmp_path])
    model = compose(cfg.model, seed=0)
    assert (
        type(model.layers[0].attn).__name__ == "MyAttention" and type(model.layers[1].attn).__name__ == "SelfAttention"
    )
    assert model(ids()).logits.shape == (2, 6, 64)


@pytest.mark.parametrize(
    "plugin,missing",
    [
        ("NoHeadDim", "missing attribute 'head_dim'"),
        ("NoPastKeyValue", "'forward()' lacks parameter(s) past_key_value"),
        ("NoCache", "missing method 'make_cache()'"),
    ],
)
def test_plugin_not_fitting_the_interface_is_refused(clean_registry, plugin, missing):
    raw = small_model_dict(attention={"type": f"tests.plugins.broken_attention.{plugin}"})
    with pytest.raises(ConfigError) as info:
        compose(raw, device="meta")
    text = str(info.value)
    assert missing in text and f"broken_attention.{plugin} does not implement the attention interface" in text
    assert info.value.problems[0].path.startswith("model.") and "composer/contract/protocols.py" in text


def test_plugin_parameters_without_initialisation_are_refused(clean_registry):
    """Models are built on meta, so a plugin parameter no init rule covers would hold garbage."""
    raw = small_model_dict(attention={"type": "tests.plugins.broken_attention.UninitialisedGate"})
    with pytest.raises(ConfigError) as info:
        compose(raw)
    assert info.value.problems[0].path == "layers.0.attn.extra.gate, layers.1.attn.extra.gate"
    assert "reset_parameters()" in str(info.value)
    assert compose(raw, device="meta").layers[0].attn.extra.gate.is_meta  # nothing to initialise on meta


def test_dotted_path_to_a_non_component_is_refused(clean_registry):
    for bad, fragment in [
        ("tests.plugins.my_attention.math", "not an nn.Module subclass"),
        ("tests.plugins.nowhere.Attention", "cannot import attention plugin"),
        ("torch.nn.Linear", "(cfg, ctx) failed"),
        (".relative", "cannot import"),
    ]:
        with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            compose(small_model_dict(attention={"type": bad}), device="meta")


def test_dotted_paths_are_not_advertised_as_registered_names(clean_registry):
    with pytest.raises(ConfigError):
        compose(small_model_dict(attention={"type": "torch.nn.Linear"}), device="meta")
    compose(small_model_dict(attention={"type": PLUGIN}), device="meta")
    names = registry.ATTENTION.names()
    assert "torch.nn.Linear" not in names and PLUGIN not in names
    with pytest.raises(ConfigError) as info:
        compose(small_model_dict(attention={"type": "mhaa"}), device="meta")
    assert "torch.nn.Linear" not in str(info.value)


def test_switching_a_preset_to_a_plugin_on_the_command_line(clean_registry):
    """The preset's mha group left its options at their defaults: they do not block the switch."""
    cfg = load_config(["model=tiny", f"model.attention.type={PLUGIN}"])
    assert type(compose(cfg.model, device="meta").layers[0].attn).__name__ == "MyAttention"
    # an option the user changed from its default is not silently dropped
    cfg = load_config(["model=tiny", "model.attention.qk_norm=true", f"model.attention.type={PLUGIN}"])
    with pytest.raises(ConfigError, match=r"model\.attention\.qk_norm: unknown option"):
        compose(cfg.model, device="meta")


# ============================================================================ entry points
ENTRY_POINT_MODULE = '''
"""ScaleNorm (Nguyen & Salazar, 2019): g * x / ||x||, one learned scalar g."""
from dataclasses import dataclass
import math
import torch
from torch import nn
from components.protocols import ComponentConfig


@dataclass
class ScaleNormConfig(ComponentConfig):
    """ScaleNorm: one learned scale on the unit-normalised vector."""

    eps: float = 1e-5


class ScaleNorm(nn.Module):
    Config = ScaleNormConfig

    def __init__(self, cfg, ctx):
        super().__init__()
        self.eps, self.size = cfg.eps, ctx.hidden_size
        self.g = nn.Parameter(torch.empty(()))

    def reset_parameters(self):
        nn.init.constant_(self.g, math.sqrt(self.size))

    def forward(self, x):
        return self.g * x / x.norm(dim=-1, keepdim=True).clamp(min=self.eps)
'''


@pytest.fixture
def fake_distribution(tmp_path, clean_registry):
    """An installed-looking distribution advertising a norm in the composer.components group."""
    dist = tmp_path / "fake_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[composer.components]\nnorm.scale_norm = fake_plugin_mod:ScaleNorm\n")
    (tmp_path / "fake_plugin_mod.py").write_text(ENTRY_POINT_MODULE)
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    try:
        registry.reload_entry_points()
        yield
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("fake_plugin_mod", None)
        importlib.invalidate_caches()


def test_entry_point_plugin_is_selectable_by_name(fake_distribution):
    assert "scale_norm" in NORM.names()
    assert NORM.get("scale_norm").description == "ScaleNorm: one learned scale on the unit-normalised vector."
    model = compose(small_model_dict(norm={"type": "scale_norm", "eps": 1e-4}), seed=0)
    norm = model.layers[0].attn_norm
    assert type(norm).__name__ == "ScaleNorm" and norm.g.item() == pytest.approx(math.sqrt(32))
    x = torch.randn(3, 32)
    torch.testing.assert_close(norm(x), math.sqrt(32) * x / x.norm(dim=-1, keepdim=True))
    assert model(ids()).logits.shape == (2, 6, 64)
    assert "scale_norm" in {e.name for e in catalogue()["norm"]}


def test_entry_point_plugin_is_gone_after_uninstall(clean_registry):
    registry.reload_entry_points()
    assert "scale_norm" not in NORM.names()
    with pytest.raises(ConfigError, match="unknown norm type 'scale_norm'"):
        compose(small_model_dict(norm={"type": "scale_norm"}), device="meta")


def test_badly_named_entry_point_is_reported(tmp_path, clean_registry):
    dist = tmp_path / "bad_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: bad-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[composer.components]\nwidget.thing = os:getcwd\n")
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    try:
        with pytest.raises(ConfigError, match=r"entry point 'widget.thing'.*<family>.<name>"):
            registry.reload_entry_points()
    finally:
        sys.path.remove(str(tmp_path))
        importlib.invalidate_caches()


# ============================================================================ catalogue
def test_catalogue_lists_every_registered_name(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # rich wraps long option names at the default 80
    cat = catalogue()
    assert set(cat) == set(FAMILIES)
    for family, entries in cat.items():
        assert [e.name for e in entries] == FAMILIES[family].names()
        assert all(e.description for e in entries), f"{family}: every component has a one-line description"
    render()
    printed = capsys.readouterr().out
    for family, entries in cat.items():
        assert all(how in printed for how in selectors(family))  # the syntax that works (tests/test_config.py)
        for e in entries:
            assert e.name in printed, f"{family} {e.name} missing from the printed catalogue"
            for opt in options(e):
                assert opt.name in printed


def test_catalogue_options_and_yaml():
    gqa = {o.name: o for o in options(FAMILIES["attention"].get("gqa"))}
    assert gqa["num_kv_heads"].default is None and "divid" in gqa["num_kv_heads"].help
    assert "type" not in gqa
    window = {o.name: o for o in options(FAMILIES["attention"].get("sliding_window"))}["window"]
    assert window.default is None and window.type == "int or null" and "4096" in window.help  # documented default
    text = component_yaml("ffn", "mlp")
    assert text.splitlines()[2] == "type: mlp" and "activation: gelu  # " in text


# ============================================================================ no Hydra in components/
def test_components_import_no_hydra_or_lightning():
    code = textwrap.dedent("""
        import sys
        import components
        for name in components.BUILTIN_MODULES + ("kv_cache", "protocols"):
            __import__("components." + name)
        from composer.registry import FAMILIES
        assert all(reg.names() for reg in FAMILIES.values())
        loaded = sorted({m.split(".")[0] for m in sys.modules}
                        & {"hydra", "omegaconf", "lightning", "pytorch_lightning", "lightning_fabric"})
        assert not loaded, loaded
        print("clean")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr
