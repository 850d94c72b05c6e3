"""The presets in conf/model/: they compose (on meta), with the published parameter counts."""

from __future__ import annotations

import pytest
import torch

from composer import compose, conf_dir, load_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PRESETS = sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml") if not p.stem.startswith("_"))

# Published parameter counts (tied embeddings counted once).
PUBLISHED = {
    "gpt2": 124_439_808,
    "gpt2_medium": 354_823_168,
    "gpt2_large": 774_030_080,
    "gpt2_xl": 1_557_611_200,
    "llama2_7b": 6_738_415_616,
    "llama3_8b": 8_030_261_248,
    "mistral_7b": 7_241_732_096,
}


def meta_model(preset: str, *overrides: str):
    return compose(load_config([f"model={preset}", *overrides]).model, device="meta")


@pytest.fixture(scope="module")
def models() -> dict:
    return {name: meta_model(name) for name in PRESETS}


def test_every_preset_composes_on_meta(models):
    assert set(PUBLISHED) | {"tiny", "mobile", "code", "bert_tiny"} <= set(PRESETS)
    for name, model in models.items():
        assert model.config.name == name, f"{name}.yaml should set name: {name}"
        assert all(p.is_meta for p in model.parameters()), name
        assert model.num_parameters() > 0


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_published_parameter_counts(models, preset):
    assert models[preset].num_parameters() == PUBLISHED[preset]


def test_gpt2_is_tied_and_llama_is_not(models):
    assert models["gpt2"].tied and models["gpt2_xl"].tied
    assert not models["llama3_8b"].tied and not models["mistral_7b"].tied


def test_architecture_details(models):
    llama3, mistral = models["llama3_8b"].config, models["mistral_7b"].config
    assert llama3.attention.type == "gqa" and llama3.attention.num_kv_heads == 8 and llama3.position.theta == 500000.0
    assert llama3.ffn.type == "swiglu" and llama3.ffn.intermediate_size == 14336 and llama3.norm.type == "rmsnorm"
    assert mistral.attention.type == "sliding_window" and mistral.attention.window == 4096
    gpt2 = models["gpt2"].config
    assert gpt2.position.type == "learned" and gpt2.block.type == "pre_norm" and gpt2.ffn.activation == "gelu_tanh"


def test_tiny_is_about_a_million_parameters():
    model = compose(load_config(["model=tiny"]).model, seed=0)
    assert 500_000 <= model.num_parameters() <= 1_500_000
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    out = model(x, labels=x)
    assert out.logits.shape == (2, 16, model.config.vocab_size) and torch.isfinite(out.loss)


def test_mobile(models):
    cfg = models["mobile"].config
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads) == (256, 4, 4)
    dropouts = [cfg.dropout, cfg.block.dropout, cfg.attention.dropout, cfg.ffn.dropout]
    assert dropouts == [0.0] * 4
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in models["mobile"].modules())


def test_code(models):
    cfg = models["code"].config
    assert cfg.vocab_size == 50400 and cfg.max_position_embeddings == 8192
    assert models["code"].embed.weight.shape[0] >= 50400


def test_bert_tiny_is_a_post_norm_classifier():
    cfg = load_config(["model=bert_tiny"]).model
    model = compose(cfg, seed=0).eval()
    c = model.config
    assert c.attention.causal is False and c.block.type == "post_norm" and c.head.type == "classification"
    assert model.final_norm is None and model.embed_norm is not None
    x = torch.randint(0, c.vocab_size, (2, 8))
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    out = model(x, attention_mask=mask, labels=torch.tensor([0, 1]))
    assert out.logits.shape == (2, c.head.num_classes) and torch.isfinite(out.loss)
    changed = x.clone()
    changed[:, -1] = (x[:, -1] + 1) % c.vocab_size
    assert not torch.allclose(model(changed).logits[0], model(x).logits[0]), "bidirectional: later tokens matter"


def test_presets_accept_overrides():
    model = meta_model("llama3_8b", "model.num_layers=4")
    assert len(model.layers) == 4 and model.config.num_layers == 4
    per_layer = (4096 * (4096 + 2 * 1024) + 4096 * 4096) + 3 * 4096 * 14336 + 2 * 4096
    assert model.num_parameters() == 2 * 128256 * 4096 + 4096 + 4 * per_layer
