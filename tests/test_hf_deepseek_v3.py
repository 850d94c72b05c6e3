"""Parity with transformers' DeepseekV3ForCausalLM (composer/hf/deepseek_v3.py): small random models built
by transformers itself (odd sizes, non-trivial norm weights, biases and correction biases) are imported
(float32 logits within 1e-4, identical greedy tokens, a left-padded row equal to its prompt alone),
exported back (transformers reloads them with the same logits and exactly the same weights), and a
composer-native DeepSeek-style model exports and comes back. transformers runs eager attention and
eager experts (its grouped-matmul experts need 16-byte-aligned rows, which odd sizes are not)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from composer import ConfigError, compose
from composer.hf import export_hf, import_hf
from tests.conftest import small_model_dict
from tests.test_hf_parity import randomize

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_torch_thread")

V, ATOL = 96, 1e-4
EAGER = dict(attn_implementation="eager", experts_implementation="eager")
BASE = dict(
    vocab_size=V,
    hidden_size=30,
    intermediate_size=44,
    moe_intermediate_size=10,
    num_attention_heads=3,
    num_key_value_heads=3,
    kv_lora_rank=10,
    qk_nope_head_dim=7,
    qk_rope_head_dim=6,
    v_head_dim=5,
    n_routed_experts=8,
    num_experts_per_tok=3,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
YARN = {
    "rope_type": "yarn",
    "rope_theta": 500.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "mscale": 0.8,
    "mscale_all_dim": 0.9,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
}
CONFIGS = {
    # q compression, attention biases, YaRN (a cos/sin temperature and the softmax mscale), one dense
    # layer first, group-limited routing, two shared experts
    "q_lora_yarn_dense_first": dict(
        num_hidden_layers=3,
        first_k_dense_replace=1,
        q_lora_rank=12,
        attention_bias=True,
        rope_parameters=YARN,
        n_group=4,
        topk_group=2,
        n_shared_experts=2,
        routed_scaling_factor=2.5,
    ),
    # a plain q_proj, default rope, every layer a mixture, one group, no renormalisation, tied embeddings
    "plain_q_all_moe": dict(
        num_hidden_layers=2,
        first_k_dense_replace=0,
        q_lora_rank=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
        n_group=1,
        topk_group=1,
        n_shared_experts=1,
        norm_topk_prob=False,
        routed_scaling_factor=1.5,
        tie_word_embeddings=True,
    ),
}


def hf_load(folder: Path):
    return T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **EAGER).eval()


def _randomize(model: torch.nn.Module, seed: int) -> None:
    randomize(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # the correction biases change which experts are chosen
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.05 * torch.randn(buf.shape, generator=gen))


@pytest.fixture(scope="module", params=list(CONFIGS))
def family(request, tmp_path_factory):
    """(name, HF model, its folder, the imported composed model)."""
    config = T.DeepseekV3Config(**BASE, **CONFIGS[request.param])
    hf = T.AutoModelForCausalLM.from_config(config, **EAGER).eval()
    _randomize(hf, seed=len(request.param))
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, folder, import_hf(folder)


def _ids(seed: int = 1, batch: int = 2, length: int = 20) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_imported_logits_match(family):
    name, hf, _, ours = family
    x = _ids()
    with torch.no_grad():
        want, got = hf(x).logits, ours(x).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    cfg, published = ours.config, CONFIGS[name]
    dense = published["first_k_dense_replace"]
    kinds = [cfg.layer(i).ffn.type for i in range(cfg.num_layers)]
    assert kinds == ["swiglu"] * dense + ["moe_deepseek"] * (cfg.num_layers - dense)
    assert cfg.attention.type == "mla" and cfg.attention.q_lora_rank == published["q_lora_rank"]
    assert ours.layers[0].attn.spec.scale == pytest.approx(hf.model.layers[0].self_attn.scaling, rel=1e-12)
    assert ours.tied == bool(published.get("tie_word_embeddings", False))


def test_greedy_generation_matches(family):
    _, hf, _, ours = family
    prompt = _ids(seed=2, batch=1, length=6)
    want = hf.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
    got = ours.generate(prompt, max_new_tokens=16, do_sample=False)
    assert want.shape == (1, 22)
    assert torch.equal(got, want)


def test_left_padded_row_equals_its_prompt_alone(family):
    _, hf, _, ours = family
    long, short = _ids(seed=4, batch=1, length=9), _ids(seed=5, batch=1, length=6)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        padded = ours(batch, attention_mask=mask).logits[1, 3:]
        torch.testing.assert_close(padded, hf(short).logits[0], atol=ATOL, rtol=0)
    together = ours.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False)
    alone = hf.generate(short, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(together[1, 9:], alone[0, 6:])


def test_export_round_trip_reloads_in_transformers(family, tmp_path):
    _, hf, _, ours = family
    export_hf(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    back = hf_load(tmp_path)
    x = _ids(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, hf(x).logits, atol=ATOL, rtol=0)
    theirs, exported = hf.state_dict(), back.state_dict()
    assert set(exported) == set(theirs)
    for key, value in exported.items():  # exactly the original weights, experts unstacked again
        assert torch.equal(value, theirs[key]), key


def test_transformers_4x_config_spelling_imports_the_same(family, tmp_path):
    """4.x wrote rope_theta / rope_scaling (DeepSeek-V3's own config.json: {type: yarn, ...})."""
    _, _, folder, ours = family
    data = json.loads((folder / "config.json").read_text())
    params = data.pop("rope_parameters")
    data["rope_theta"] = params.pop("rope_theta")
    if params["rope_type"] != "default":
        data["rope_scaling"] = {"type": params.pop("rope_type"), **params}
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(data))
    again = import_hf(tmp_path)
    assert again.config.to_dict() == ours.config.to_dict()


NATIVE = small_model_dict(
    vocab_size=V,
    hidden_size=30,
    num_heads=3,
    num_layers=3,
    attention={"type": "mla", "q_lora_rank": 12, "kv_lora_rank": 10, "qk_nope_head_dim": 7, "qk_rope_head_dim": 6},
    ffn={
        "type": "moe_deepseek",
        "num_experts": 8,
        "top_k": 2,
        "n_group": 2,
        "topk_group": 1,
        "expert": {"type": "swiglu", "intermediate_size": 12},
        "shared_experts": 1,
        "shared_expert": {"type": "swiglu", "intermediate_size": 12},
    },
    norm={"type": "rmsnorm", "eps": 1e-6},
    position={"type": "rope", "theta": 1000.0},
    tie_embeddings=False,
    layers=[{"select": "0:2", "ffn": {"type": "swiglu", "intermediate_size": 40}}],
)


def test_native_model_exports_to_transformers(tmp_path):
    model = compose(NATIVE, seed=5).eval()
    _randomize(model, seed=6)
    export_hf(model, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["first_k_dense_replace"] == 2 and config["n_routed_experts"] == 8
    back = hf_load(tmp_path / "hf")
    x = _ids(seed=4, length=16)
    with torch.no_grad():
        want = model(x).logits
        torch.testing.assert_close(back(x).logits, want, atol=ATOL, rtol=0)
        again = import_hf(tmp_path / "hf")
        torch.testing.assert_close(again(x).logits, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "change,key",
    [
        ({"attention": {**NATIVE["attention"], "logit_softcap": 30.0}}, "logit_softcap"),
        ({"attention": {**NATIVE["attention"], "softmax_scale": 0.3}}, "softmax_scale"),
        ({"ffn": {**NATIVE["ffn"], "router_bias": True}}, "router_bias"),
        ({"ffn": {**NATIVE["ffn"], "shared_expert": {"type": "swiglu", "intermediate_size": 20}}}, "shared_expert"),
        ({"layers": [{"select": [1], "ffn": {"type": "swiglu", "intermediate_size": 40}}]}, "ffn"),
    ],
)
def test_compositions_without_an_equivalent_are_refused(change, key, tmp_path):
    model = compose({**NATIVE, **change}, device="meta")
    with pytest.raises(ConfigError) as err:
        export_hf(model, tmp_path / "hf")
    assert key in str(err.value)
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    "change,key",
    [({"num_key_value_heads": 1}, "num_key_value_heads"), ({"hidden_act": "gelu"}, "hidden_act")],
)
def test_configs_without_an_equivalent_are_refused_on_import(family, change, key, tmp_path):
    _, _, folder, _ = family
    data = {**json.loads((folder / "config.json").read_text()), **change}
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        import_hf(tmp_path)
    assert f"config.json:{key}" in str(err.value)
