"""What a model costs before it is launched: parameters, FLOPs, KV cache and training memory.

    report = plan(load_config(["model=llama3_8b"]).model, batch_size=8, seq_len=2048)
    print(report.params_total, report.memory.total)

Nothing is allocated, and nothing here knows a component by name: one block per distinct layer is
built on the meta device and each component states its own cost (``cost(call)``, see
``composer.contract.cost``; the attention asks the same kernel chooser it runs with, so the memory
counted is that of the path it takes). A component without a cost method is reported as not planned.

Conventions (stated so the figures can be checked):
- FLOPs count a multiply-add as 2. Forward FLOPs per token = 2 x (weights of every matmul a token
  passes through, LM head included, MoE experts counted top_k times) + attention scores
  4 x context x (heads x head_dim) per layer, where context = seq_len (window for sliding window),
  no causal discount (the PaLM / nanoGPT convention). Training = 3 x forward (6N + attention);
  recomputation by gradient checkpointing is reported separately.
- Memory: weights, gradients and AdamW state by precision (mixed precision keeps float32
  master weights, gradients and states); activations are the tensors autograd saves, as each
  component counts them. The peak of a step is weights + AdamW state + the larger of two moments:
  the start of the backward pass (every activation, plus the logits' gradients) and its end (every
  gradient, plus the tied embedding's two partial gradients before they are summed). Gradients are
  freed between steps (``zero_grad(set_to_none=True)``, Lightning's default). A checkpointed layer
  keeps its input (a checkpointed part its input); rebuilding it in backward adds the largest
  rebuilt_j - (bytes kept by the layers after j, freed by then: backward runs from the last layer).
  Calibrated against measured peaks (benchmarks/bench_checkpointing.py, bench_plan_memory.py for
  hybrids: within 15% on CPUs).
- Per layer (``Plan.rows``): parameters, forward FLOPs per token, activations kept for backward under
  that layer's checkpointing, the KV cache of one sequence (window-capped) and the fixed recurrent and
  convolution state; ``Plan.model_row`` holds the embedding, norms and head, so rows + model_row (+
  ``memory.recompute``) add up to the totals. ``kv_cache_bytes_max`` is KV cache + state (the
  decoding cache of one sequence), ``recurrent_state_bytes`` the state's part.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from .contract import Cost, CostCall, NotPlanned, cost_of, did_you_mean, member, param_count
from .errors import ConfigError, Problem
from .model import ComposedModel, build_on_meta
from .schema import ModelConfig, resolve_model_config

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
DEVICES = ("cuda", "cpu", "mps", "xpu")  # the device types a plan is made for (kernels are chosen per type)
GiB = 1024**3


@dataclass
class LayerRow:
    index: int
    block: str
    attention: str
    ffn: str
    norm: str
    position: str
    params: int
    # what the layer costs (zeros where a component states no cost: Plan.not_planned names it)
    flops: float = 0.0  # forward FLOPs per token (attention's grow with the context; a linear mixer's do not)
    activation_bytes: int = 0  # saved for backward over batch x seq_len, under this layer's checkpointing
    kv_cache_bytes: int = 0  # the KV cache of one sequence of seq_len (capped by a window)
    state_bytes: int = 0  # fixed per sequence, whatever its length: recurrent and convolution state
    checkpointing: str = "none"  # what this layer recomputes in backward: none, layer, attention or ffn
    planned: bool = True


@dataclass
class MemoryEstimate:
    """Bytes for one training step (per device, no sharding)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int  # with the checkpointing asked for
    activations_no_checkpointing: int
    activations_every_layer: int
    transient: int  # short-lived buffers at the start of the backward pass (the logits' gradients)
    gradient_transient: int = 0  # short-lived at its end (a tied embedding's partial gradients)
    recompute: int = 0  # in ``activations``: a checkpointed layer's activations while it is recomputed

    @property
    def total(self) -> int:
        """The estimated peak of one training step."""
        return (
            self.weights
            + self.optimizer
            + max(self.activations + self.transient, self.gradients + self.gradient_transient)
        )


@dataclass
class Plan:
    name: str
    batch_size: int
    seq_len: int
    precision: str
    checkpointing: str
    rows: list[LayerRow]
    params_total: int
    params_embedding: int
    params_trainable: int
    params_vocab_padding: int
    flops_forward_per_token: float
    flops_training_per_token: float
    flops_recompute_per_token: float
    kv_cache_bytes_per_token: int
    kv_cache_bytes_max: int  # for one sequence of seq_len (sliding windows capped)
    memory: MemoryEstimate
    notes: list[str] = field(default_factory=list)
    not_planned: list[str] = field(default_factory=list)  # components with no cost method (left out above)
    params_active: int = 0  # parameters one token uses (MoE: top_k of the routed experts)
    recurrent_state_bytes: int = 0  # fixed state of one sequence (linear mixers), included in kv_cache_bytes_max
    # the model-level modules (embedding, its norm, final norm, head) as a row with index -1: ``rows`` plus
    # this row add up to the parameters, forward FLOPs and activations above (+ memory.recompute)
    model_row: Optional[LayerRow] = None


def _bytes(precision: str) -> tuple[int, int, int, int, int]:
    """(weight, gradient, optimizer-state, activation, residual) bytes per element for a precision."""
    if precision == "32-true":
        return 4, 4, 8, 4, 4
    if precision in ("bf16-mixed", "16-mixed"):
        return 4, 4, 8, 2, 4
    return 2, 2, 4, 2, 2  # bf16-true / 16-true: everything in 16 bits


def _spec_key(spec: Any) -> str:
    return repr((spec.block, spec.attention, spec.ffn, spec.norm, spec.position))


@dataclass
class _Layers:
    """One built block per distinct layer (a skeleton model on meta) and what each layer costs."""

    model: ComposedModel
    rep: list[int]  # layer -> its block's index in model.layers
    costs: dict[int, Optional[Cost]]  # block index -> cost (None: not planned)
    not_planned: list[str]

    @classmethod
    def of(cls, model: ComposedModel, call: CostCall) -> _Layers:
        n = model.config.num_layers
        if model.skeleton:  # one block per distinct spec: a layer maps to its spec's block
            keys: dict[str, int] = {}
            for j, i in enumerate(model.layer_indices):
                keys.setdefault(_spec_key(model.config.layer(i)), j)
            rep = [keys[_spec_key(model.config.layer(i))] for i in range(n)]
        else:  # a whole model (hand-made blocks included): each layer is its own block
            rep = list(range(n))
        out = cls(model, rep, {}, [])
        for j in sorted(set(rep)):
            out.costs[j] = out._layer_cost(j, call)
        return out

    def _layer_cost(self, j: int, call: CostCall) -> Optional[Cost]:
        """Layer j's block cost, with its position encoding's per-layer part in the attention part."""
        block = self.model.layers[j]
        position = self.model.positions()[self.model._position_of[j]]
        biased = "bias" in member(position, "position", "acts_on")
        try:
            cost = cost_of(block, call.replace(position_bias=biased))
            rotation = cost_of(position, call, member(block, "block", "attn"))
        except NotPlanned as exc:
            if exc.component not in self.not_planned:
                self.not_planned.append(exc.component)
            return None
        attention = cost.parts.get("attention", Cost()) + rotation
        return (cost + rotation).with_parts(attention=attention)

    def cost(self, i: int) -> Optional[Cost]:
        return self.costs[self.rep[i]]

    def params(self, i: int, trainable_only: bool = False) -> int:
        block = self.model.layers[self.rep[i]]
        return sum(p.numel() for p in block.parameters() if p.requires_grad or not trainable_only)


def _skeleton(cfg: ModelConfig) -> ComposedModel:
    """The model on meta with one block per distinct layer spec (O(distinct specs), not O(layers))."""
    firsts: dict[str, int] = {}
    for i in range(cfg.num_layers):
        firsts.setdefault(_spec_key(cfg.layer(i)), i)
    return build_on_meta(cfg, layers=sorted(firsts.values()))


def _model_level(model: ComposedModel) -> list[Optional[nn.Module]]:
    return [model.embed, model.embed_norm, model.final_norm, model.head, *model.positions()]


def training_flops_per_token(config: Any, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward, no recomputation): for MFU. ``config``: a
    built ComposedModel (its own modules are asked, nothing is built) or a model config."""
    model = (
        config
        if isinstance(config, ComposedModel)
        else _skeleton(config if isinstance(config, ModelConfig) else resolve_model_config(config))
    )
    call = CostCall(seq_len)
    layers = _Layers.of(model, call)
    if layers.not_planned:
        raise ConfigError(
            [
                Problem(
                    "model",
                    f"not planned: {', '.join(layers.not_planned)} has no cost method",
                    "give the component a cost(call) method (see composer/contract/cost.py)",
                )
            ]
        )
    return 3 * (cost_of(model.head, call).flops + sum(layers.cost(i).flops for i in range(model.config.num_layers)))


def _check_arguments(
    cfg: ModelConfig, batch_size: Any, seq_len: int, precision: str, checkpointing: Optional[str], device: str = "cuda"
) -> ModelConfig:
    problems = []
    if device not in DEVICES:
        problems.append(
            Problem(
                "device",
                f"{device!r} is not a device type a plan is made for",
                f"{did_you_mean(device, DEVICES)}use one of {', '.join(DEVICES)}",
            )
        )
    if precision not in PRECISIONS:
        problems.append(
            Problem("precision", f"{precision!r} is not a precision", f"use one of {', '.join(PRECISIONS)}")
        )
    if not 1 <= seq_len <= cfg.max_position_embeddings:
        problems.append(
            Problem(
                "seq_len",
                f"{seq_len} is outside [1, max_position_embeddings={cfg.max_position_embeddings}]",
                "use a shorter seq_len or a longer-context model",
            )
        )
    if batch_size < 1:
        problems.append(Problem("batch_size", f"{batch_size} must be >= 1", "use a positive batch size"))
    if checkpointing is not None:
        try:
            cfg = cfg.replace(gradient_checkpointing=checkpointing)
        except ConfigError as exc:
            problems += [Problem("checkpointing", p.message, p.fix) for p in exc.problems]
    if problems:
        raise ConfigError.of(problems)
    return cfg


def plan(
    config: Any,
    batch_size: int = 1,
    seq_len: Optional[int] = None,
    precision: str = "bf16-mixed",
    checkpointing: Optional[str] = None,
    fused_attention: bool = True,
    device: str = "cuda",
) -> Plan:
    """Parameters, FLOPs, KV cache and training memory of ``config``; allocates nothing. ``device``: the
    device type the step runs on ("cuda", "cpu", ...): it decides the attention kernels and sizes the
    fused loss's automatic chunk."""
    cfg = config if isinstance(config, ModelConfig) else resolve_model_config(config)
    seq_len = cfg.max_position_embeddings if seq_len is None else seq_len
    cfg = _check_arguments(cfg, batch_size, seq_len, precision, checkpointing, device)
    wb, gb, ob, a, r = _bytes(precision)
    call = CostCall(seq_len, batch_size, a, r, device, fused_attention)
    model = _skeleton(cfg)
    layers = _Layers.of(model, call)
    n = cfg.num_layers
    rows = [_row(cfg, i, layers.params(i), layers.cost(i), call) for i in range(n)]
    top = _model_level(model)
    total = param_count(*top) + sum(layers.params(i) for i in range(n))
    trainable = sum(
        p.numel() for p in {id(p): p for m in top if m is not None for p in m.parameters()}.values() if p.requires_grad
    ) + sum(layers.params(i, trainable_only=True) for i in range(n))
    embedding = param_count(model.embed) + (
        model.position.weight.numel() if getattr(model.position, "weight", None) is not None else 0
    )
    padding = (cfg.padded_vocab_size - cfg.vocab_size) * cfg.hidden_size * (1 if model.tied else 2)
    head = _head_cost(model, call, layers.not_planned)
    planned = [layers.cost(i) for i in range(n) if layers.cost(i) is not None]
    fwd = head.flops + sum(c.flops for c in planned)
    memory, recompute = _memory(cfg, layers, head, call, total, trainable, (wb, gb, ob), model.tied)
    notes = _notes(cfg, padding, head, planned, fused_attention, layers.not_planned)
    model_row = LayerRow(
        -1, "", "embedding + head", "", "", "", param_count(*top), head.flops, head.saved * call.tokens
    )
    return Plan(
        cfg.name or "model",
        batch_size,
        seq_len,
        precision,
        cfg.gradient_checkpointing,
        rows,
        total,
        embedding,
        trainable,
        padding,
        fwd,
        3 * fwd,
        recompute,
        sum(c.cache for c in planned),
        sum(c.cache_bytes(seq_len) for c in planned),
        memory,
        notes,
        layers.not_planned,
        total - sum(c.params - c.active for c in planned),
        sum(c.state for c in planned),
        model_row,
    )


def _row(cfg: ModelConfig, i: int, params: int, cost: Optional[Cost], call: CostCall) -> LayerRow:
    """Layer i's row: its kinds, parameters and (when planned) FLOPs, saved bytes, KV cache and state."""
    s, mode = cfg.layer(i), cfg.checkpointed(i)
    kinds = (s.block.summary(), s.attention.summary(), s.ffn.summary(), s.norm.summary(), s.position.summary())
    if cost is None:
        return LayerRow(i, *kinds, params, checkpointing=mode, planned=False)
    kept = _kept(cost, mode, call, cfg.hidden_size) * call.tokens
    kv = cost.cache_bytes(call.seq_len) - cost.state
    return LayerRow(i, *kinds, params, cost.flops, kept, kv, cost.state, mode)


def _kept(cost: Cost, mode: str, call: CostCall, width: int) -> int:
    """Bytes per token a layer keeps for backward under its checkpointing ``mode``."""
    if mode == "layer":  # only its input
        return call.residual_bytes * width
    if mode == "none":
        return cost.saved
    part = cost.parts.get(mode, Cost())  # attention / ffn: that part is recomputed, its input kept
    return cost.saved - part.saved + call.activation_bytes * width


def _head_cost(model: ComposedModel, call: CostCall, not_planned: list[str]) -> Cost:
    """The model-level modules' cost: embedding output, embedding norm, final norm and head (one without a
    cost is added to ``not_planned``; the layers are still planned)."""
    cost = Cost(saved=call.residual_bytes * model.config.hidden_size)  # the embedding output
    for module in (model.embed_norm, model.final_norm, model.head):
        if module is None:
            continue
        try:
            cost = cost + cost_of(module, call)
        except NotPlanned as exc:
            not_planned.append(exc.component)
    return cost


def _memory(
    cfg: ModelConfig,
    layers: _Layers,
    head: Cost,
    call: CostCall,
    total: int,
    trainable: int,
    sizes: tuple[int, int, int],
    tied: bool,
) -> tuple[MemoryEstimate, float]:
    """The training-memory estimate and the FLOPs checkpointing recomputes, per token."""
    wb, gb, ob = sizes
    c, tokens = cfg.hidden_size, call.tokens
    planned = [(cost, cfg.checkpointed(i)) for i in range(cfg.num_layers) if (cost := layers.cost(i)) is not None]
    kept = [_kept(cost, mode, call, c) for cost, mode in planned]
    rebuilt = [_rebuilt(cost, mode) for cost, mode in planned]
    recompute = 0.0 + sum(
        cost.flops if mode == "layer" else cost.parts.get(mode, Cost()).flops
        for cost, mode in planned
        if mode != "none"
    )
    every = [cost.saved for cost, _ in planned]  # every layer checkpointed: each keeps its input, rebuilds all
    every_kept = [call.residual_bytes * c] * len(planned)
    model_bytes = head.saved
    recomputed = _recompute_peak(kept, rebuilt) * tokens
    memory = MemoryEstimate(
        weights=total * wb + (total * 2 if wb == 4 and call.activation_bytes == 2 else 0),  # + autocast copies
        gradients=trainable * gb,
        optimizer=trainable * ob,
        activations=int((sum(kept) + model_bytes) * tokens) + recomputed,
        activations_no_checkpointing=int((sum(every) + model_bytes) * tokens),
        activations_every_layer=int((sum(every_kept) + _recompute_peak(every_kept, every) + model_bytes) * tokens),
        transient=head.transient,
        gradient_transient=2 * cfg.padded_vocab_size * c * gb if tied else 0,
        recompute=recomputed,
    )
    return memory, recompute


def _rebuilt(cost: Cost, mode: str) -> int:
    """Bytes per token a checkpointed layer's recomputation rebuilds in backward (0: not checkpointed)."""
    if mode == "none":
        return 0
    return cost.saved if mode == "layer" else cost.parts.get(mode, Cost()).saved


def _recompute_peak(kept: list[int], rebuilt: list[int]) -> int:
    """Bytes per token above the start of the backward pass while a checkpointed layer is recomputed. The
    backward pass runs from the last layer down, so when layer j is rebuilt the layers after it have freed
    what they kept: the peak is the largest rebuilt_j - sum(kept after j), if positive (every layer
    checkpointed: about the largest layer; every other layer: the rebuilt layer less its freed neighbour)."""
    peak = after = 0
    for k, b in zip(reversed(kept), reversed(rebuilt), strict=True):
        if b:
            peak = max(peak, b - after)
        after += k
    return peak


def _notes(
    cfg: ModelConfig, padding: int, head: Cost, planned: list[Cost], fused_attention: bool, not_planned: list[str]
) -> list[str]:
    notes = []
    if padding:
        notes.append(f"vocabulary padded to {cfg.padded_vocab_size} (+{padding:,} parameters, included above)")
    notes += list(head.notes)
    if not fused_attention:
        notes.append("attention without a fused kernel: T x T probabilities are stored")
    counts = Counter(note for cost in planned for note in cost.notes)
    notes += [f"{k} layer(s): {note}" for note, k in counts.items()]
    notes += [
        f"not planned: {name} has no cost method (its layers are left out of FLOPs and memory)" for name in not_planned
    ]
    return notes
