"""The speed and memory techniques: loss without a logits copy, chunked loss, static KV cache and compiled
decoding, FlexAttention windows, padded vocabulary, TF32, and no host reads in the training step.
(Speed itself is measured in benchmarks/, never here.)"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from conftest import small_model_dict
from test_train_helpers import Repeat
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

import components.kernels as kernels
import components.linear_cross_entropy as linear_cross_entropy
from composer import compose, generation
from composer.callbacks import LearningRate, NanGuard, Throughput, ValidateAtEnd
from composer.errors import ConfigError, ModelError
from composer.lit import LitComposer, enable_tf32
from composer.plan import plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")
V, B, T = 64, 2, 12


class OutputShapes(TorchDispatchMode):
    """Records the shape of every tensor an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def ids(b: int = B, t: int = T, seed: int = 0, vocab: int = V) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def lm(**changes):
    return compose(small_model_dict(init_std=0.35, **changes), seed=3)


# ----------------------------------------------------------------------------- the LM loss
def test_lm_loss_reads_the_logits_without_copying_them():
    model = lm()
    x = ids()
    logits = model(x).logits.detach().requires_grad_()
    with OutputShapes() as seen:
        loss = model.head.loss(logits, x)
        loss.backward()
    shifted = [s for _, s in seen.shapes if s in ((B, T - 1, V), (B * (T - 1), V))]
    assert not shifted, f"the loss copied the logits: {shifted}"
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, manual)


def unfused(**changes):
    """The reference: logits, then F.cross_entropy (head.fused_loss=false)."""
    return lm(**{**changes, "head": dict(changes.get("head", {"type": "lm"}), fused_loss=False)})


@pytest.mark.parametrize("in_place", [True, False], ids=["cpu-in-place", "accelerator-path"])
@pytest.mark.parametrize("chunk", [1, 7, 24, 1000, None])  # None: the default (automatic) chunk size
@pytest.mark.parametrize("variant", ["tied", "untied", "softcap+bias", "padded"])
def test_fused_loss_gives_the_same_loss_and_gradients(chunk, variant, in_place, monkeypatch):
    if not in_place:  # the path accelerators take: log-softmax into a fresh tensor
        monkeypatch.setattr(linear_cross_entropy, "IN_PLACE_SOFTMAX", set())
    changes = {
        "tied": {},
        "untied": {"tie_embeddings": False},
        "softcap+bias": {"tie_embeddings": False, "head": {"type": "lm", "logit_softcap": 2.0, "bias": True}},
        "padded": {"pad_vocab_to_multiple_of": 48},
    }[variant]
    full = unfused(**changes)
    head = dict(changes.get("head", {"type": "lm"}), loss_chunk_size=chunk)
    chunked = lm(**{**changes, "head": head})
    chunked.load_state_dict(full.state_dict())
    x = ids()
    labels = x.clone()
    labels[0, :5] = -100  # ignored positions (a prompt)
    want = full(x, labels=labels)
    got = chunked(x, labels=labels, return_logits=False)  # as the training step calls it
    assert want.logits is not None and got.logits is None, "the fused loss never materialises the logits"
    assert chunked(x, labels=labels).logits is not None, "a plain call returns logits"
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    want.loss.backward()
    got.loss.backward()
    for (name, a), b in zip(full.named_parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # without gradients: the ordinary path, logits included
        out = chunked(x, labels=labels, return_logits=False)
    assert out.logits is not None and out.logits.shape == (B, T, chunked.config.padded_vocab_size)
    torch.testing.assert_close(out.loss, want.loss.detach(), rtol=1e-5, atol=1e-6)


def test_fused_loss_never_holds_more_than_one_chunk_of_logits():
    chunk = 5
    model = lm(head={"type": "lm", "loss_chunk_size": chunk})
    x = ids()
    with OutputShapes() as seen:
        model(x, labels=x, return_logits=False).loss.backward()
    c = model.config.hidden_size
    logits = [s for _, s in seen.shapes if len(s) >= 2 and s[-1] == V and s != (c, V)]  # not the weight [C, V]
    widest = max(s[0] if len(s) == 2 else s[0] * s[1] for s in logits)
    assert widest <= chunk, f"logits of {widest} tokens at once (chunk {chunk})"
    with OutputShapes() as seen:
        unfused()(x, labels=x).loss.backward()
    assert any(s == (B, T, V) for _, s in seen.shapes), "the reference path does hold all logits"


def test_fused_loss_counts_in_plan_and_bad_chunk_is_refused():
    base = small_model_dict(vocab_size=1000)
    plain = plan(base | {"head": {"type": "lm", "fused_loss": False}}, batch_size=4, seq_len=32, precision="bf16-mixed")
    chunked = plan(
        base | {"head": {"type": "lm", "loss_chunk_size": 16}}, batch_size=4, seq_len=32, precision="bf16-mixed"
    )
    assert chunked.memory.activations < plain.memory.activations
    assert chunked.memory.transient < plain.memory.transient
    whole = plan(
        base | {"head": {"type": "lm", "loss_chunk_size": 128}}, batch_size=4, seq_len=32, precision="bf16-mixed"
    )
    default = plan(base, batch_size=4, seq_len=32, precision="bf16-mixed")  # fused, automatic chunk: 128 tokens
    assert default.memory.transient == whole.memory.transient > chunked.memory.transient
    big = small_model_dict(vocab_size=50257)  # 1,024 tokens: 2 chunks of 512 on a CPU, 1 of 1,024 on a GPU
    on_cpu, on_gpu = (plan(big, batch_size=16, seq_len=64, precision="32-true", device=d) for d in ("cpu", "cuda"))
    assert "logits of 512 tokens" in " ".join(on_cpu.notes) and "logits of 1024 tokens" in " ".join(on_gpu.notes)
    assert on_cpu.memory.transient < on_gpu.memory.transient
    with pytest.raises(ConfigError, match="loss_chunk_size"):
        compose(small_model_dict(head={"type": "lm", "loss_chunk_size": 0}), device="meta")
    with pytest.raises(ConfigError, match=r"head\.loss_chunk_size.*fused_loss is false"):
        compose(small_model_dict(head={"type": "lm", "loss_chunk_size": 8, "fused_loss": False}), device="meta")


@pytest.mark.parametrize(
    "rows, columns, device, want",
    [
        (1024, 50257, "cpu", 512),
        (16 * 1024, 50257, "cpu", 656),
        (16 * 1024, 50257, "cuda", 4096),
        (128, 1000, "cpu", 128),
        (7, 2**40, "cuda", 1),
    ],
)
def test_automatic_chunk_size_bounds_the_chunk_and_splits_evenly(rows, columns, device, want):
    from components.linear_cross_entropy import auto_chunk_size, chunk_bytes

    got = auto_chunk_size(rows, columns, device)
    assert got == want
    assert got == 1 or got * columns * 4 <= chunk_bytes(device)
    assert -(-rows // got) * got - rows < -(-rows // got)  # equal chunks: the last one short by < one row each


@pytest.mark.parametrize("rows", [0, 3])  # no rows; rows that are all ignored
def test_fused_loss_without_labelled_rows_is_nan_with_zero_gradients_as_cross_entropy(rows):
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(rows, 8, generator=gen), torch.randn(10, 8, generator=gen)
    targets = torch.full((rows,), -100)
    got_h, got_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want_h, want_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = linear_cross_entropy.linear_cross_entropy(got_h, got_w, None, targets)
    want = F.cross_entropy(F.linear(want_h, want_w), targets)
    assert got.isnan() and want.isnan()
    got.backward()
    want.backward()
    torch.testing.assert_close(got_w.grad, want_w.grad)
    torch.testing.assert_close(got_h.grad, want_h.grad)


def test_training_step_uses_the_fused_loss_and_a_plain_call_does_not():
    model = lm(head={"type": "lm", "loss_chunk_size": 5})
    reference = unfused()
    reference.load_state_dict(model.state_dict())
    lit = LitComposer(model, {"name": "adamw", "lr": 1e-3}, {"name": "constant"})
    x = ids()
    all_logits = {(B, T, V), (B * T, V)}
    with OutputShapes() as seen:
        loss = lit.training_step({"input_ids": x, "labels": x.clone()}, 0)
    assert not all_logits & {s for _, s in seen.shapes}, "the training step held every logit"
    torch.testing.assert_close(loss, reference(x, labels=x).loss)
    with OutputShapes() as seen:
        out = model(x, labels=x)
    assert out.logits.shape == (B, T, V) and all_logits & {s for _, s in seen.shapes}


def test_fused_loss_asks_autocast_only_of_device_types_it_knows():
    compute_dtype, known = linear_cross_entropy.compute_dtype, linear_cross_entropy.AUTOCAST_DEVICES
    assert {"cpu", "cuda"} <= known and "meta" not in known
    assert compute_dtype(torch.empty(2, device="meta")) == torch.float32  # torch.is_autocast_enabled("meta") raises
    assert compute_dtype(torch.empty(2)) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(torch.empty(2)) == torch.bfloat16
        assert compute_dtype(torch.empty(2, device="meta")) == torch.float32


def test_fused_loss_under_bf16_autocast_matches_the_unfused_one():
    full, fused = unfused(tie_embeddings=False), lm(tie_embeddings=False)
    fused.load_state_dict(full.state_dict())
    x = ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = full(x, labels=x).loss, fused(x, labels=x, return_logits=False).loss
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    want.backward()
    got.backward()
    for (name, a), b in zip(full.named_parameters(), fused.parameters(), strict=True):
        assert b.grad.dtype == a.grad.dtype == torch.float32, name
        torch.testing.assert_close(b.grad, a.grad, rtol=5e-2, atol=5e-3, msg=name)


# ----------------------------------------------------------------------------- grouped key/value heads
@pytest.mark.parametrize(
    "device_type, dtype, masked, head_dim, reads",
    [
        ("cpu", torch.float32, True, 64, True),  # the CPU flash kernel takes grouped heads, masked or not
        ("cpu", torch.bfloat16, False, 512, True),
        ("cuda", torch.bfloat16, False, 128, True),  # CUDA flash: half precision, no mask, head dim <= 256
        ("cuda", torch.float16, False, 256, True),
        ("cuda", torch.float32, False, 64, False),  # these would run the math kernel: K/V are repeated
        ("cuda", torch.bfloat16, True, 64, False),
        ("cuda", torch.bfloat16, False, 320, False),
        ("mps", torch.float16, False, 64, False),
    ],
)
def test_grouped_heads_go_to_sdpa_uncopied_only_where_a_fused_kernel_reads_them(
    device_type, dtype, masked, head_dim, reads
):
    if not kernels.SDPA_HAS_GQA:
        reads = False
    assert kernels.sdpa_reads_grouped_heads(device_type, dtype, masked, head_dim) is reads


@pytest.mark.parametrize("position", ["learned", "alibi"])  # alibi: a per-head float bias for a mask
def test_gqa_reads_kv_heads_uncopied_folds_queries_or_repeats_kv_with_the_same_result(position, monkeypatch):
    model = compose(
        small_model_dict(attention={"type": "gqa", "num_kv_heads": 2}, position={"type": position}), seed=0
    ).eval()
    x = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    padded = torch.ones(B, T)
    padded[0, :3] = 0  # left padding: the attention gets a mask
    sdpa, seen = F.scaled_dot_product_attention, []

    def spy(q, k, v, *args, **kwargs):  # (query heads, key heads, value heads, query rows, enable_gqa)
        seen.append((q.shape[1], k.shape[1], v.shape[1], q.shape[2], kwargs.get("enable_gqa", False)))
        return sdpa(q, k, v, *args, **kwargs)

    def run(**kwargs) -> torch.Tensor:
        seen.clear()
        with torch.no_grad():
            return model(x, **kwargs).logits

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    grouped, grouped_padded = run(), run(attention_mask=padded)
    if kernels.SDPA_HAS_GQA:  # the CPU's kernel reads grouped heads, masked or not
        assert seen == [(4, 2, 2, T, True)] * 2
    monkeypatch.setattr(kernels, "sdpa_reads_grouped_heads", lambda *args: False)  # as CUDA in float32
    folded_padded = run(attention_mask=padded)
    assert seen == [(2, 2, 2, 2 * T, False)] * 2  # two query heads per K/V head, as rows; K/V not copied
    repeated = run()
    if position == "learned":  # no mask: K/V repeated to every query head for the causal kernel
        assert seen == [(4, 4, 4, T, False)] * 2
    else:  # alibi's bias is a mask: folded
        assert seen == [(2, 2, 2, 2 * T, False)] * 2
    torch.testing.assert_close(repeated, grouped, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded_padded, grouped_padded, rtol=1e-5, atol=1e-5)
    real = padded.bool()
    assert not torch.allclose(grouped_padded[real], grouped[real], atol=1e-3)  # the padding mask mattered


def test_gqa_decoding_with_folded_queries_gives_the_same_tokens(monkeypatch):
    model = lm(tie_embeddings=False, attention={"type": "gqa", "num_kv_heads": 2}, position={"type": "rope"})
    x = ids(seed=3)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :4] = 0
    want = [model.generate(x, 8, attention_mask=mask), model.generate(x, 8)]
    monkeypatch.setattr(kernels, "sdpa_reads_grouped_heads", lambda *args: False)  # decode steps fold queries
    assert torch.equal(model.generate(x, 8, attention_mask=mask), want[0])
    assert torch.equal(model.generate(x, 8), want[1])


def test_folded_and_repeated_gqa_trace_as_one_graph(monkeypatch):
    monkeypatch.setattr(kernels, "sdpa_reads_grouped_heads", lambda *args: False)  # CUDA's fallbacks
    model = lm(tie_embeddings=False, attention={"type": "gqa", "num_kv_heads": 2}, position={"type": "rope"}).eval()
    x = ids(seed=4)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :2] = 0
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, attention_mask=mask).logits, model(x, attention_mask=mask).logits)
        torch.testing.assert_close(compiled(x).logits, model(x).logits)


# ----------------------------------------------------------------------------- static KV cache
STATIC_CASES = {
    "mha+rope": {"position": {"type": "rope"}},
    "gqa+learned": {"attention": {"type": "gqa", "num_kv_heads": 2}},
    "rolling window": {"attention": {"type": "sliding_window", "window": 4}, "position": {"type": "rope"}},
    "alibi": {"position": {"type": "alibi"}},
}


@pytest.mark.parametrize("case", list(STATIC_CASES))
def test_static_cache_forward_matches_the_dynamic_cache(case):
    model = lm(tie_embeddings=False, **STATIC_CASES[case]).eval()
    x = ids(seed=1)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        dynamic = model.allocate_cache(B, T + 4)
        static = model.allocate_cache(B, T + 4, static=True)
        want = model(x, attention_mask=mask, past_key_values=dynamic, use_cache=True).logits
        got = model(x, attention_mask=mask, position_ids=positions, past_key_values=static, use_cache=True).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)
        assert int(static.position) == T
        full_mask = torch.cat([mask, torch.ones(B, 4, dtype=torch.long)], 1)
        nxt = positions[:, -1:] + 1
        for step in range(4):
            token = want[:, -1].argmax(-1, keepdim=True)
            want = model(
                token,
                attention_mask=full_mask[:, : T + step + 1],
                position_ids=nxt,
                past_key_values=dynamic,
                use_cache=True,
            ).logits
            got = model(token, position_ids=nxt, past_key_values=static, use_cache=True).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            nxt = nxt + 1


def test_static_cache_writes_at_tensor_positions_and_never_grows():
    model = lm()
    cache = model.allocate_cache(B, 8, static=True)
    assert cache.static and all(c.static and c.size == 8 for c in cache)
    assert int(cache.position) == 0 and all(bool((c.slot_pos == -1).all()) for c in cache)
    with torch.no_grad():
        model(ids(t=3), past_key_values=cache, use_cache=True)
    assert int(cache.position) == 3 and cache.length == 3
    assert cache[0].slot_pos.tolist() == [0, 1, 2, -1, -1, -1, -1, -1]
    cache.reset()
    assert int(cache.position) == 0 and bool((cache[0].slot_pos == -1).all())
    with pytest.raises(ModelError, match=r"shape \(2, 3\)"):
        model(ids(t=3), attention_mask=torch.ones(B, 5), past_key_values=cache, use_cache=True)


def eager_backend(monkeypatch) -> None:
    """Compile the decode step with the 'eager' backend: Dynamo captures the same graph, without
    Inductor's code generation (the Inductor path has its own test below)."""
    step = torch.compile(generation._decode_step, backend="eager", fullgraph=True, dynamic=False)
    monkeypatch.setitem(generation._COMPILED, "default", step)


@pytest.mark.parametrize("case", list(STATIC_CASES))
def test_compiled_generation_equals_eager_generation(case, monkeypatch):
    eager_backend(monkeypatch)
    model = lm(tie_embeddings=False, **STATIC_CASES[case])
    x = ids(seed=2)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :4] = 0
    for kwargs in ({}, {"attention_mask": mask}):
        want = model.generate(x, 10, **kwargs)
        got = model.generate(x, 10, compile=True, **kwargs)
        assert torch.equal(got, want), (case, kwargs)


@pytest.mark.parametrize("case", ["gqa+learned", "rolling window"])
def test_compiled_generation_past_the_window_equals_eager_generation(case, monkeypatch):
    """Past max_position_embeddings the compiled loop leaves its static cache and crops like the eager one."""
    torch._dynamo.reset()  # each new model is one more compilation of the step: stay under the recompile limit
    eager_backend(monkeypatch)
    model = lm(tie_embeddings=False, max_position_embeddings=16, **STATIC_CASES[case])
    x = ids(seed=3, t=6)
    want = model.generate(x, 20)
    assert want.shape == (B, 26)
    assert torch.equal(model.generate(x, 20, compile=True), want)
    long_prompt = ids(seed=4, t=20)  # longer than the window: no cache at all
    assert torch.equal(model.generate(long_prompt, 3, compile=True), model.generate(long_prompt, 3))


def test_compiled_decode_step_is_traced_once_with_inductor():
    torch._dynamo.reset()
    counters.clear()
    model = lm(tie_embeddings=False, position={"type": "rope"})
    x = ids(seed=4)
    want = model.generate(x, 12)
    got = model.generate(x, 12, compile=True)
    again = model.generate(ids(seed=5), 12, compile=True)  # same shapes: the same cache and compiled step
    assert torch.equal(got, want)
    assert torch.equal(again, model.generate(ids(seed=5), 12))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert sum(counters["recompiles"].values()) == 0, dict(counters["recompiles"])


def test_static_cache_is_reused_between_calls(monkeypatch):
    eager_backend(monkeypatch)
    model = lm()
    model.generate(ids(), 4, compile=True)
    first = generation._STATIC_CACHES[model][1]
    model.generate(ids(seed=1), 6, compile=True)
    assert generation._STATIC_CACHES[model][1] is first  # same bucket of capacity
    model.generate(ids(b=3), 4, compile=True)
    assert generation._STATIC_CACHES[model][1] is not first  # another batch size: new buffers


def test_compile_arguments_are_checked():
    model = lm()
    with pytest.raises(ModelError, match="compile='fast'"):
        model.generate(ids(), 4, compile="fast")
    with pytest.raises(ModelError, match="use_cache=True"):
        model.generate(ids(), 4, compile=True, use_cache=False)


def test_attention_without_static_support_is_refused():
    model = compose(small_model_dict(attention={"type": "tests.plugins.my_attention.MyAttention"}), seed=0)
    with pytest.raises(ModelError, match="MyAttention.*static"):
        model.allocate_cache(B, 8, static=True)


# ----------------------------------------------------------------------------- FlexAttention windows
def window_models(**attention):
    base = {"type": "sliding_window", "window": 3, "num_kv_heads": 2, **attention}
    sdpa = lm(attention=base | {"kernel": "sdpa"}, position={"type": "rope"})
    flex = lm(attention=base | {"kernel": "flex"}, position={"type": "rope"})
    flex.load_state_dict(sdpa.state_dict())
    return sdpa, flex


@pytest.mark.parametrize("causal", [True, False])
def test_flex_window_kernel_matches_sdpa_with_a_mask(causal, monkeypatch):
    sdpa, flex = window_models(causal=causal)
    x = ids(t=20)
    calls = []
    real = kernels.flex_attention
    monkeypatch.setattr(kernels, "flex_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():  # FlexAttention runs on CPUs without gradients only
        torch.testing.assert_close(flex(x).logits, sdpa(x).logits, rtol=1e-5, atol=1e-5)
    assert calls, "the flex path ran"
    out = flex(x, labels=x)  # with gradients on a CPU: SDPA with a mask, same result
    out.loss.backward()
    torch.testing.assert_close(out.loss, sdpa(x, labels=x).loss)


def test_window_kernel_option_is_checked():
    assert (
        compose(small_model_dict(attention={"type": "sliding_window", "window": 3}), device="meta")
        .layers[0]
        .attn.kernel
        == "auto"
    )
    with pytest.raises(ConfigError, match="kernel"):
        compose(small_model_dict(attention={"type": "sliding_window", "window": 3, "kernel": "triton"}), device="meta")


# ----------------------------------------------------------------------------- padded vocabulary
def test_padded_vocabulary_masks_its_logits_and_is_planned():
    vocab, multiple = 50, 64
    padded = lm(vocab_size=vocab, pad_vocab_to_multiple_of=multiple)
    plain = lm(vocab_size=vocab)
    assert padded.embed.weight.shape[0] == multiple and plain.embed.weight.shape[0] == vocab
    with torch.no_grad():
        padded.embed.weight[:vocab] = plain.embed.weight
        for (name, p), q in zip(padded.named_parameters(), plain.parameters(), strict=True):
            if name != "embed.weight":
                p.copy_(q)
    x = ids(vocab=vocab)
    logits = padded(x).logits
    assert bool((logits[..., vocab:] == float("-inf")).all())
    torch.testing.assert_close(logits[..., :vocab], plain(x).logits)
    fused_loss = padded(x, labels=x, return_logits=False).loss  # the fused loss masks them too
    torch.testing.assert_close(fused_loss, plain(x, labels=x).loss)
    sampled = padded.generate(x, 20, do_sample=True, temperature=50.0, seed=0)
    assert int(sampled.max()) < vocab
    report = plan(padded.config, batch_size=1, seq_len=16)
    assert report.params_vocab_padding == (multiple - vocab) * padded.config.hidden_size
    assert any(f"padded to {multiple}" in note for note in report.notes)


# ----------------------------------------------------------------------------- TF32
def test_tf32_is_switched_on_for_ampere_and_newer_gpus_only(monkeypatch):
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        assert not enable_tf32(torch.device("cpu"))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
        assert not enable_tf32(torch.device("cuda", 0))
        assert torch.get_float32_matmul_precision() == "highest"
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        assert enable_tf32(torch.device("cuda", 0))
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


# ----------------------------------------------------------------------------- host reads
HOST_READS = ("item", "__float__", "__int__", "__bool__", "tolist")


class CountHostReads(L.Callback):
    """Counts Tensor value reads (each a host-device synchronisation on a GPU) from the start to the end
    of every training batch: the training step, backward, clipping, the optimizer and the callbacks."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.reads = monkeypatch, []
        self.quiet: list[list[str]] = []  # the reads of each batch that did not log

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.reads = []
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)

            def counted(t, *args, _name=name, _fn=original, **kwargs):
                self.reads.append(_name)
                return _fn(t, *args, **kwargs)

            self.monkeypatch.setattr(torch.Tensor, name, counted)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.monkeypatch.undo()
        if not trainer._logger_connector.should_update_logs:  # the last step logs (and may read values)
            self.quiet.append(self.reads)


def test_training_steps_read_nothing_on_the_host_between_log_intervals(monkeypatch, tmp_path):
    model = compose(small_model_dict(), seed=0)
    x = ids()
    # fused AdamW, as on CUDA (optim.fused=auto): the foreach kernel reads its CPU step counters with .item()
    lit = LitComposer(
        model,
        {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1, "fused": True},
        {"name": "cosine", "warmup_steps": 2, "min_lr": 1e-4},
    )
    counter = CountHostReads(monkeypatch)
    trainer = L.Trainer(
        max_steps=5,
        accelerator="cpu",
        devices=1,
        log_every_n_steps=1000,
        gradient_clip_val=1.0,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        logger=L.pytorch.loggers.CSVLogger(str(tmp_path), name="", version=""),
        callbacks=[ValidateAtEnd(), Throughput(None, "32-true"), NanGuard(), LearningRate(), counter],
    )
    trainer.fit(lit, DataLoader(Repeat({"input_ids": x, "labels": x.clone()}, 5), batch_size=None))
    assert len(counter.quiet) >= 3
    # the one read per step is the model's token-id range check, done on CPUs only (an accelerator skips
    # it unless model.check_inputs_on_accelerator): nothing else in the step reads a value
    assert all(reads == ["tolist"] for reads in counter.quiet), counter.quiet
