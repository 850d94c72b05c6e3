"""Mixture of experts: a router sends each token to its top-k routed experts; shared experts see every token.

    routing  = router(x)                      scores, (group-limited) top-k, weights  (components/moe_router.py)
    y        = sum_j w_j * expert_{e_j}(x)    the k routed experts, stacked           (components/moe_experts.py)
             + g(x) * shared(x)               always-on shared experts (DeepSeek-MoE, arXiv:2401.06066),
                                              g = sigmoid(x W_g^T) with shared_expert_gate (Qwen-MoE), else 1

Dropless: every token is processed by all k experts it is routed to (no capacity limit). The forward
returns ``(y, loss)``: the balancing losses (Switch aux loss, z-loss), already weighted, which the model
adds to the training loss.

Three registered types share this module and differ only in their defaults (every option is on each):

    moe            softmax scores, top-k renormalised, aux loss           Switch, Mixtral, Qwen3-MoE
    moe_deepseek   sigmoid scores, group-limited top-k, routed scaling,   DeepSeek-V3
                   aux-loss-free correction bias, one shared expert
    moe_gpt_oss    router bias, softmax over the chosen, clamped          gpt-oss
                   SwiGLU experts with biases

Training hooks (duck-typed; ``composer.callbacks.MoEBalance`` calls them in a Lightning run, a plain
PyTorch loop calls them itself): ``after_optimizer_step(reduce=None)`` applies the aux-loss-free bias
update from the step's load; ``take_expert_load()`` returns the slots routed to each expert since the last
call (on the device: read it at log intervals only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from composer.contract import (
    FFN,
    BuildContext,
    ComponentConfig,
    Cost,
    CostCall,
    cost_of,
    linear_flops,
    option,
    param_count,
)

from .moe_experts import COMPUTE, STACKABLE, GroupedExperts
from .moe_router import SCORES, Router


@dataclass
class MoEConfig(ComponentConfig):
    """Top-k routed mixture of feed-forward experts with a load-balancing loss."""

    num_experts: int = option(8, help="routed experts per layer", min=1, bound="num_experts")
    top_k: int = option(2, help="experts each token is sent to", min=1, bound="num_experts")
    expert: dict = option(
        {"type": "swiglu"}, help="the routed experts' ffn config (mlp, swiglu, geglu, swiglu_clamped)", family="ffn"
    )
    score: str = option("softmax", help="softmax | sigmoid router scores", choices=SCORES)
    normalize_top_k: bool = option(True, help="renormalise the chosen experts' scores to sum to 1")
    routed_scaling_factor: float = option(1.0, help="scale of the routed experts' weights", min=0.0, max=1e3)
    n_group: int = option(1, help="expert groups for group-limited routing (1: none)", min=1, bound="num_experts")
    topk_group: Optional[int] = option(
        None, help="groups each token may use (null: all n_group)", min=1, bound="num_experts"
    )
    router_bias: bool = option(False, help="a bias on the router's logits (gpt-oss)")
    aux_loss_weight: float = option(0.01, help="scale of the load-balancing loss (0: off)", min=0.0, max=1e3)
    z_loss_weight: float = option(0.0, help="scale of the router z-loss (0: off)", min=0.0, max=1e3)
    aux_free_bias: bool = option(False, help="per-expert bias on the scores for selection only (aux-loss-free)")
    bias_update_rate: float = option(
        0.001, help="aux-loss-free update per optimizer step (0: the bias stays fixed)", min=0.0, max=1.0
    )
    shared_experts: int = option(0, help="always-on shared experts (0: none)", min=0, bound="num_experts")
    shared_expert: dict = option(
        {"type": "swiglu"}, help="one shared expert's ffn config (its own intermediate_size)", family="ffn"
    )
    shared_expert_gate: bool = option(False, help="scale the shared experts by sigmoid(Linear(C, 1)) (Qwen)")
    expert_compute: str = option("auto", help="auto | grouped | padded | loop (see moe_experts.py)", choices=COMPUTE)

    def summary(self) -> str:
        shared = f"+{self.shared_experts}s" if self.shared_experts else ""
        return f"{self.type}({self.top_k}/{self.num_experts}{shared}x{self.expert.type})"

    def resolve(self, model, check) -> None:
        if self.top_k > self.num_experts:
            check.fail("top_k", f"{self.top_k} exceeds num_experts={self.num_experts}", "choose top_k <= num_experts")
        for name in ("expert", "shared_expert"):
            kind = getattr(getattr(self, name), "type", None)
            if isinstance(getattr(self, name), MoEConfig):
                check.fail(
                    f"{name}.type",
                    "an expert cannot itself be a mixture of experts",
                    "use a dense ffn type (mlp, swiglu, geglu)",
                )
            elif name == "expert" and kind is not None and kind not in STACKABLE:
                check.fail("expert.type", f"'{kind}' experts cannot be stacked", f"use one of {', '.join(STACKABLE)}")
        self._check_groups(check)

    def _check_groups(self, check) -> None:
        if self.num_experts % self.n_group:
            check.fail(
                "n_group", f"{self.n_group} does not divide num_experts={self.num_experts}", "use a divisor of it"
            )
            return
        groups = self.n_group if self.topk_group is None else self.topk_group
        if groups > self.n_group:
            check.fail("topk_group", f"{groups} exceeds n_group={self.n_group}", "choose topk_group <= n_group")
        elif self.top_k > groups * (self.num_experts // self.n_group):
            check.fail(
                "top_k",
                f"{self.top_k} exceeds the {groups * (self.num_experts // self.n_group)} experts of "
                f"topk_group={groups} groups",
                "raise topk_group or lower top_k",
            )


@dataclass
class DeepSeekMoEConfig(MoEConfig):
    """DeepSeek-V3 routing: sigmoid scores, group-limited top-k, aux-loss-free bias, a shared expert."""

    score: str = option("sigmoid", help="softmax | sigmoid router scores", choices=SCORES)
    routed_scaling_factor: float = option(2.5, help="scale of the routed experts' weights", min=0.0, max=1e3)
    n_group: int = option(4, help="expert groups for group-limited routing (1: none)", min=1, bound="num_experts")
    topk_group: Optional[int] = option(
        2, help="groups each token may use (null: all n_group)", min=1, bound="num_experts"
    )
    aux_loss_weight: float = option(0.0001, help="scale of the load-balancing loss (0: off)", min=0.0, max=1e3)
    aux_free_bias: bool = option(True, help="per-expert bias on the scores for selection only (aux-loss-free)")
    shared_experts: int = option(1, help="always-on shared experts (0: none)", min=0, bound="num_experts")


@dataclass
class GptOssMoEConfig(MoEConfig):
    """gpt-oss routing: a router bias, softmax over the chosen experts, clamped SwiGLU experts."""

    expert: dict = option(
        {"type": "swiglu_clamped"},
        help="the routed experts' ffn config (mlp, swiglu, geglu, swiglu_clamped)",
        family="ffn",
    )
    router_bias: bool = option(True, help="a bias on the router's logits (gpt-oss)")


@FFN.register("moe", config=MoEConfig)
@FFN.register("moe_deepseek", config=DeepSeekMoEConfig)
@FFN.register("moe_gpt_oss", config=GptOssMoEConfig)
class MoE(nn.Module):
    def __init__(self, cfg: MoEConfig, ctx: BuildContext):
        super().__init__()
        self.top_k, self.num_experts = cfg.top_k, cfg.num_experts
        self.router = Router(cfg, ctx.hidden_size)
        self.experts = GroupedExperts(cfg.expert, cfg.num_experts, ctx.hidden_size, cfg.expert_compute)
        self.shared: Optional[nn.Module] = None
        self.shared_gate: Optional[nn.Linear] = None
        if cfg.shared_experts:
            width = cfg.shared_experts * cfg.shared_expert.intermediate_size  # n experts side by side
            shared = dataclasses.replace(cfg.shared_expert, intermediate_size=width)
            self.shared = FFN.build(shared, ctx, "model.ffn.shared_expert")
            if cfg.shared_expert_gate:
                self.shared_gate = nn.Linear(ctx.hidden_size, 1, bias=False)  # C -> 1

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # [B, T, C] -> ([B, T, C], scalar loss)
        flat = x.reshape(-1, x.shape[-1])  # [N, C]
        route = self.router(flat)
        out = self.experts(flat, route.chosen, route.weights, route.counts)  # [N, C]
        if self.shared is not None:
            shared = self.shared(flat)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(flat)) * shared
            out = out + shared
        return out.reshape(x.shape), route.loss

    # ------------------------------------------------------------------ training hooks
    def after_optimizer_step(self, reduce: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        """The aux-loss-free bias update from the load since the last step (no-op without the bias)."""
        self.router.load.balance(reduce)

    def take_expert_load(self) -> Tensor:
        """Slots routed to each expert while training since the last call, [E] int64 on the device."""
        return self.router.load.take()

    # ------------------------------------------------------------------ cost
    def cost(self, call: CostCall) -> Cost:
        """Every parameter; ``active_params`` and the FLOPs count the router, top_k routed experts and the
        shared experts; saved: the input, the float32 scores and, per routed slot, what one expert keeps."""
        experts, one = self.experts.cost(call)
        c = self.router.in_features
        shared = cost_of(self.shared, call) if self.shared is not None else Cost()
        gate = Cost(c if self.shared_gate is not None else 0, linear_flops(self.shared_gate))
        params = param_count(self.router) + experts.params + shared.params + gate.params
        active = params - (self.num_experts - self.top_k) * one.params
        flops = 2.0 * c * self.num_experts + self.top_k * one.flops + shared.flops + gate.flops
        saved = call.activation_bytes * c + 4 * self.num_experts + self.top_k * one.saved + shared.saved
        return Cost(params, flops, saved, active_params=active)
