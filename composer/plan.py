"""What a model costs before it is launched: parameters, FLOPs, KV cache and training memory.

    report = plan(load_config(["model=llama3_8b"]).model, batch_size=8, seq_len=2048)
    print(report.params_total, report.memory.total)

Nothing is allocated: the model is built on the meta device and measured module by module.

Conventions (stated so the figures can be checked):
- FLOPs count a multiply-add as 2. Forward FLOPs per token = 2 x (weights of every matmul a token
  passes through, LM head included, MoE experts counted top_k times) + attention scores
  4 x context x (heads x head_dim) per layer, where context = seq_len (window for sliding window),
  no causal discount (the PaLM / nanoGPT convention). Training = 3 x forward (6N + attention);
  recomputation by gradient checkpointing is reported separately.
- Memory: weights, gradients and AdamW state by precision (mixed precision keeps float32
  master weights, gradients and states); activations are the tensors autograd saves, counted
  per component from the shapes in this code base (SDPA with a fused kernel, so no T x T
  scores are stored; the math path on CPUs stores them, see ``fused_attention``; a logit soft-cap's
  explicit softmax stores its float32 scores and probabilities; where SDPA cannot read grouped K/V
  heads on ``device``, the repeated K/V or the folded queries are stored too). The peak of
  a step is weights + AdamW state + the larger of two moments: the start of the backward pass
  (every activation, plus the logits' gradients) and its end (every gradient, plus the tied
  embedding's two partial gradients before they are summed). Gradients are freed between steps
  (``zero_grad(set_to_none=True)``, Lightning's default); a fused AdamW adds nothing (the
  foreach kernel on CPUs adds one parameter-sized buffer). Calibrated against measured peaks
  (benchmarks/bench_checkpointing.py: within a few percent on CPUs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from components.attention import sdpa_reads_grouped_heads
from components.linear_cross_entropy import auto_chunk_size

from .errors import ConfigError, Problem
from .model import ComposedModel, compose
from .schema import ModelConfig, resolve_model_config

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
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


def _bytes(precision: str) -> tuple[int, int, int, int]:
    """(weight, gradient, optimizer-state, activation) bytes per element for a precision."""
    if precision == "32-true":
        return 4, 4, 8, 4
    if precision in ("bf16-mixed", "16-mixed"):
        return 4, 4, 8, 2
    return 2, 2, 4, 2  # bf16-true / 16-true: everything in 16 bits


def _type(comp: Any) -> str:
    kind = getattr(comp, "type", "?")
    extra = []
    if getattr(comp, "num_kv_heads", None) is not None and kind in ("gqa", "sliding_window"):
        extra.append(f"kv={comp.num_kv_heads}")
    if getattr(comp, "window", None) is not None:
        extra.append(f"w={comp.window}")
    if kind == "moe":
        extra.append(f"{comp.top_k}/{comp.num_experts}x{comp.expert.type}")
    return f"{kind}({', '.join(extra)})" if extra else kind


def _matmul_flops(module: nn.Module) -> float:
    """2 x weights of the Linear layers one token passes through (MoE: top_k of the experts)."""
    experts = getattr(module, "experts", None)
    if isinstance(experts, nn.ModuleList) and hasattr(module, "top_k"):
        router = sum(2 * m.in_features * m.out_features for m in module.router.modules() if isinstance(m, nn.Linear))
        per_expert = _matmul_flops(experts[0]) if len(experts) else 0.0
        return router + module.top_k * per_expert
    total = 0.0
    for child in module.children():
        total += _matmul_flops(child)
    if isinstance(module, nn.Linear):
        total += 2 * module.in_features * module.out_features
    return total


def _context(attn: Any, seq_len: int) -> int:
    window = getattr(attn, "window", None)
    return min(seq_len, window) if window else seq_len


def _soft_capped(attn: Any) -> bool:
    """A logit soft-cap: the attention runs an explicit softmax (no SDPA) and keeps its scores."""
    return getattr(attn, "logit_softcap", None) is not None


def _layer_activation_bytes(
    cfg: ModelConfig, i: int, seq_len: int, a: int, r: int, fused_attention: bool, device: str
) -> tuple[int, int, int]:
    """Bytes autograd keeps per token for layer i: (whole layer, attention part, ffn part).

    a: activation bytes (matmul inputs/outputs), r: residual-stream / norm bytes."""
    spec = cfg.layer(i)
    c = cfg.hidden_size
    att = spec.attention
    h = getattr(att, "num_heads", None) or cfg.num_heads
    d = getattr(att, "head_dim", None) or cfg.head_dim
    hkv = att.kv_heads() if hasattr(att, "kv_heads") else h
    norm = (2 * 4 if spec.norm.type == "rmsnorm" else r) * c  # rmsnorm keeps float32 copies
    # qkv input, q/k/v (qkv output), SDPA output, out-projection input (a reshaped copy)
    attn = a * (c + (h + 2 * hkv) * d + 2 * h * d)
    if spec.position.type == "rope":  # float32 copies of q, k and the rotated q, k
        attn += (4 + a) * (h + hkv) * d
    context = _context(att, seq_len)
    explicit = _soft_capped(att)  # no SDPA: tanh and softmax outputs (float32)
    if explicit:  # + the probabilities cast back for the product with V (the same tensor in float32)
        attn += (8 + (a if a != 4 else 0)) * h * context
    elif not fused_attention:  # math SDPA keeps the probabilities [H, T, S]
        attn += a * h * context
    if hkv < h:  # grouped K/V heads: read as they are, or copies (components/attention.py SelfAttention._attend)
        window = getattr(att, "window", None) is not None
        flex = (
            window
            and device == "cuda"
            and getattr(att, "kernel", "auto") != "sdpa"
            and not explicit
            and not getattr(att, "dropout", 0.0)
        )  # FlexAttention reads groups
        dtype = torch.float32 if a == 4 else torch.bfloat16
        if explicit:  # K and V repeated to every query head
            attn += a * 2 * h * d
        elif not flex and not sdpa_reads_grouped_heads(device, dtype, window, d):
            attn += a * h * d if window else a * 2 * h * d  # masked: q folded (a copy); causal: K/V repeated
    attn += norm
    ffn = norm + _ffn_bytes(spec.ffn, c, a)
    drop = getattr(spec.block, "dropout", 0.0) or 0.0
    block = 2 * c if drop > 0 else 0  # residual dropout masks (1 byte each)
    return attn + ffn + block, attn, ffn


def _ffn_bytes(ffn: Any, c: int, a: int) -> int:
    kind = getattr(ffn, "type", "")
    i = getattr(ffn, "intermediate_size", None) or 4 * c
    if kind == "mlp":  # up input, activation input, down input
        return a * (c + 2 * i)
    if kind in ("swiglu", "geglu"):  # gate_up input, gate/up, act(gate), product
        return a * (c + 4 * i)
    if kind == "moe":
        return a * c + 4 * ffn.num_experts + ffn.top_k * _ffn_bytes(ffn.expert, c, a)
    return a * 8 * c  # unknown plugin: a generous guess


def training_flops_per_token(config: Any, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward, no recomputation): for MFU."""
    cfg = config if isinstance(config, ModelConfig) else resolve_model_config(config)
    return 3 * _forward_flops(compose(cfg, device="meta"), cfg, seq_len)


def _forward_flops(model: ComposedModel, cfg: ModelConfig, seq_len: int) -> float:
    flops = _matmul_flops(model.head)
    for i, layer in enumerate(model.layers):
        att = cfg.layer(i).attention
        h = getattr(att, "num_heads", None) or cfg.num_heads
        d = getattr(att, "head_dim", None) or cfg.head_dim
        flops += _matmul_flops(layer) + 4 * _context(att, seq_len) * h * d
    return float(flops)


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
    device type the step runs on ("cuda", "cpu", ...), which sizes the fused loss's automatic chunk."""
    cfg = config if isinstance(config, ModelConfig) else resolve_model_config(config)
    problems = []
    if precision not in PRECISIONS:
        problems.append(
            Problem("precision", f"{precision!r} is not a precision", f"use one of {', '.join(PRECISIONS)}")
        )
    seq_len = cfg.max_position_embeddings if seq_len is None else seq_len
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

    model = compose(cfg, device="meta")
    rows = []
    for i, layer in enumerate(model.layers):
        spec = cfg.layer(i)
        rows.append(
            LayerRow(
                i,
                spec.block.type,
                _type(spec.attention),
                _type(spec.ffn),
                spec.norm.type,
                spec.position.type,
                sum(p.numel() for p in layer.parameters()),
            )
        )
    total = model.num_parameters()
    embedding = total - model.num_parameters(exclude_embeddings=True)
    trainable = model.num_parameters(trainable_only=True)
    padding = (cfg.padded_vocab_size - cfg.vocab_size) * cfg.hidden_size * (1 if model.tied else 2)

    fwd = _forward_flops(model, cfg, seq_len)
    wb, gb, ob, a = _bytes(precision)
    r = 4 if precision in ("32-true", "bf16-mixed", "16-mixed") else 2

    kv_per_token, kv_max = 0, 0
    for i, layer in enumerate(model.layers):
        attn = layer.attn
        per = 2 * getattr(attn, "num_kv_heads", 0) * getattr(attn, "head_dim", 0) * a
        kv_per_token += per
        kv_max += per * _context(cfg.layer(i).attention, seq_len)

    tokens = batch_size * seq_len
    c, v = cfg.hidden_size, cfg.padded_vocab_size
    head_bytes = r * c + a * c  # final norm input, head input
    transient = 0
    chunk = None
    if getattr(cfg.head, "fused_loss", False):
        chunk = cfg.head.loss_chunk_size or auto_chunk_size(tokens, v, device)
    if cfg.head.type == "lm":
        copy = 0 if a == 4 else 4  # the float32 copy of 16-bit logits (.float() of float32 is no copy)
        if chunk:  # only the head's input is kept; one chunk of logits lives at a time
            chunk = min(chunk, tokens)
            # one chunk's logits (and their float32 copy), rewritten in place into log-softmax and gradient;
            # the head's gradients, made in the forward pass
            transient = chunk * v * (a + copy) + (v + tokens) * c * 4
        else:
            head_bytes += 4 * v  # the log-softmax output (the logits and their float32 copy are not kept)
            transient = 8 * v * tokens  # the gradients of the log-softmax output and of the logits
    model_bytes = r * c + head_bytes  # embedding output + head
    full, recompute = 0, 0.0
    per_layer = []
    for i in range(cfg.num_layers):
        whole, attn_b, ffn_b = _layer_activation_bytes(cfg, i, seq_len, a, r, fused_attention, device)
        per_layer.append(whole)
        mode = cfg.checkpointed(i)
        if mode == "layer":
            full += r * c
        elif mode == "attention":
            full += whole - attn_b + a * c
        elif mode == "ffn":
            full += whole - ffn_b + a * c
        else:
            full += whole
    biggest = max(per_layer)
    any_layer_ckpt = any(cfg.checkpointed(i) == "layer" for i in range(cfg.num_layers))
    act = (full + (biggest if any_layer_ckpt else 0) + model_bytes) * tokens
    act_none = (sum(per_layer) + model_bytes) * tokens
    act_every = (cfg.num_layers * r * c + biggest + model_bytes) * tokens
    for i in range(cfg.num_layers):
        mode = cfg.checkpointed(i)
        if mode != "none":
            spec_flops = _matmul_flops(
                model.layers[i].attn
                if mode == "attention"
                else model.layers[i].ffn
                if mode == "ffn"
                else model.layers[i]
            )
            att = cfg.layer(i).attention
            if mode in ("layer", "attention"):
                spec_flops += (
                    4
                    * _context(att, seq_len)
                    * (getattr(att, "num_heads", 0) or cfg.num_heads)
                    * (getattr(att, "head_dim", 0) or cfg.head_dim)
                )
            recompute += spec_flops
    memory = MemoryEstimate(
        weights=total * wb + (total * 2 if precision in ("bf16-mixed", "16-mixed") else 0),  # + autocast copies
        gradients=trainable * gb,
        optimizer=trainable * ob,
        activations=int(act),
        activations_no_checkpointing=int(act_none),
        activations_every_layer=int(act_every),
        transient=transient,
        gradient_transient=2 * v * c * gb if model.tied else 0,
    )
    notes = []
    if padding:
        notes.append(f"vocabulary padded to {cfg.padded_vocab_size} (+{padding:,} parameters, included above)")
    if chunk:
        notes.append(f"fused loss: logits of {chunk} tokens at a time (head.fused_loss, head.loss_chunk_size)")
    if not fused_attention:
        notes.append("attention without a fused kernel: T x T probabilities are stored")
    capped = [i for i in range(cfg.num_layers) if _soft_capped(cfg.layer(i).attention)]
    if capped:
        notes.append(
            f"{len(capped)} layer(s) cap attention logits (logit_softcap): explicit softmax, T x S float32 "
            "scores stored (no fused kernel takes a soft-cap)"
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
        kv_per_token,
        kv_max,
        memory,
        notes,
    )


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
    from rich.console import Console
    from rich.table import Table

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
