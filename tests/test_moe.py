"""Mixture of experts: routing against transformers' own MoE blocks (weights copied, float32 within
1e-5), every router / balancer option building, routing and training, the aux-loss-free bias (direction,
balancing effect, saved with the weights, updated by the Lightning callback), grouped == loop (outputs and
gradients), the expert-load metrics and the planner's active parameters."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import small_model_dict

from components.moe_experts import clamped_swiglu, grouped_mm_supported
from composer import ComposedModel, compose
from composer.callbacks import MoEBalance
from composer.errors import ConfigError
from composer.lit import LitComposer
from composer.plan import plan

T = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def moe_layer(hidden: int = 32, heads: int = 4, **ffn):
    """The MoE of layer 0 of a small composed model (float32, initialised with seed 0)."""
    ffn = {"type": "moe", **ffn}
    model = compose(small_model_dict(hidden_size=hidden, num_heads=heads, ffn=ffn, dropout=0.0), seed=0)
    return model.layers[0].ffn


def randomise(*modules) -> None:
    """Non-trivial weights everywhere (biases and correction biases included)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in modules:
            for t in [*module.parameters(), *module.buffers()]:
                if t.is_floating_point():
                    t.copy_(torch.randn(t.shape, generator=gen) * 0.3)


def stack(w: torch.Tensor) -> torch.Tensor:
    """transformers' [E, out, in] expert weights as our [E * out, in] stacked Linear weight."""
    return w.reshape(-1, w.shape[-1])


def copy_(dst: torch.Tensor, src: torch.Tensor) -> None:
    with torch.no_grad():
        dst.copy_(src)


def hidden(n: int = 2, t: int = 9, c: int = 32) -> torch.Tensor:
    return torch.randn(n, t, c, generator=torch.Generator().manual_seed(2))


COMPUTES = ["loop", "padded", "grouped"]


# ============================================================================ against transformers
@pytest.mark.parametrize("compute", COMPUTES)
def test_mixtral_block(compute):
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # late: optional dependency

    cfg = T.MixtralConfig(hidden_size=32, intermediate_size=20, num_local_experts=5, num_experts_per_tok=2)
    theirs = MixtralSparseMoeBlock(cfg).eval()
    randomise(theirs)
    ours = moe_layer(num_experts=5, top_k=2, expert={"type": "swiglu", "intermediate_size": 20}, expert_compute=compute)
    copy_(ours.router.weight, theirs.gate.weight)
    copy_(ours.experts.gate_up.weight, stack(theirs.experts.gate_up_proj))
    copy_(ours.experts.down.weight, stack(theirs.experts.down_proj))
    x = hidden()
    torch.testing.assert_close(ours(x)[0], theirs(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("compute", COMPUTES)
def test_qwen3_moe_block(normalize, compute):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # late: optional

    cfg = T.Qwen3MoeConfig(
        hidden_size=36, moe_intermediate_size=12, num_experts=7, num_experts_per_tok=3, norm_topk_prob=normalize
    )
    theirs = Qwen3MoeSparseMoeBlock(cfg).eval()
    randomise(theirs)
    ours = moe_layer(
        36,
        num_experts=7,
        top_k=3,
        normalize_top_k=normalize,
        expert={"type": "swiglu", "intermediate_size": 12},
        expert_compute=compute,
    )
    copy_(ours.router.weight, theirs.gate.weight)
    copy_(ours.experts.gate_up.weight, stack(theirs.experts.gate_up_proj))
    copy_(ours.experts.down.weight, stack(theirs.experts.down_proj))
    x = hidden(c=36)
    torch.testing.assert_close(ours(x)[0], theirs(x), rtol=0, atol=1e-5)


def _copy_gated_mlp(ours, theirs) -> None:
    """transformers' gate_proj / up_proj / down_proj MLP into our fused [gate | up] SwiGLU."""
    copy_(ours.gate_up.weight, torch.cat([theirs.gate_proj.weight, theirs.up_proj.weight]))
    copy_(ours.down.weight, theirs.down_proj.weight)


@pytest.mark.parametrize("compute", COMPUTES)
def test_deepseek_v3_moe(compute):
    """Sigmoid scores, the correction bias (random: it changes the choice), group-limited top-k,
    renormalisation, routed scaling and a shared expert."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # late: optional

    cfg = T.DeepseekV3Config(
        hidden_size=32,
        moe_intermediate_size=16,
        n_routed_experts=12,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        n_shared_experts=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    )
    theirs = DeepseekV3MoE(cfg).eval()
    randomise(theirs)
    ours = moe_layer(
        type="moe_deepseek",
        num_experts=12,
        top_k=3,
        n_group=4,
        topk_group=2,
        expert={"type": "swiglu", "intermediate_size": 16},
        shared_experts=2,
        shared_expert={"type": "swiglu", "intermediate_size": 16},
        expert_compute=compute,
    )
    copy_(ours.router.weight, theirs.gate.weight)
    copy_(ours.router.load.e_score_correction_bias, theirs.gate.e_score_correction_bias)
    copy_(ours.experts.gate_up.weight, stack(theirs.experts.gate_up_proj))
    copy_(ours.experts.down.weight, stack(theirs.experts.down_proj))
    _copy_gated_mlp(ours.shared, theirs.shared_experts)
    x = hidden()
    torch.testing.assert_close(ours(x)[0], theirs(x), rtol=0, atol=1e-5)
    # the bias moved the choice (the test is not vacuous): without it the output differs
    copy_(ours.router.load.e_score_correction_bias, torch.zeros(12))
    assert not torch.allclose(ours(x)[0], theirs(x), atol=1e-3)


def test_qwen2_moe_gated_shared_expert():
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock  # late: optional

    cfg = T.Qwen2MoeConfig(
        hidden_size=32,
        moe_intermediate_size=12,
        shared_expert_intermediate_size=40,
        num_experts=6,
        num_experts_per_tok=2,
        norm_topk_prob=False,
    )
    theirs = Qwen2MoeSparseMoeBlock(cfg).eval()
    randomise(theirs)
    ours = moe_layer(
        num_experts=6,
        top_k=2,
        normalize_top_k=False,
        expert={"type": "swiglu", "intermediate_size": 12},
        shared_experts=1,
        shared_expert={"type": "swiglu", "intermediate_size": 40},
        shared_expert_gate=True,
    )
    copy_(ours.router.weight, theirs.gate.weight)
    copy_(ours.experts.gate_up.weight, stack(theirs.experts.gate_up_proj))
    copy_(ours.experts.down.weight, stack(theirs.experts.down_proj))
    _copy_gated_mlp(ours.shared, theirs.shared_expert)
    copy_(ours.shared_gate.weight, theirs.shared_expert_gate.weight)
    x = hidden()
    torch.testing.assert_close(ours(x)[0], theirs(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("compute", COMPUTES)
def test_gpt_oss_mlp(compute):
    """Router bias, softmax over the chosen logits, clamped SwiGLU experts with biases (transformers
    interleaves gate / up columns and stores [E, in, out]; ours is [gate | up] rows of [E, out, in])."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP  # late: optional dependency

    cfg = T.GptOssConfig(hidden_size=32, intermediate_size=16, num_local_experts=6, num_experts_per_tok=2)
    theirs = GptOssMLP(cfg).eval()
    randomise(theirs)
    with torch.no_grad():
        theirs.experts.gate_up_proj.mul_(10)  # pre-activations beyond the clamp limit (7) occur
        theirs.experts.down_proj.mul_(0.1)  # outputs of order 1 (float32 resolution below 1e-5)
    ours = moe_layer(
        type="moe_gpt_oss",
        num_experts=6,
        top_k=2,
        expert={"type": "swiglu_clamped", "intermediate_size": 16},
        expert_compute=compute,
    )
    e = theirs.experts
    w = e.gate_up_proj.transpose(1, 2)  # [E, 2I, C], rows interleaved gate, up, gate, ...
    copy_(ours.router.weight, theirs.router.weight)
    copy_(ours.router.bias, theirs.router.bias)
    copy_(ours.experts.gate_up.weight, stack(torch.cat([w[:, 0::2], w[:, 1::2]], dim=1)))
    copy_(
        ours.experts.gate_up.bias, torch.cat([e.gate_up_proj_bias[:, 0::2], e.gate_up_proj_bias[:, 1::2]], 1).flatten()
    )
    copy_(ours.experts.down.weight, stack(e.down_proj.transpose(1, 2)))
    copy_(ours.experts.down.bias, e.down_proj_bias.flatten())
    x = hidden()
    gate_up = x @ e.gate_up_proj[0] + e.gate_up_proj_bias[0]
    assert (gate_up.abs() > 7).any(), "the clamp is exercised"
    torch.testing.assert_close(ours(x)[0], theirs(x)[0], rtol=0, atol=1e-5)


def test_clamped_swiglu_formula():
    gate, up = torch.tensor([-9.0, 0.5, 9.0]), torch.tensor([-9.0, 0.5, 9.0])
    want = (up.clamp(-7, 7) + 1) * gate.clamp(max=7) * torch.sigmoid(1.702 * gate.clamp(max=7))
    torch.testing.assert_close(clamped_swiglu(gate, up, 7.0, 1.702), want)


# ============================================================================ every option
OPTIONS = {
    "softmax": {},
    "softmax-unnormalised-scaled": {"normalize_top_k": False, "routed_scaling_factor": 2.0},
    "sigmoid": {"score": "sigmoid"},
    "groups": {"num_experts": 8, "n_group": 4, "topk_group": 2, "top_k": 3},
    "router_bias": {"router_bias": True},
    "z_loss": {"z_loss_weight": 0.01, "aux_loss_weight": 0.0},
    "aux_free": {"aux_free_bias": True, "aux_loss_weight": 0.0, "bias_update_rate": 0.01},
    "shared": {"shared_experts": 2, "shared_expert": {"type": "mlp", "intermediate_size": 8}},
    "shared_gated": {"shared_experts": 1, "shared_expert_gate": True},
    "mlp_experts": {"expert": {"type": "mlp", "intermediate_size": 16, "bias": True}},
    "geglu_experts": {"expert": {"type": "geglu", "intermediate_size": 16}},
    "clamped_experts": {"expert": {"type": "swiglu_clamped", "intermediate_size": 16}},
    "deepseek": {"type": "moe_deepseek"},
    "gpt_oss": {"type": "moe_gpt_oss"},
    "loop": {"expert_compute": "loop"},
    "padded": {"expert_compute": "padded"},
    "grouped": {"expert_compute": "grouped"},
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_every_option_builds_routes_and_trains(name):
    ffn = {"type": "moe", "num_experts": 4, "top_k": 2, "expert": {"type": "swiglu", "intermediate_size": 16}}
    model = compose(small_model_dict(ffn={**ffn, **OPTIONS[name]}, dropout=0.0), seed=0).train()
    moe = model.layers[0].ffn
    x = hidden()
    route = moe.router(x.reshape(-1, 32))
    k = moe.top_k
    assert route.chosen.shape == (18, k) and (route.chosen.sort(-1).values.diff(dim=-1) > 0).all(), "distinct experts"
    assert int(route.counts.sum()) == 18 * k
    if moe.router.normalize:
        torch.testing.assert_close(route.weights.sum(-1), torch.full((18,), moe.router.scale))
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        out = model(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        assert moe.router.weight.grad.abs().sum() > 0, "the router learns"
        opt.step()
        for m in model.modules():
            if hasattr(m, "after_optimizer_step"):
                m.after_optimizer_step()
        losses.append(float(out.loss))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_z_loss_and_sigmoid_aux_loss_formulas():
    moe = moe_layer(num_experts=4, top_k=2, score="sigmoid", aux_loss_weight=0.3, z_loss_weight=0.05)
    x = hidden().reshape(-1, 32)
    route = moe.router(x)
    logits = x @ moe.router.weight.T
    scores = logits.sigmoid()
    share = torch.bincount(route.chosen.flatten(), minlength=4).float() / route.chosen.numel()
    aux = 4 * (share * (scores / scores.sum(-1, keepdim=True)).mean(0)).sum() * 0.3
    z = torch.logsumexp(logits, -1).square().mean() * 0.05
    torch.testing.assert_close(route.loss, aux + z)
    picked = scores.topk(2).indices
    assert torch.equal(route.chosen.sort(-1).values, picked.sort(-1).values)


@pytest.mark.parametrize(
    "ffn,where,what",
    [
        ({"num_experts": 6, "n_group": 4}, "model.ffn.n_group", "does not divide"),
        ({"num_experts": 8, "n_group": 4, "topk_group": 5}, "model.ffn.topk_group", "exceeds n_group"),
        ({"num_experts": 8, "n_group": 4, "topk_group": 1, "top_k": 3}, "model.ffn.top_k", "topk_group=1"),
        ({"expert": {"type": "moe"}}, "model.ffn.expert.type", "cannot itself be a mixture"),
        ({"score": "relu"}, "model.ffn.score", "relu"),
        ({"expert_compute": "fast"}, "model.ffn.expert_compute", "fast"),
    ],
)
def test_bad_options_are_named(ffn, where, what):
    with pytest.raises(ConfigError) as err:
        compose(small_model_dict(ffn={"type": "moe", **ffn}), device="meta")
    assert where in str(err.value) and what in str(err.value)


# ============================================================================ aux-loss-free balancing
def _skewed(rate: float = 0.01, **ffn):
    """An MoE whose router sends most tokens to expert 0 (all inputs positive, expert 0's row too)."""
    moe = moe_layer(
        num_experts=4, top_k=1, aux_free_bias=True, bias_update_rate=rate, aux_loss_weight=0.0, score="sigmoid", **ffn
    )
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
        moe.router.weight[0] += 0.3
    x = torch.rand(4, 16, 32, generator=torch.Generator().manual_seed(4))
    return moe.train(), x


def test_aux_free_bias_moves_against_the_load():
    moe, x = _skewed()
    moe(x)
    load = moe.router.load.pending.clone()
    assert load[0] == load.max() and load.sum() == 64
    moe.after_optimizer_step()
    bias = moe.router.load.e_score_correction_bias
    want = torch.sign(load.float().mean() - load.float()) * 0.01
    torch.testing.assert_close(bias, want)
    assert bias[0] < 0 and int(moe.router.load.pending.sum()) == 0
    moe.eval()(x)  # evaluation does not count
    assert int(moe.router.load.pending.sum()) == 0


def test_aux_free_bias_selects_but_does_not_weigh():
    moe, x = _skewed()
    flat = x.reshape(-1, 32)
    before = moe.router(flat)
    with torch.no_grad():
        moe.router.load.e_score_correction_bias[3] = 10.0
    after = moe.router(flat)
    assert (after.chosen == 3).all() and not (before.chosen == 3).all()
    torch.testing.assert_close(after.weights[:, 0], torch.ones(64))  # top-1 renormalised: the score, not the bias
    unnormalised = moe_layer(num_experts=4, top_k=1, aux_free_bias=True, normalize_top_k=False, score="sigmoid")
    with torch.no_grad():
        unnormalised.router.load.e_score_correction_bias[3] = 10.0
    route = unnormalised.router(flat)
    torch.testing.assert_close(route.weights[:, 0], (flat @ unnormalised.router.weight[3]).sigmoid())


def test_aux_free_updates_balance_the_load():
    moe, x = _skewed(rate=0.02)
    moe.requires_grad_(False)

    def max_over_mean() -> float:
        moe(x)
        load = moe.take_expert_load().float()
        return float(load.max() / load.mean())

    start = max_over_mean()
    moe.router.load.pending.zero_()
    for _ in range(60):
        moe(x)
        moe.after_optimizer_step()
    assert start == 4.0 and max_over_mean() < 2.0  # every token on expert 0, then at most half the excess


def test_aux_free_bias_is_saved_and_loaded(tmp_path):
    model = compose(
        small_model_dict(ffn={"type": "moe_deepseek", "expert": {"type": "swiglu", "intermediate_size": 16}}), seed=0
    )
    bias = model.layers[1].ffn.router.load.e_score_correction_bias
    with torch.no_grad():
        bias.copy_(torch.arange(8.0) / 100)
    assert "layers.1.ffn.router.load.e_score_correction_bias" in model.state_dict()
    assert not any(k.endswith((".seen", ".pending")) for k in model.state_dict())
    model.save_pretrained(tmp_path / "m")
    loaded = ComposedModel.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(loaded.layers[1].ffn.router.load.e_score_correction_bias, bias)
    assert int(loaded.layers[1].ffn.router.load.pending.sum()) == 0
    x = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(loaded(x).logits, model(x).logits)


# ============================================================================ grouped == loop
@pytest.mark.parametrize("expert", ["swiglu", "mlp", "swiglu_clamped"])
@pytest.mark.parametrize("compute", ["grouped", "padded"])
def test_grouped_equals_loop_with_gradients(expert, compute):
    ffn = dict(num_experts=8, top_k=3, expert={"type": expert, "intermediate_size": 24, "bias": True})
    fast, ref = moe_layer(expert_compute=compute, **ffn), moe_layer(expert_compute="loop", **ffn)
    randomise(fast)
    ref.load_state_dict(fast.state_dict())
    x = hidden(4, 11)
    assert fast.experts.kernel(x) == compute, "the path under test is the one taken"
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ya, aux_a), (yb, aux_b) = fast(xa), ref(xb)
    torch.testing.assert_close(ya, yb, rtol=0, atol=1e-5)
    g = torch.randn_like(ya) / ya.numel() ** 0.5  # a loss of order 1: gradients of order 1
    (ya * g).sum().add(aux_a).backward()
    (yb * g).sum().add(aux_b).backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-5)
    for (name, a), b in zip(fast.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_compiled_path_equals_loop(monkeypatch):
    """Inside torch.compile a float32 MoE runs every expert on every token (no data-dependent shapes):
    the same output and gradients as the loop."""
    ffn = dict(num_experts=5, top_k=2, expert={"type": "swiglu_clamped", "intermediate_size": 16})
    fast, ref = moe_layer(**ffn), moe_layer(expert_compute="loop", **ffn)
    randomise(fast)
    ref.load_state_dict(fast.state_dict())
    x = hidden()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert fast.experts.kernel(x) == "dense" and fast.experts.kernel(x.bfloat16()) == "grouped"
    ya, yb = fast(x)[0], ref(x)[0]
    torch.testing.assert_close(ya, yb, rtol=0, atol=1e-5)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for a, b in zip(fast.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_grouped_mm_guard():
    cpu = torch.device("cpu")
    assert grouped_mm_supported(cpu, torch.float32, 32, 16) and grouped_mm_supported(cpu, torch.bfloat16, 32, 8)
    assert not grouped_mm_supported(cpu, torch.float32, 33, 16), "rows must be 16-byte aligned"
    assert not grouped_mm_supported(cpu, torch.float64, 32, 16)
    moe = moe_layer(36, expert_compute="grouped", expert={"type": "swiglu", "intermediate_size": 13})
    assert moe.experts.kernel(hidden(c=36)) == "padded", "unaligned sizes fall back"
    assert moe_layer(expert_compute="auto").experts.kernel(hidden()) == "grouped", "auto where it runs"
    unaligned = moe_layer(36, expert_compute="auto", expert={"type": "swiglu", "intermediate_size": 13})
    assert unaligned.experts.kernel(hidden(c=36)) == "loop", "auto on a CPU where it does not"


def test_grouped_runs_in_bf16_and_under_autocast():
    moe = moe_layer(expert_compute="grouped", expert={"type": "swiglu", "intermediate_size": 16})
    x = hidden()
    ref = moe(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)[0]
    assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), ref, atol=3e-2)
    y = moe.to(torch.bfloat16)(x.bfloat16())[0]
    assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), ref, atol=3e-2)


# ============================================================================ metrics and plan
def test_expert_load_counts_training_slots_until_read():
    moe = moe_layer(num_experts=4, top_k=2)
    x = hidden()
    moe.train()(x)
    moe(x)
    moe.eval()(x)
    load = moe.take_expert_load()
    assert load.dtype == torch.int64 and int(load.sum()) == 2 * 18 * 2
    assert int(moe.take_expert_load().sum()) == 0


def test_callback_balances_after_steps_and_logs_load_at_intervals(tmp_path, monkeypatch):
    ffn = {"type": "moe_deepseek", "expert": {"type": "swiglu", "intermediate_size": 16}, "bias_update_rate": 0.01}
    model = compose(small_model_dict(ffn=ffn, dropout=0.0), seed=0)
    moes = [layer.ffn for layer in model.layers]
    reads = []
    for moe in moes:
        monkeypatch.setattr(moe, "take_expert_load", lambda m=moe: reads.append(1) or type(m).take_expert_load(m))
    ids = torch.randint(0, 64, (24, 16), generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader([{"input_ids": r, "labels": r} for r in ids], batch_size=4)
    lit = LitComposer(model, optim={"name": "adamw", "lr": 1e-3}, scheduler={"name": "constant"})
    path = tmp_path / "expert_load.jsonl"
    trainer = L.Trainer(
        max_steps=6,
        log_every_n_steps=3,
        callbacks=[MoEBalance(path)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(lit, train_dataloaders=data)
    assert len(reads) == 2 * len(moes), "the loads are read at the two log intervals only"
    for moe in moes:
        bias = moe.router.load.e_score_correction_bias
        steps = bias / 0.01  # six updates of +-0.01 each: a sum of six signs
        assert bias.abs().max() > 0 and steps.abs().max() <= 6 + 1e-4
        torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["layer"] for r in rows} == {"layer_0", "layer_1"} and {r["step"] for r in rows} == {3, 6}
    for r in rows:
        assert len(r["share"]) == 8 and abs(sum(r["share"]) - 1) < 1e-9 and r["max_mean"] >= 1
    assert "expert_load_max_mean/layer_1" in trainer.callback_metrics


def test_plan_reports_total_and_active_parameters():
    expert = {"type": "swiglu", "intermediate_size": 24}
    ffn = {"type": "moe", "num_experts": 6, "top_k": 2, "expert": expert, "shared_experts": 1, "shared_expert": expert}
    cfg = small_model_dict(ffn=ffn, layers=[{"select": 0, "ffn": {"type": "swiglu", "intermediate_size": 40}}])
    report = plan(cfg)
    model = compose(cfg, device="meta")
    one_expert = 3 * 32 * 24
    assert report.params_total == model.num_parameters()
    assert report.params_active == report.params_total - (6 - 2) * one_expert  # layer 1 only: layer 0 is dense
    dense = plan(small_model_dict(ffn={"type": "swiglu", "intermediate_size": 24}))
    router, shared = 2 * 32 * 6, 2 * one_expert
    moe_flops = router + 2 * 2 * one_expert + shared  # router + top_k experts + the shared expert
    assert report.flops_forward_per_token - dense.flops_forward_per_token == pytest.approx(
        (moe_flops - 2 * one_expert) + (2 * 3 * 32 * 40 - 2 * one_expert)
    )


def test_router_weights_follow_the_formula():
    moe = moe_layer(num_experts=5, top_k=2, normalize_top_k=False, routed_scaling_factor=1.5)
    x = hidden().reshape(-1, 32)
    route = moe.router(x)
    probs = F.softmax(x @ moe.router.weight.T, -1)
    top = probs.topk(2)
    torch.testing.assert_close(route.weights, top.values * 1.5)


def test_narrow_experts_are_not_warned_about_but_a_narrow_dense_ffn_is(caplog):
    """Fine-grained experts (intermediate < hidden) are the design of every modern MoE; a dense ffn that
    narrow is unusual and gets a warning naming its key."""
    narrow = {"type": "swiglu", "intermediate_size": 8}
    with caplog.at_level("WARNING"):
        compose(small_model_dict(ffn={"type": "moe", "num_experts": 4, "expert": narrow}), device="meta")
        deepseek = {"type": "moe_deepseek", "n_group": 1, "topk_group": 1, "expert": narrow}
        compose(small_model_dict(ffn=deepseek), device="meta")
    assert "bottleneck" not in caplog.text
    with caplog.at_level("WARNING"):
        compose(small_model_dict(ffn=narrow), device="meta")
    assert "model.ffn.intermediate_size: 8 is smaller than hidden_size" in caplog.text


def test_placement_first_dense_layers_and_every_kth_layer_through_a_layer_pattern():
    """DeepSeek's first_k_dense and "MoE every other layer" are layer patterns of two layer kinds."""
    moe = {"type": "moe", "num_experts": 4, "top_k": 2, "expert": {"type": "swiglu", "intermediate_size": 16}}
    kinds = {"dense": {"ffn": {"type": "swiglu", "intermediate_size": 48}}, "sparse": {"ffn": moe}}
    first_k = small_model_dict(
        num_layers=5, layer_kinds=kinds, layer_pattern={"first": ["dense"] * 2, "cycle": ["sparse"]}
    )
    every_2 = small_model_dict(num_layers=6, layer_kinds=kinds, layer_pattern=["dense", "sparse"])
    for raw, want in ((first_k, ["swiglu"] * 2 + ["moe"] * 3), (every_2, ["swiglu", "moe"] * 3)):
        m = compose(raw, seed=0)
        assert [m.config.layer(i).ffn.type for i in range(m.config.num_layers)] == want
        report = plan(m.config, seq_len=16)
        routed_idle = sum(
            sum(p.numel() for p in layer.ffn.experts.parameters()) // 2  # 2 of 4 experts idle per token
            for layer in m.layers
            if hasattr(layer.ffn, "experts")
        )
        assert report.params_total == m.num_parameters() and report.params_active == m.num_parameters() - routed_idle
        out = m(torch.randint(0, m.config.vocab_size, (2, 9)), labels=torch.randint(0, m.config.vocab_size, (2, 9)))
        assert torch.isfinite(out.loss) and out.aux_loss is not None
