"""Mixture of experts: a router sends each token to its top-k experts (Switch / Mixtral).

Experts are any registered feed-forward type (``expert: {type: swiglu, ...}``). Every
token is processed by all k experts it is routed to (no capacity limit, no dropped tokens);
outputs are mixed by the router's (renormalised) probabilities. The load-balancing loss
of Switch Transformer, ``E * sum_e f_e * P_e`` (f_e: share of routed slots, P_e: mean
router probability), is returned scaled by ``aux_loss_weight`` alongside the output.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class MoEConfig(ComponentConfig):
    """Top-k routed mixture of feed-forward experts with a load-balancing loss."""

    num_experts: int = option(8, help="experts per layer", min=1, bound="num_experts")
    top_k: int = option(2, help="experts each token is sent to", min=1, bound="num_experts")
    expert: dict = option({"type": "swiglu"}, help="the expert's ffn config ({type: swiglu, ...})", family="ffn")
    aux_loss_weight: float = option(0.01, help="scale of the load-balancing loss", min=0.0)
    normalize_top_k: bool = option(True, help="renormalise the chosen experts' probabilities to sum to 1")

    def summary(self) -> str:
        return f"{self.type}({self.top_k}/{self.num_experts}x{self.expert.type})"

    def resolve(self, model, check) -> None:
        if self.top_k > self.num_experts:
            check.fail("top_k", f"{self.top_k} exceeds num_experts={self.num_experts}", "choose top_k <= num_experts")
        if getattr(self.expert, "type", None) == "moe":
            check.fail(
                "expert.type",
                "an expert cannot itself be a mixture of experts",
                "use a dense ffn type (mlp, swiglu, geglu)",
            )


@FFN.register("moe", config=MoEConfig)
class MoE(nn.Module):
    def __init__(self, cfg: MoEConfig, ctx: BuildContext):
        super().__init__()
        self.top_k, self.num_experts = cfg.top_k, cfg.num_experts
        self.aux_loss_weight, self.normalize = cfg.aux_loss_weight, cfg.normalize_top_k
        self.router = nn.Linear(ctx.hidden_size, cfg.num_experts, bias=False)  # C -> E
        self.experts = nn.ModuleList(FFN.build(cfg.expert, ctx, "model.ffn.expert") for _ in range(cfg.num_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # [B, T, C] -> ([B, T, C], scalar aux loss)
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, C]
        probs = self.router(flat).float().softmax(dim=-1)  # [N, E]
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [N, k]
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)  # tokens routed to expert e
            y = expert(flat[token])
            y = y[0] if isinstance(y, tuple) else y
            out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
        routed = torch.zeros_like(probs).scatter_(1, chosen, 1.0).mean(dim=0) / self.top_k  # f_e [E]
        aux = self.num_experts * (routed * probs.mean(dim=0)).sum() * self.aux_loss_weight
        return out.reshape(shape), aux

    def cost(self, call: CostCall) -> Cost:
        """Every expert's parameters; the FLOPs and saved bytes of the router and of top_k experts per token
        (plus the router's float32 probabilities)."""
        expert = cost_of(self.experts[0], call)
        c = self.router.in_features
        saved = call.activation_bytes * c + 4 * self.num_experts + self.top_k * expert.saved
        return Cost(param_count(self), linear_flops(self.router) + self.top_k * expert.flops, saved)
