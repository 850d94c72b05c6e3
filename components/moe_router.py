"""Routing of a mixture of experts: which k experts each token goes to, with what weight, and the terms
that keep the experts' load balanced.

    logits  = x W^T (+ b)                                   [N, E]   (b: gpt-oss's router bias)
    scores  = softmax(logits) | sigmoid(logits)             [N, E]   float32 (DeepSeek-V3: sigmoid)
    choice  = scores + c                                    [N, E]   c: aux-loss-free correction bias,
                                                                     for the selection only
    groups  (n_group > 1): the E experts form n_group groups; a group's score is the sum of its two
            best choice scores; only the experts of the topk_group best groups may be chosen (DeepSeek-V3)
    chosen  = top_k(choice)                                 [N, k]
    weights = scores[chosen] (/ their sum: normalize_top_k) * routed_scaling_factor

Balancing terms (returned as one scalar, added to the training loss):

    aux loss (Switch Transformer, arXiv:2101.03961):  E * sum_e f_e * P_e * aux_loss_weight
              f_e = share of the routed slots that went to e, P_e = mean score of e (scores normalised to
              sum 1 per token, so sigmoid scores count like probabilities)
    z-loss   (ST-MoE, arXiv:2202.08906):              mean_n logsumexp(logits_n)^2 * z_loss_weight
    aux-loss-free balancing (DeepSeek-V3, arXiv:2412.19437 / arXiv:2408.15664): after each optimizer step
              c_e += bias_update_rate * sign(mean load - load_e), load = slots routed to e in the step

The correction bias changes only in :meth:`ExpertLoad.balance`, which the training loop calls after each
optimizer step (``composer.callbacks.MoEBalance`` does), never inside the forward: a forward recomputed
by gradient checkpointing routes exactly as the first one did, micro-batches of an accumulated step all
see the same bias, and the step's load is summed over processes before anyone updates. The loads are
counted on the device while training (no host read); a recomputed forward counts twice, which changes
neither the sign above nor the load shares reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

SCORES = ("softmax", "sigmoid")


@dataclass(frozen=True)
class Routing:
    """One forward's routing: the experts and weights of each token, the slots per expert and the loss."""

    chosen: Tensor  # [N, k] expert indices
    weights: Tensor  # [N, k] float32 mixing weights
    counts: Tensor  # [E] int64 slots routed to each expert
    loss: Tensor  # scalar: aux loss + z-loss (already weighted)


def expert_counts(chosen: Tensor, num_experts: int) -> Tensor:
    """Slots routed to each expert [E] (int64), without a host read (bincount would read the maximum)."""
    flat = chosen.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=chosen.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )


class ExpertLoad(nn.Module):
    """The routed load counted on the device, and the aux-loss-free correction bias.

    ``e_score_correction_bias`` [E] (DeepSeek-V3's name; only with ``correction_bias``) is a persistent
    buffer: it is saved and loaded with the weights. ``seen`` (since the metrics last read it) and
    ``pending`` (since the last balancing update) are not saved."""

    def __init__(self, num_experts: int, correction_bias: bool, rate: float):
        super().__init__()
        self.rate = rate
        self.register_buffer("seen", torch.zeros(num_experts, dtype=torch.int64), persistent=False)
        self.register_buffer("pending", torch.zeros(num_experts, dtype=torch.int64), persistent=False)
        self.e_score_correction_bias: Optional[Tensor]
        if correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))
        else:
            self.e_score_correction_bias = None

    def reset_buffers(self) -> None:  # after loading weights: the counters start at zero
        self.seen.zero_()
        self.pending.zero_()

    def init_weights(self, generator: torch.Generator) -> None:  # a new model: no correction yet
        self.reset_buffers()
        if self.e_score_correction_bias is not None:
            self.e_score_correction_bias.zero_()

    @torch.no_grad()
    def record(self, counts: Tensor) -> None:
        self.seen += counts
        self.pending += counts

    @torch.no_grad()
    def take(self) -> Tensor:
        """Slots per expert since the last call [E] (a copy; the counter restarts)."""
        seen = self.seen.clone()
        self.seen.zero_()
        return seen

    @torch.no_grad()
    def balance(self, reduce: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        """One aux-loss-free update from the load since the last one (``reduce``: sums it over
        processes), on the device; then the pending load restarts. Nothing moves without load."""
        load = self.pending.float()
        if reduce is not None:
            load = reduce(load)
        self.pending.zero_()
        if self.e_score_correction_bias is None or self.rate == 0:
            return
        step = torch.sign(load.mean() - load) * self.rate  # overloaded experts down, underloaded up
        self.e_score_correction_bias += step.to(self.e_score_correction_bias.dtype)


class Router(nn.Linear):
    """Scores, group-limited top-k selection and the balancing losses (see the module docstring): the
    router's projection C -> E (``weight`` [E, C], ``bias`` [E] with ``router_bias``) is this linear."""

    def __init__(self, cfg, hidden_size: int):
        super().__init__(hidden_size, cfg.num_experts, bias=cfg.router_bias)
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.score, self.normalize, self.scale = cfg.score, cfg.normalize_top_k, cfg.routed_scaling_factor
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group if cfg.topk_group is not None else cfg.n_group
        self.aux_loss_weight, self.z_loss_weight = cfg.aux_loss_weight, cfg.z_loss_weight
        self.load = ExpertLoad(cfg.num_experts, cfg.aux_free_bias, cfg.bias_update_rate)

    def forward(self, x: Tensor) -> Routing:  # x [N, C]
        logits = super().forward(x).float()  # [N, E]
        scores = logits.softmax(dim=-1) if self.score == "softmax" else logits.sigmoid()
        choice = scores.detach()
        bias = self.load.e_score_correction_bias
        if bias is not None:
            choice = choice + bias.float()
        if self.n_group > 1:
            choice = self._limit_groups(choice)
        chosen = choice.topk(self.top_k, dim=-1).indices  # [N, k]
        weights = scores.gather(1, chosen)  # [N, k]
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.scale
        counts = expert_counts(chosen, self.num_experts)
        if self.training:
            self.load.record(counts)
        return Routing(chosen, weights, counts, self._loss(logits, scores, counts))

    def _limit_groups(self, choice: Tensor) -> Tensor:
        """Choice scores outside each token's topk_group best groups set to -inf."""
        n, e = choice.shape
        grouped = choice.view(n, self.n_group, e // self.n_group)  # [N, G, E/G]
        group_scores = grouped.topk(min(2, e // self.n_group), dim=-1).values.sum(dim=-1)  # [N, G]
        best = group_scores.topk(self.topk_group, dim=-1).indices  # [N, topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # [N, G]
        return grouped.masked_fill(~keep[..., None], float("-inf")).view(n, e)

    def _loss(self, logits: Tensor, scores: Tensor, counts: Tensor) -> Tensor:
        loss = logits.new_zeros(())
        if self.aux_loss_weight:
            share = counts.float() / counts.sum().clamp(min=1)  # f_e
            probs = scores if self.score == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
            loss = loss + self.num_experts * (share * probs.mean(dim=0)).sum() * self.aux_loss_weight
        if self.z_loss_weight:
            loss = loss + torch.logsumexp(logits, dim=-1).square().mean() * self.z_loss_weight
        return loss
