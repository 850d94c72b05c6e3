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
  freed between steps (``zero_grad(set_to_none=True)``, Lightning's default). Calibrated against
  measured peaks (benchmarks/bench_checkpointing.py: within a few percent on CPUs).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from rich.console import Console
from rich.table import Table
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
    rows = [
        LayerRow(
            i,
            (s := cfg.layer(i)).block.summary(),
            s.attention.summary(),
            s.ffn.summary(),
            s.norm.summary(),
            s.position.summary(),
            layers.params(i),
        )
        for i in range(n)
    ]
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
    )


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
    r, c, tokens = call.residual_bytes, cfg.hidden_size, call.tokens
    full = whole_sum = 0
    recompute = 0.0
    biggest = 0
    for i in range(cfg.num_layers):
        cost = layers.cost(i)
        if cost is None:
            continue
        whole = cost.saved
        biggest = max(biggest, whole)
        whole_sum += whole
        mode = cfg.checkpointed(i)
        kept = {"layer": r * c, "none": whole}.get(mode)
        if kept is None:  # attention / ffn: that part is recomputed, its input kept
            part = cost.parts.get(mode, Cost())
            kept = whole - part.saved + call.activation_bytes * c
        full += kept
        if mode != "none":
            recompute += cost.flops if mode == "layer" else cost.parts.get(mode, Cost()).flops
    any_layer = any(cfg.checkpointed(i) == "layer" for i in range(cfg.num_layers))
    model_bytes = head.saved
    memory = MemoryEstimate(
        weights=total * wb + (total * 2 if wb == 4 and call.activation_bytes == 2 else 0),  # + autocast copies
        gradients=trainable * gb,
        optimizer=trainable * ob,
        activations=int((full + (biggest if any_layer else 0) + model_bytes) * tokens),
        activations_no_checkpointing=int((whole_sum + model_bytes) * tokens),
        activations_every_layer=int((cfg.num_layers * r * c + biggest + model_bytes) * tokens),
        transient=head.transient,
        gradient_transient=2 * cfg.padded_vocab_size * c * gb if tied else 0,
    )
    return memory, recompute


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


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M' (powers of 1000); bytes with unit='B' use GiB/MiB/KiB."""
    if unit == "B":
        for size, name in ((GiB, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
            if abs(n) >= size:
                return f"{n / size:.2f} {name}"
        return f"{int(n)} B"
    for size, name in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= size:
            return f"{n / size:.2f}{name}{unit}"
    return f"{n:.0f}{unit}"


def render(report: Plan, console: Any = None) -> None:
    """Print a plan as rich tables."""
    console = console or Console()
    layers = Table(title=f"{report.name}: layers", title_justify="left")
    for col in ("layer", "block", "attention", "ffn", "norm", "position", "params"):
        layers.add_column(col, justify="right" if col in ("layer", "params") else "left")
    groups: list[list[LayerRow]] = []
    for row in report.rows:  # collapse runs of identical layers
        key = (row.block, row.attention, row.ffn, row.norm, row.position, row.params)
        if (
            groups
            and (
                groups[-1][0].block,
                groups[-1][0].attention,
                groups[-1][0].ffn,
                groups[-1][0].norm,
                groups[-1][0].position,
                groups[-1][0].params,
            )
            == key
        ):
            groups[-1].append(row)
        else:
            groups.append([row])
    for g in groups:
        idx = str(g[0].index) if len(g) == 1 else f"{g[0].index}-{g[-1].index}"
        r = g[0]
        layers.add_row(
            idx,
            r.block,
            r.attention,
            r.ffn,
            r.norm,
            r.position,
            f"{r.params:,}" + (f" x{len(g)}" if len(g) > 1 else ""),
        )
    console.print(layers)

    m = report.memory
    summary = Table(
        title=f"{report.name}: batch {report.batch_size} x seq_len {report.seq_len}, {report.precision}, "
        f"checkpointing {report.checkpointing}",
        title_justify="left",
        show_header=False,
    )
    summary.add_column("what")
    summary.add_column("value", justify="right")
    rows = [
        ("parameters", f"{report.params_total:,} ({human(report.params_total)})"),
        ("  embedding", f"{report.params_embedding:,}"),
        ("  non-embedding", f"{report.params_total - report.params_embedding:,}"),
        ("  trainable", f"{report.params_trainable:,}"),
        ("  active per token", f"{report.params_active:,} ({human(report.params_active)})"),
        ("FLOPs / token, forward", human(report.flops_forward_per_token, "FLOP")),
        ("FLOPs / token, training (3x forward)", human(report.flops_training_per_token, "FLOP")),
        ("FLOPs / token, checkpoint recompute", human(report.flops_recompute_per_token, "FLOP")),
        ("KV cache / token", human(report.kv_cache_bytes_per_token, "B")),
        (f"KV cache / sequence of {report.seq_len}", human(report.kv_cache_bytes_max, "B")),
        ("memory: weights", human(m.weights, "B")),
        ("memory: gradients", human(m.gradients, "B")),
        ("memory: AdamW state", human(m.optimizer, "B")),
        ("memory: activations (this setting)", human(m.activations, "B")),
        ("memory: activations, no checkpointing", human(m.activations_no_checkpointing, "B")),
        ("memory: activations, every layer checkpointed", human(m.activations_every_layer, "B")),
        ("memory: transient (logits gradients)", human(m.transient, "B")),
        ("memory: training peak (estimate)", human(m.total, "B")),
    ]
    if report.params_vocab_padding:
        rows.insert(4, ("  vocabulary padding", f"{report.params_vocab_padding:,}"))
    for what, value in rows:
        summary.add_row(what, value)
    console.print(summary)
    for note in report.notes:
        console.print(f"note: {note}")
