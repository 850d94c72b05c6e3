"""composer.generation: cache equivalence, padding, sampling filters, stopping, streaming (ids and text),
past the context window, threads, OOM split, bad input."""

from __future__ import annotations

import inspect
import math
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_model_dict

from components.kv_cache import KVCache
from composer import compose, generation_inputs
from composer.data.tokenizer import byte_tokenizer, char_tokenizer
from composer.errors import ModelError
from composer.generation import (
    DEFAULTS,
    SamplingSettings,
    apply_repetition_penalty,
    choose_tokens,
    generate,
    stream_generate,
    stream_text,
    top_k_filter,
    top_p_filter,
)
from composer.generation_inputs import decode_threads
from composer.generation_text import TextDecoder, encode_prompt

ATTENTION = {
    "mha": {"type": "mha"},
    "gqa": {"type": "gqa", "num_kv_heads": 2},
    "mqa": {"type": "mqa"},
    "sliding_window": {"type": "sliding_window", "window": 4, "num_kv_heads": 2},
}
POSITIONS = ["learned", "rope", "alibi", "none"]
V = 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models decode token by token: one thread is faster than two on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lm(attention: str = "mha", position: str = "rope", **changes):
    """A small model whose greedy continuations vary (init_std 0.35, untied head), so a wrong cache,
    mask or position shows up as different tokens."""
    cfg = small_model_dict(
        attention=ATTENTION[attention], position={"type": position}, init_std=0.35, tie_embeddings=False, **changes
    )
    return compose(cfg, seed=3)


def prompts(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def full_logits(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of the whole sequence in one forward without a cache (independent of generate)."""
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits.double()


# ----------------------------------------------------------------------------- cache equivalence
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("attention", list(ATTENTION))
def test_cached_greedy_equals_recomputed(attention, position):
    model = lm(attention, position)
    ids = prompts(2, 9)
    cached = generate(model, ids, 24)
    recomputed = generate(model, ids, 24, use_cache=False)
    assert cached.shape == (2, 33)
    assert torch.equal(cached[:, :9], ids)
    assert torch.equal(cached, recomputed)
    assert all(len(set(row)) >= 3 for row in cached[:, 9:].tolist())  # not a degenerate repetition


def test_mixed_layers_sliding_window_and_full():
    """Mistral-like per-layer mix: layer 1 slides (rolling cache), layer 0 sees everything."""
    model = lm("mha", "rope", layers=[{"select": [1], "attention": {"type": "sliding_window", "window": 3}}])
    ids = prompts(2, 6, seed=1)
    assert torch.equal(generate(model, ids, 20), generate(model, ids, 20, use_cache=False))


def test_cache_allocated_once_rolling_for_windows(monkeypatch):
    model = lm("sliding_window", "rope", layers=[{"select": [0], "attention": {"type": "gqa", "num_kv_heads": 2}}])
    caches = []
    allocate = model.allocate_cache

    def spy(batch_size, capacity, *args, **kwargs):
        cache = allocate(batch_size, capacity, *args, **kwargs)
        caches.append((batch_size, capacity, cache))
        return cache

    def no_growth(self, size, rolling):
        raise AssertionError("the cache grew during generation")

    monkeypatch.setattr(model, "allocate_cache", spy)
    monkeypatch.setattr(KVCache, "_resize", no_growth)
    out = generate(model, prompts(3, 7), 16)
    assert out.shape == (3, 23)
    assert len(caches) == 1
    batch, capacity, cache = caches[0]
    assert (batch, capacity) == (3, 7 + 16)
    assert not cache[0].rolling and cache[0].k.shape == (3, 2, 23, 8)  # full layer: prompt + new
    assert cache[1].rolling and cache[1].k.shape == (3, 2, 4, 8)  # sliding layer: W slots only
    assert cache.length == 7 + 15  # the last token is returned, never fed


# ----------------------------------------------------------------------------- padding
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("attention", list(ATTENTION))
def test_left_padded_batch_equals_each_prompt_alone(attention, position):
    model = lm(attention, position)
    lengths = [7, 3, 5]
    alone = [generate(model, prompts(1, n, seed=n), 12)[0] for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = prompts(1, n, seed=n)[0]
        mask[i, width - n :] = 1
    for use_cache in (True, False):
        batched = generate(model, ids, 12, attention_mask=mask, use_cache=use_cache)
        assert batched.shape == (3, width + 12)
        for i, n in enumerate(lengths):
            assert torch.equal(batched[i, width - n :], alone[i]), (i, use_cache)


def test_right_padding_is_converted_to_left_padding():
    model = lm("gqa", "rope")
    a, b = prompts(1, 6, seed=1)[0], prompts(1, 3, seed=2)[0]
    left = torch.stack([a, torch.cat([torch.zeros(3, dtype=torch.long), b])])
    right = torch.stack([a, torch.cat([b, torch.zeros(3, dtype=torch.long)])])
    left_mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    right_mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    expected = generate(model, left, 10, attention_mask=left_mask)
    with pytest.warns(UserWarning, match="right-padded"):
        converted = generate(model, right, 10, attention_mask=right_mask)
    assert torch.equal(converted, expected)  # returned in the left-padded layout
    assert torch.equal(expected[1, 3:], generate(model, b[None], 10)[0])


@pytest.mark.parametrize(
    "mask, message",
    [
        ([[1, 1, 1, 1], [1, 0, 1, 1]], "padding between tokens"),
        ([[1, 1, 1, 1], [0, 0, 0, 0]], "row 1 has no tokens"),
        ([[1, 1, 1, 1], [0, 2, 1, 1]], "only 0"),
        ([[1, 1, 1]], "shape"),
    ],
)
def test_bad_attention_masks_are_refused(mask, message):
    with pytest.raises(ModelError, match=message):
        generate(lm(), prompts(2, 4), 3, attention_mask=torch.tensor(mask))


# ----------------------------------------------------------------------------- sampling
def test_sampling_is_reproducible_with_a_seed_and_leaves_the_global_rng_alone():
    model = lm("mqa", "alibi")
    ids = prompts(2, 5)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate(model, ids, 20, do_sample=True, temperature=1.5, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = generate(model, ids, 20, do_sample=True, temperature=1.5, seed=7)
    c = generate(model, ids, 20, do_sample=True, temperature=1.5, seed=8)
    gen = torch.Generator().manual_seed(7)
    d = generate(model, ids, 20, do_sample=True, temperature=1.5, seed=gen)
    assert torch.equal(a, b) and torch.equal(a, d)
    assert not torch.equal(a, c)
    assert not torch.equal(a, generate(model, ids, 20))  # sampling is not greedy decoding


def _allowed_top_k(logits: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-logits, kind="stable")[:k].tolist())


def _allowed_top_p(logits: np.ndarray, p: float) -> set[int]:
    """The smallest set of most likely tokens whose probability reaches p."""
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    keep, mass = set(), 0.0
    for token in np.argsort(-probs, kind="stable"):
        keep.add(int(token))
        mass += probs[token]
        if mass >= p:
            break
    return keep


def test_top_k_and_top_p_never_sample_excluded_tokens():
    n, vocab = 4000, 50
    base = torch.randn(8, vocab, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    logits = base.repeat(n // 8, 1)  # every row 500 times
    gen = torch.Generator().manual_seed(1)
    for settings in (
        SamplingSettings(True, 1.0, top_k=5),
        SamplingSettings(True, 0.7, top_p=0.6),
        SamplingSettings(True, 1.3, top_k=10, top_p=0.5),
    ):
        tokens = choose_tokens(logits.float(), settings, generator=gen)
        for row in range(8):
            scaled = base[row].numpy() / settings.temperature
            allowed = set(range(vocab))
            if settings.top_k:
                allowed &= _allowed_top_k(scaled, settings.top_k)
            if settings.top_p:
                top = torch.from_numpy(scaled)
                if settings.top_k:
                    top = top.masked_fill(~torch.isin(torch.arange(vocab), torch.tensor(sorted(allowed))), -math.inf)
                allowed &= _allowed_top_p(top.numpy(), settings.top_p)
            drawn = set(tokens[row::8].tolist())
            assert drawn <= allowed, (settings, row, drawn - allowed)
            if len(allowed) > 1:
                assert len(drawn) > 1  # it really samples


def test_filters_directly():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0]])
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[False, True, False, True, True]]
    assert torch.equal(top_k_filter(logits, 99), logits)
    probs = logits.softmax(-1)[0]  # 0.64, 0.09, 0.24, 0.03, 0.01
    assert probs[0] < 0.7 < probs[0] + probs[2]
    assert torch.isinf(top_p_filter(logits, 0.7)).tolist() == [[False, True, False, True, True]]
    assert torch.isinf(top_p_filter(logits, 0.5)).tolist() == [[False, True, True, True, True]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_sampled_generation_respects_top_k_and_top_p_end_to_end():
    model = lm("gqa", "learned")
    ids = prompts(8, 4)
    for kwargs in (dict(top_k=3, temperature=0.8), dict(top_p=0.5, temperature=1.2)):
        out = generate(model, ids, 12, do_sample=True, seed=0, **kwargs)
        logits = full_logits(model, out)  # position i predicts token i + 1
        for b in range(8):
            for i in range(4, out.shape[1]):
                scaled = logits[b, i - 1].numpy() / kwargs["temperature"]
                allowed = _allowed_top_k(scaled, 3) if "top_k" in kwargs else _allowed_top_p(scaled, 0.5)
                assert int(out[b, i]) in allowed


def test_repetition_penalty_formula():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_repetition_penalty_changes_greedy_decoding_as_ctrl_defines():
    model = lm("mha", "rope")
    ids = prompts(2, 5, seed=4)
    plain = generate(model, ids, 16)
    penalised = generate(model, ids, 16, repetition_penalty=3.0)
    assert not torch.equal(plain, penalised)
    logits = full_logits(model, penalised)
    for b in range(2):
        for i in range(5, penalised.shape[1]):
            scores = logits[b, i - 1].clone()
            for token in set(penalised[b, :i].tolist()):  # independently: CTRL on every token seen so far
                scores[token] = scores[token] / 3.0 if scores[token] > 0 else scores[token] * 3.0
            assert int(scores.argmax()) == int(penalised[b, i])
    repeats = lambda out: sum(len(r) - len(set(r)) for r in out[:, 5:].tolist())  # noqa: E731
    assert repeats(penalised) < repeats(plain)


# ----------------------------------------------------------------------------- stopping and streaming
def test_eos_stops_a_row_and_pads_after_it():
    model = lm("mha", "learned")
    ids = prompts(2, 5, seed=5)
    plain = generate(model, ids, 12)
    eos = int(plain[0, 5 + 3])  # row 0 emits it at its 4th new token
    first = [i for i in range(5, 17) if int(plain[1, i]) == eos]
    out = generate(model, ids, 12, eos_token_id=[eos, V - 1], pad_token_id=0)
    stop0 = 5 + plain[0, 5:].tolist().index(eos)
    assert torch.equal(out[0, : stop0 + 1], plain[0, : stop0 + 1])
    assert (out[0, stop0 + 1 :] == 0).all()
    stop1 = first[0] if first else out.shape[1]
    assert torch.equal(out[1, :stop1], plain[1, :stop1])
    # one prompt: the call ends at eos, which is kept
    alone = generate(model, ids[:1], 12, eos_token_id=eos)
    assert torch.equal(alone[0], plain[0, : stop0 + 1])
    # the default pad is the (first) eos id
    both = generate(model, ids, 12, eos_token_id=eos)
    assert (both[0, stop0:] == eos).all()


def test_streaming_yields_the_returned_tokens():
    model = lm("sliding_window", "alibi")
    ids = prompts(3, 6, seed=6)
    seen = []
    out = generate(model, ids, 10, streamer=lambda t: seen.append(t.clone()))
    assert len(seen) == 10 and all(t.shape == (3,) for t in seen)
    assert torch.equal(torch.stack(seen, dim=1), out[:, 6:])
    streamed = list(stream_generate(model, ids, 10))
    assert torch.equal(torch.stack(streamed, dim=1), out[:, 6:])
    assert not streamed[0].is_inference()
    sampled = list(stream_generate(model, ids, 10, do_sample=True, top_k=4, seed=3))
    assert torch.equal(torch.stack(sampled, dim=1), generate(model, ids, 10, do_sample=True, top_k=4, seed=3)[:, 6:])


def test_stream_generate_checks_arguments_at_the_call():
    with pytest.raises(ModelError, match="top_k"):
        stream_generate(lm(), prompts(1, 3), 4, do_sample=True, top_k=0)
    with pytest.raises(ModelError, match="unknown arguments"):
        stream_generate(lm(), prompts(1, 3), 4, temprature=0.5)


# ----------------------------------------------------------------------------- memory, modes, overflow
def test_out_of_memory_splits_the_batch(monkeypatch):
    model = lm("gqa", "rope")
    ids = prompts(5, 6, seed=7)
    mask = torch.ones(5, 6, dtype=torch.long)
    mask[1, :2] = mask[4, :4] = 0
    expected = generate(model, ids, 9, attention_mask=mask, eos_token_id=7)
    forward = model.forward
    sizes = []

    def small_batches_only(input_ids, *args, **kwargs):
        sizes.append(input_ids.shape[0])
        if input_ids.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward", small_batches_only)
    with pytest.warns(RuntimeWarning, match="does not fit in accelerator memory"):
        out = generate(model, ids, 9, attention_mask=mask, eos_token_id=7)
    assert torch.equal(out, expected)
    assert set(sizes) == {1, 2, 3, 5}

    def never(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(model, "forward", never)
    with pytest.raises(ModelError, match="one prompt of 6 tokens"), pytest.warns(RuntimeWarning):
        generate(model, ids[:2], 4)
    with pytest.raises(ModelError, match="out of accelerator memory"):
        list(stream_generate(model, ids[:2], 4))


def test_runs_in_inference_mode_and_restores_the_training_mode():
    model = lm("mha", "learned", dropout=0.5)
    ids = prompts(2, 4)
    model.train()
    modes = []
    forward = model.forward
    model.forward = lambda *a, **k: (
        modes.append((model.training, torch.is_inference_mode_enabled())),
        forward(*a, **k),
    )[1]
    out = generate(model, ids, 5)
    assert model.training and set(modes) == {(False, True)}  # eval + inference mode inside, dropout off
    del model.forward
    assert torch.equal(out, generate(model, ids, 5))  # deterministic although the model trains
    assert model.training
    # the result is an ordinary tensor that training code can use
    loss = model(out, labels=out).loss
    loss.backward()
    model.eval()
    list(stream_generate(model, ids, 3))
    assert not model.training
    assert torch.equal(model.generate(ids, 5), out)  # ComposedModel.generate delegates here


def test_zero_new_tokens_returns_the_prompt():
    ids = prompts(2, 4)
    assert torch.equal(generate(lm(), ids, 0), ids)


# ----------------------------------------------------------------------------- past the context window
def fresh_next_token(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The greedy next token of a fresh model call on ``ids`` (no cache, positions from 0): [B]."""
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits[:, -1].argmax(-1)


@pytest.mark.parametrize("attention", ["mha", "sliding_window"])
@pytest.mark.parametrize("position", POSITIONS)
def test_tokens_past_the_window_are_a_fresh_call_on_the_cropped_context(position, attention):
    """nanoGPT's crop: once prompt + new tokens pass max_position_embeddings (P), each token is what a
    fresh call on the last P tokens predicts, for every position encoding; with or without the cache."""
    p = 16
    model = lm(attention, position, max_position_embeddings=p)
    ids = prompts(2, 5, seed=11)
    out = generate(model, ids, 30)
    assert out.shape == (2, 35) and torch.equal(out[:, :5], ids)
    assert torch.equal(out[:, : p + 1], generate(model, ids, p + 1 - 5))  # inside the window: as before
    for n in range(p, out.shape[1]):  # token n from tokens n-P .. n-1
        assert torch.equal(out[:, n], fresh_next_token(model, out[:, n - p : n])), n
    assert torch.equal(out, generate(model, ids, 30, use_cache=False))
    assert len(set(out[0, p:].tolist())) >= 3  # not a degenerate repetition


@pytest.mark.parametrize("position", ["rope", "alibi", "none"])
def test_relative_encodings_do_not_see_where_the_cropped_window_starts(position):
    """Why crop restarts positions at 0: for rotary, ALiBi and no encoding the logits of a window are the
    same whatever its first position, so the crop equals a continuation with growing positions."""
    model = lm("gqa", position, max_position_embeddings=64)
    ids = prompts(2, 16, seed=12)
    with torch.no_grad():
        at_zero = model(ids).logits
        for offset in (1, 30, 48):
            shifted = model(ids, position_ids=torch.arange(offset, offset + 16)[None]).logits
            assert torch.allclose(at_zero, shifted, atol=1e-4), offset
    learned = lm("gqa", "learned", max_position_embeddings=64)
    with torch.no_grad():
        shifted = learned(ids, position_ids=torch.arange(30, 46)[None]).logits
        assert not torch.allclose(learned(ids).logits, shifted, atol=1e-2)  # absolute: the start matters


def test_left_padded_rows_past_the_window_equal_each_prompt_alone():
    model = lm("gqa", "learned", max_position_embeddings=12)
    lengths = [9, 3, 6]
    alone = [generate(model, prompts(1, n, seed=n), 20)[0] for n in lengths]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 9 - n :], mask[i, 9 - n :] = prompts(1, n, seed=n)[0], 1
    batched = generate(model, ids, 20, attention_mask=mask)
    for i, n in enumerate(lengths):
        assert torch.equal(batched[i, 9 - n :], alone[i]), i


def test_a_prompt_longer_than_the_window_is_kept_and_cropped():
    model = lm("mha", "learned", max_position_embeddings=16)
    ids = prompts(2, 20, seed=9)
    out = generate(model, ids, 6)
    assert out.shape == (2, 26) and torch.equal(out[:, :20], ids)  # the whole prompt is returned
    for n in range(20, 26):
        assert torch.equal(out[:, n], fresh_next_token(model, out[:, n - 16 : n]))
    streamed = torch.stack(list(stream_generate(model, ids, 6)), dim=1)
    assert torch.equal(streamed, out[:, 20:])


def test_context_overflow_error_suggests_values_this_prompt_accepts():
    model = lm("mha", "learned", max_position_embeddings=16)
    ids = prompts(1, 6, seed=9)
    with pytest.raises(ModelError, match=r"6 \+ max_new_tokens 40 = 46 exceeds max_position_embeddings=16") as err:
        generate(model, ids, 40, context_overflow="error")
    message = str(err.value)
    assert "context_overflow='crop'" in message
    room = int(re.search(r"max_new_tokens <= (\d+)", message).group(1))
    assert room == 10 and generate(model, ids, room, context_overflow="error").shape == (1, 16)  # accepted
    with pytest.raises(ModelError, match="exceeds"):
        generate(model, ids, room + 1, context_overflow="error")
    # a prompt longer than the window: the suggestion is a shorter prompt, and that one is accepted
    with pytest.raises(ModelError) as err:
        generate(model, prompts(1, 20), 4, context_overflow="error")
    assert "max_new_tokens <=" not in str(err.value)
    keep = int(re.search(r"a prompt of at most (\d+) tokens", str(err.value)).group(1))
    assert generate(model, prompts(1, 20)[:, -keep:], 4, context_overflow="error").shape == (1, 16)
    with pytest.raises(ModelError, match="context_overflow='truncate'.*'crop'"):
        generate(model, ids, 2, context_overflow="truncate")
    with pytest.raises(ModelError, match="prompt_overflow is now context_overflow"):
        stream_generate(model, ids, 2, prompt_overflow="error")


# ----------------------------------------------------------------------------- threads
class _BigModel(torch.nn.Module):
    """Only its parameter count matters to the thread choice (4M parameters)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(2048, 2048))


def test_auto_threads_are_one_for_small_models_and_torch_is_restored_after(monkeypatch):
    model = lm("mha", "rope")
    ids = prompts(1, 4)
    seen = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: (seen.append(torch.get_num_threads()), forward(*a, **k))[1])
    torch.set_num_threads(2)
    try:
        generate(model, ids, 3)  # threads="auto": a 20k-parameter model decodes on one thread
        assert set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        generate(model, ids, 3, threads=None)  # torch's setting, untouched
        assert set(seen) == {2}
        seen.clear()
        torch.set_num_threads(1)
        generate(model, ids, 3, threads=2)
        assert set(seen) == {2} and torch.get_num_threads() == 1
        seen.clear()
        tokens = stream_generate(model, ids, 3, threads=2)
        next(tokens)
        assert torch.get_num_threads() == 2  # while the stream is open
        list(tokens)
        assert torch.get_num_threads() == 1 and set(seen) == {2}
    finally:
        torch.set_num_threads(1)


def test_auto_threads_for_larger_models_follow_the_idle_cores(monkeypatch):
    big, cpu = _BigModel(), torch.device("cpu")
    assert decode_threads("auto", big, 1, cpu) == 1  # 4M x 1 row: small
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(generation_inputs, "idle_cores", lambda: 2)
        assert decode_threads("auto", big, 4, cpu) == 2  # 16M: as many threads as idle cores
        monkeypatch.setattr(generation_inputs, "idle_cores", lambda: 1)
        assert decode_threads("auto", big, 4, cpu) == 1  # a busy core: one thread
        monkeypatch.setattr(generation_inputs, "idle_cores", lambda: 8)
        assert decode_threads("auto", big, 4, cpu) == 2  # never more than torch is set to
    finally:
        torch.set_num_threads(1)
    assert decode_threads("auto", big, 4, torch.device("cuda")) is None
    assert decode_threads(3, big, 4, cpu) == 3 and decode_threads(None, big, 4, cpu) is None
    for bad in (0, "many", 1.5, True):
        with pytest.raises(ModelError, match="threads="):
            decode_threads(bad, big, 1, cpu)


def test_steps_past_the_window_get_their_own_thread_count(monkeypatch):
    """A step past the window runs P tokens, not one: P times the work, so "auto" may give it more threads."""
    model = lm("mha", "learned", max_position_embeddings=16)
    params = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(generation_inputs, "SMALL_DECODE_WORK", 4 * params)  # 1 token: small; 16 tokens: not
    monkeypatch.setattr(generation_inputs, "idle_cores", lambda: 2)
    seen = []
    forward = model.forward
    monkeypatch.setattr(
        model, "forward", lambda ids, **k: (seen.append((ids.shape[1], torch.get_num_threads())), forward(ids, **k))[1]
    )
    torch.set_num_threads(2)
    try:
        out = generate(model, prompts(1, 5), 20)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        assert torch.equal(generate(model, prompts(1, 5), 20, threads=None), out)  # the same tokens on one thread
    finally:
        torch.set_num_threads(1)
    first = seen[:20]  # prefill (5 tokens), 11 cached steps (tokens 6..16), 8 steps past the window
    assert first[0] == (5, 1) and set(first[1:12]) == {(1, 1)}  # one thread for one token a step
    assert set(first[12:]) == {(16, 2)}  # 16 tokens a step: two threads
    assert set(seen[20:]) == {(5, 1), (1, 1), (16, 1)}  # threads=None: torch's setting throughout


@pytest.mark.skipif(not Path("/proc/loadavg").exists(), reason="reads /proc")
def test_idle_cores_count_the_other_processes_running_now():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # started and spinning
        assert generation_inputs._others_running() >= 1  # a spinning process is always runnable
        assert 1 <= generation_inputs.idle_cores() <= max(1, len(os.sched_getaffinity(0)) - 1)
    finally:
        spinner.kill()
        spinner.wait()


# ----------------------------------------------------------------------------- text
def test_text_decoder_emits_characters_only_once_complete():
    tok = byte_tokenizer()
    decoder = TextDecoder(tok, tok.encode("ab").ids)
    pieces = [decoder.push(i) for i in tok.encode("cé!😀").ids]  # é: 2 bytes, 😀: 4 bytes
    assert [p for p in pieces if p] == ["c", "é", "!", "😀"]
    assert pieces.count("") == 1 + 3  # held back while a character is incomplete
    assert decoder.finish() == ""
    decoder = TextDecoder(tok, [])
    assert decoder.push(0xE2) == "" and decoder.push(ord("a")) == "\ufffda"  # an invalid byte is not held forever
    assert decoder.push(0xE2) == "" and decoder.finish() == "\ufffd"  # an incomplete tail, flushed at the end


def test_stream_text_joins_to_the_decoded_continuation():
    tok = byte_tokenizer()
    model = lm("gqa", "rope", vocab_size=256, max_position_embeddings=24)
    prompt = "héllo"
    ids = tok.encode(prompt).ids
    kwargs = dict(do_sample=True, top_k=40, seed=5)
    out = generate(model, torch.tensor([ids]), 40, **kwargs)[0].tolist()  # past the 24-token window too
    pieces = list(stream_text(model, tok, prompt, 40, **kwargs))
    assert "".join(pieces) == tok.decode(out)[len(prompt) :]
    assert len(pieces) > 1 and not any(p.endswith("\ufffd") for p in pieces[:-1])
    assert "".join(stream_text(model, tok, ids, 40, **kwargs)) == "".join(pieces)  # the prompt as ids
    with pytest.raises(ModelError, match="no tokens"):
        stream_text(model, tok, "", 4)
    with pytest.raises(ModelError, match="attention_mask"):
        stream_text(model, tok, "hi", 4, attention_mask=torch.ones(1, 2))


def test_prompt_characters_outside_a_char_vocabulary_are_named():
    tok = char_tokenizer(["ROMEO: hello"])
    model = lm("mha", "learned", vocab_size=tok.get_vocab_size())
    with pytest.warns(UserWarning, match=r"prompt characters 'ß', 'é' are not in the tokenizer's vocabulary"):
        pieces = list(stream_text(model, tok, "hello ßé", 3))
    assert len("".join(pieces)) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert encode_prompt(tok, "hello") == tok.encode("hello").ids  # known characters: no warning
        assert encode_prompt(byte_tokenizer(), "héllo ß") == byte_tokenizer().encode("héllo ß").ids


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=-1), "max_new_tokens=-1"),
        (dict(max_new_tokens=2.5), "max_new_tokens=2.5"),
        (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
        (dict(do_sample=True, temperature=-1), "temperature must be > 0"),
        (dict(do_sample=True, top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(do_sample=True, top_k=0), "top_k must be an integer >= 1"),
        (dict(repetition_penalty=0.0), "penalty must be > 0"),
        (dict(eos_token_id=V), "outside the vocabulary"),
        (dict(eos_token_id="</s>"), "expected a token id"),
        (dict(seed="abc"), "seed must be an integer"),
        (dict(streamer=5), "expected a callable"),
        (dict(do_sample="false"), r"do_sample='false'.*pass do_sample=True or do_sample=False"),
        (dict(do_sample=1), "do_sample=1"),
        (dict(use_cache="no"), "use_cache='no'"),
        # found by the fuzz suite: an output buffer of 2**40 tokens was allocated; 10**6 threads crashed torch
        (dict(max_new_tokens=2**40), r"max_new_tokens=1099511627776\): expected an integer in \[0, 16777216\]"),
        (dict(threads=10**6), r"threads=1000000\): use 'auto', a thread count in \[1, \d+\]"),
    ],
)
def test_bad_arguments_are_model_errors(kwargs, message):
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ModelError, match=message):
        generate(lm(), prompts(1, 3), **kwargs)


def test_bad_prompts_and_models_are_refused():
    model = lm()
    with pytest.raises(ModelError, match=f"token id {V} is outside the vocabulary"):
        generate(model, torch.tensor([[1, V]]), 3)
    with pytest.raises(ModelError, match="token id -1"):
        generate(model, torch.tensor([[-1, 2]]), 3)
    with pytest.raises(ModelError, match="unsqueeze"):
        generate(model, torch.tensor([1, 2]), 3)
    with pytest.raises(ModelError, match="integer tensor"):
        generate(model, torch.tensor([[1.0, 2.0]]), 3)
    with pytest.raises(ModelError, match="torch.Tensor"):
        generate(model, [[1, 2]], 3)
    with pytest.raises(ModelError, match=r"no prompts \(shape \(0, 4\)\)"):
        generate(model, torch.zeros(0, 4, dtype=torch.long), 3)
    with pytest.raises(ModelError, match="no prompts"):
        list(stream_generate(model, torch.zeros(0, 4, dtype=torch.long), 3))
    encoder = compose(small_model_dict(attention={"type": "mha", "causal": False}))
    with pytest.raises(ModelError, match="causal"):
        generate(encoder, prompts(1, 3), 3)
    classifier = compose(small_model_dict(head={"type": "classification", "num_classes": 3}))
    with pytest.raises(ModelError, match="language-model head"):
        generate(classifier, prompts(1, 3), 3)


def test_sampling_options_without_do_sample_warn():
    with pytest.warns(UserWarning, match="top_k, temperature only apply when sampling"):
        out = generate(lm(), prompts(1, 3), 4, top_k=2, temperature=0.5)
    assert torch.equal(out, generate(lm(), prompts(1, 3), 4))


def test_stream_generate_takes_exactly_generates_keyword_arguments():
    names = list(inspect.signature(generate).parameters)
    assert set(DEFAULTS) == set(names) - {"model", "input_ids", "max_new_tokens", "streamer"}
    assert all(inspect.signature(generate).parameters[k].default == v for k, v in DEFAULTS.items())


def test_a_tiny_temperature_samples_the_greedy_tokens():
    """Found by the fuzz suite: temperature=1.4e-45 overflowed the scaled logits to inf (NaN probabilities)."""
    model, ids = lm(), prompts(2, 3)
    sampled = generate(model, ids, max_new_tokens=6, do_sample=True, temperature=1.401298464324817e-45, seed=0)
    assert torch.equal(sampled, generate(model, ids, max_new_tokens=6))
