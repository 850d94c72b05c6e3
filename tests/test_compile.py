"""torch.compile(fullgraph=True) on every preset: zero graph breaks, the same loss as eager.

Each preset keeps its component types (block, attention, ffn, norm, position, head) but is shrunk
(2 layers, 64 wide, vocabulary 128, context 64) so compiling stays cheap. Every preset is traced with
the ``aot_eager`` backend (Dynamo's whole-graph capture plus AOTAutograd, forward and backward); two
representative presets also go through Inductor, the default backend, in training mode.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from composer import compose, conf_dir, load_config
from composer.schema import resolve_model_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PRESETS = sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml") if not p.stem.startswith("_"))
B, T = 2, 24


def shrunk(preset: str) -> dict:
    """The preset's config with small sizes and the same component types."""
    raw = resolve_model_config(load_config([f"model={preset}"]).model).to_dict()
    raw.update(
        num_layers=min(2, raw["num_layers"]), hidden_size=64, num_heads=4, vocab_size=128, max_position_embeddings=64
    )
    att = raw["attention"]
    att.update(num_heads=None, head_dim=None)
    if att.get("num_kv_heads") is not None:
        att["num_kv_heads"] = 2
    if att.get("window") is not None:
        att["window"] = 8  # shorter than T: the window really masks
    if "intermediate_size" in raw["ffn"]:
        raw["ffn"]["intermediate_size"] = None
    return raw


def batch(model) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=gen)
    if model.config.head.type == "classification":
        return ids, torch.tensor([0, 1])
    return ids, ids


def compiled_loss(model, backend: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(eager loss, compiled loss) of the training step's call (the lm head's fused loss); the compiled model
    must be one graph."""
    torch._dynamo.reset()
    counters.clear()
    ids, labels = batch(model)
    model.train(train)
    torch.manual_seed(0)
    eager = model(ids, labels=labels, return_logits=False).loss
    fast = torch.compile(model, fullgraph=True, backend=backend)
    torch.manual_seed(0)
    loss = fast(ids, labels=labels, return_logits=False).loss
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    return eager, loss


def test_every_preset_is_covered():
    assert {"tiny", "gpt2", "llama3_8b", "mistral_7b", "code", "bert_tiny", "mobile"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_compiles_to_one_graph(preset):
    model = compose(shrunk(preset), seed=0)
    eager, loss = compiled_loss(model, "aot_eager", train=False)
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
    loss.backward()  # the backward graph is traced too
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad), preset


@pytest.mark.parametrize("preset", ["gpt2", "llama3_8b"])
def test_inductor_training_step_matches_eager(preset):
    model = compose(shrunk(preset) | {"dropout": 0.0}, seed=0)
    eager, loss = compiled_loss(model, "inductor", train=True)
    torch.testing.assert_close(loss, eager, rtol=1e-4, atol=1e-4)
    loss.backward()
    assert torch.isfinite(model.embed.weight.grad).all()


@pytest.mark.parametrize("mode", ["every_layer", "attention", "ffn"])
def test_gradient_checkpointing_and_fused_loss_compile_to_one_graph(mode):
    raw = shrunk("tiny") | {"dropout": 0.0, "gradient_checkpointing": mode}
    raw["head"] = {"type": "lm", "loss_chunk_size": 16}
    model = compose(raw, seed=0)
    eager, loss = compiled_loss(model, "aot_eager", train=True)
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
    loss.backward()
