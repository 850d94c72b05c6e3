"""Text generation: greedy and sampled decoding over a pre-allocated KV cache.

    ids = generate(model, prompt_ids, 32)                                     # greedy, [B, T + 32]
    ids = generate(model, prompt_ids, 32, do_sample=True, top_p=0.9, seed=0)  # nucleus sampling
    for tokens in stream_generate(model, prompt_ids, 32): ...                 # tokens [B], step by step

One call allocates one cache per layer for prompt + max_new_tokens tokens (rolling for
sliding-window layers), runs the prompt through the model once (prefill), then feeds one
token per step. Nothing is concatenated per token: prompt and new tokens live in one output
buffer, the padding mask in another.

Batches: prompts of different lengths are LEFT-padded, with ``attention_mask`` [B, T]
(1 token, 0 padding); each row then decodes exactly as it would alone. Right-padded input
(each row's tokens contiguous, padding after them) is detected and converted to left padding
with a warning; the returned ids are in the converted (left-padded) layout. Any other mask
(holes inside a row, an empty row) is refused.

Stopping: with ``eos_token_id`` (one id or a list) a row is finished once it emits one; its
later positions hold ``pad_token_id`` (default: the first eos id), and decoding stops early
when every row is finished, so the result may be shorter than T + max_new_tokens.

Shapes: B batch, T prompt length (padded), N new tokens, V vocabulary.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor

from .contract import is_int, member
from .errors import ModelError
from .sampling import (  # noqa: F401  (re-exported: generation's public names)
    SamplingSettings,
    apply_repetition_penalty,
    choose_tokens,
    top_k_filter,
    top_p_filter,
)

log = logging.getLogger(__name__)

OutOfMemoryError = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
Streamer = Callable[[Tensor], Any]  # receives each step's new tokens [B]
OVERFLOW_MODES = ("error", "truncate_left")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# ----------------------------------------------------------------------------- inputs
def _check_model(model: Any) -> None:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "allocate_cache"):
        raise ModelError(f"generate needs a composer ComposedModel, got {type(model).__name__}")
    head = getattr(getattr(cfg, "head", None), "type", "lm")
    if head != "lm":
        raise ModelError(f"generate needs a language-model head (head.type=lm); this model's head is {head!r}")
    for i in range(cfg.num_layers):
        if not getattr(cfg.layer(i).attention, "causal", True):
            raise ModelError(
                f"generate needs causal attention; model.layers[{i}].attention has causal=false "
                "(an encoder); set attention.causal=true to decode with this model"
            )


def _check_ids(model: Any, input_ids: Any) -> Tensor:
    if not isinstance(input_ids, Tensor):
        raise ModelError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ModelError(
            f"input_ids must be 2-D [batch, seq_len] with seq_len >= 1, got shape "
            f"{tuple(input_ids.shape)}; add a batch dimension with input_ids.unsqueeze(0)"
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ModelError(f"input_ids must be an integer tensor, got {input_ids.dtype}; convert with input_ids.long()")
    vocab = model.config.vocab_size
    lo, hi = int(input_ids.min()), int(input_ids.max())  # one sync per call
    if lo < 0 or hi >= vocab:
        raise ModelError(
            f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab}); "
            "check the tokenizer matches the model's vocab_size"
        )
    return input_ids.long()


def _token_ids(name: str, value: Any, vocab: int) -> Optional[list[int]]:
    if value is None:
        return None
    ids = value.tolist() if isinstance(value, Tensor) else value
    ids = [ids] if is_int(ids) else list(ids) if isinstance(ids, Sequence) and not isinstance(ids, str) else None
    if not ids or not all(is_int(i) for i in ids):
        raise ModelError(f"generate({name}={value!r}): expected a token id or a list of token ids")
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ModelError(f"generate({name}={value!r}): id {bad[0]} is outside the vocabulary [0, {vocab})")
    return ids


def left_pad(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """Validate a padding mask [B, T] and return (ids, mask) LEFT-padded: each row's tokens
    end at the last column. Right-padded rows are moved (with a warning); a row with no token
    or with padding between tokens is refused. An all-ones mask comes back as None."""
    if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise ModelError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {got}")
    mask = attention_mask.to(input_ids.device)
    if not ((mask == 0) | (mask == 1)).all():
        raise ModelError("attention_mask must hold only 0 (padding) and 1 (token)")
    mask = mask.bool()
    b, t = mask.shape
    count = mask.sum(dim=1)  # [B] real tokens per row
    if bool((count == 0).any()):
        row = int((count == 0).nonzero()[0, 0])
        raise ModelError(f"attention_mask row {row} has no tokens; every prompt needs at least one token")
    if bool(count.eq(t).all()):
        return input_ids, None
    col = torch.arange(t, device=mask.device)
    last = torch.where(mask, col, -1).amax(dim=1)  # [B] last token column
    first = torch.where(mask, col, t).amin(dim=1)
    if bool((last - first + 1 != count).any()):
        row = int((last - first + 1 != count).nonzero()[0, 0])
        raise ModelError(
            f"attention_mask row {row} has padding between tokens; pad prompts on one side only "
            "(left padding, e.g. tokenizer padding_side='left')"
        )
    shift = (t - 1) - last  # [B] trailing padding columns
    if bool(shift.any()):
        warnings.warn(
            "generate: input is right-padded; converting to left padding (the returned ids are "
            "left-padded). Pad on the left to avoid this copy.",
            UserWarning,
            stacklevel=4,
        )
        index = (col[None, :] - shift[:, None]) % t  # [B, T] roll each row right by its padding
        input_ids, mask = input_ids.gather(1, index), mask.gather(1, index)
    return input_ids, mask


def _fit_context(
    ids: Tensor, mask: Optional[Tensor], max_new_tokens: int, limit: int, prompt_overflow: str
) -> tuple[Tensor, Optional[Tensor]]:
    t = ids.shape[1]
    if t + max_new_tokens <= limit:
        return ids, mask
    keep = limit - max_new_tokens
    fix = (
        f"shorten the prompt to at most {keep} tokens, lower max_new_tokens, or pass "
        f"prompt_overflow='truncate_left' to keep only the last {keep} prompt tokens"
    )
    if keep < 1:
        raise ModelError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the context of "
            f"max_position_embeddings={limit}; use max_new_tokens <= {limit - 1}"
        )
    if prompt_overflow == "error":
        raise ModelError(
            f"prompt length {t} + max_new_tokens {max_new_tokens} = {t + max_new_tokens} exceeds "
            f"max_position_embeddings={limit}; {fix}"
        )
    log.warning(
        "generate: prompt of %d tokens + max_new_tokens %d exceeds max_position_embeddings=%d; "
        "keeping the last %d prompt tokens (prompt_overflow='truncate_left')",
        t,
        max_new_tokens,
        limit,
        keep,
    )
    ids = ids[:, -keep:]
    if mask is not None:
        mask = mask[:, -keep:]
        if bool(mask.all()):
            mask = None
    return ids, mask


def _generator(seed: Union[int, torch.Generator, None], device: torch.device) -> Optional[torch.Generator]:
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    if not is_int(seed):
        raise ModelError(f"generate(seed={seed!r}): seed must be an integer or a torch.Generator")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


# ----------------------------------------------------------------------------- the decode loop
def _decode_step(model: Any, tokens: Tensor, position_ids: Tensor, cache: Any) -> Tensor:
    """One new token per row against a static cache: tokens, positions [B|1, 1] -> logits [B, 1, V]."""
    return model(tokens, position_ids=position_ids, past_key_values=cache, use_cache=True).logits


_COMPILED: dict[str, Callable] = {}  # compile mode -> the compiled decode step (traced once per model)
_STATIC_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (shape key, Cache)
CACHE_BUCKET = 256  # static caches are sized in multiples of this (one compiled step per size)


def compiled_step(mode: str) -> Callable:
    """The decode step under ``torch.compile(mode=mode, fullgraph=True, dynamic=False)``."""
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(
            _decode_step, mode=None if mode == "default" else mode, fullgraph=True, dynamic=False
        )
    return _COMPILED[mode]


def static_cache(model: Any, batch_size: int, capacity: int) -> Any:
    """A static cache for ``model`` holding ``capacity`` tokens (rounded up to CACHE_BUCKET, at most the
    model's context), reused (and reset) across calls with the same shape so compiled code and CUDA
    graphs see the same buffers."""
    limit = model.config.max_position_embeddings
    capacity = min(limit, -(-capacity // CACHE_BUCKET) * CACHE_BUCKET)
    ref = model.embed.weight
    key = (batch_size, capacity, ref.dtype, ref.device)
    held = _STATIC_CACHES.get(model)
    if held is not None and held[0] == key:
        held[1].reset()
        return held[1]
    _STATIC_CACHES.pop(model, None)  # free the old buffers before allocating new ones
    cache = model.allocate_cache(batch_size, capacity, static=True)
    _STATIC_CACHES[model] = (key, cache)
    return cache


class _Decoder:
    """One batch's decode loop. ``steps()`` yields each step's tokens [B]; ``result()`` is the
    output buffer up to the last step, [B, T + steps]."""

    def __init__(
        self,
        model: Any,
        ids: Tensor,
        mask: Optional[Tensor],
        max_new_tokens: int,
        settings: SamplingSettings,
        eos: Optional[list[int]],
        pad_id: Optional[int],
        generator: Optional[torch.Generator],
        use_cache: bool,
        compile_mode: Optional[str] = None,
    ):
        self.model, self.settings, self.generator, self.use_cache = model, settings, generator, use_cache
        self.compile_mode = compile_mode
        self.prompt, self.mask, self.max_new = ids, mask, max_new_tokens
        b, t = ids.shape
        self.out = ids.new_empty(b, t + max_new_tokens)  # [B, T + N] prompt then new tokens
        self.out[:, :t] = ids
        self.length = t
        self.eos = None if eos is None else torch.tensor(eos, device=ids.device)
        self.pad_id = pad_id

    def result(self) -> Tensor:
        return self.out[:, : self.length]

    def steps(self) -> Iterator[Tensor]:
        static = self.compile_mode is not None
        layout = member(self.model.head, "head", "decode_layout")  # the LM head's CPU decoding layout
        with layout() if not static else contextlib.nullcontext():
            yield from self._steps(static)

    def _steps(self, static: bool) -> Iterator[Tensor]:
        self._start(static)
        vocab, seen, finished = self.model.config.vocab_size, self.seen, self.finished
        for step in range(self.max_new):
            n = self.length
            logits = self._logits(step, n, static)
            if logits.dim() != 3:
                raise ModelError(
                    f"generate needs next-token logits [B, T, V], the model returned shape {tuple(logits.shape)}"
                )
            tokens = choose_tokens(logits[:, -1, :vocab], self.settings, seen, self.generator)  # [B]
            if finished is not None:
                tokens = tokens.masked_fill(finished, self.pad_id)
                finished |= torch.isin(tokens, self.eos)
            if seen is not None:
                seen.scatter_(1, tokens[:, None], True)
            self.out[:, n] = tokens
            self.length = n + 1
            yield tokens
            if finished is not None and bool(finished.all()):  # the only per-step host sync
                return

    def _start(self, static: bool) -> None:
        """The loop's state: full mask, next positions, tokens seen, rows finished, the cache (and compiled step)."""
        model, s, ids, mask = self.model, self.settings, self.prompt, self.mask
        b, t = ids.shape
        self.full_mask = self.position = None  # [B, T + N] bool (new tokens are always real); [B, 1] next position
        if mask is not None:
            self.full_mask = torch.ones(b, t + self.max_new, dtype=torch.bool, device=ids.device)
            self.full_mask[:, :t] = mask
            self.position = mask.sum(dim=1, keepdim=True)  # [B, 1] position of the first new token
        self.seen = None  # [B, V] tokens already in each row, for the repetition penalty
        if s.repetition_penalty is not None and s.repetition_penalty != 1.0:
            real = torch.ones_like(ids, dtype=torch.float) if mask is None else mask.float()
            self.seen = torch.zeros(b, model.config.vocab_size, device=ids.device).scatter_add_(1, ids, real) > 0
        self.finished = torch.zeros(b, dtype=torch.bool, device=ids.device) if self.eos is not None else None
        if static:  # positions as tensors; the cache keeps the prompt's padding
            self.cache, self.step_fn = static_cache(model, b, t + self.max_new), compiled_step(self.compile_mode)
            self.graphs = "cudagraphs" in self.compile_mode or self.compile_mode == "reduce-overhead"
            if self.position is None:
                self.position = torch.full((1, 1), t, device=ids.device)
        else:
            self.cache = model.allocate_cache(b, t + self.max_new) if self.use_cache else None

    def _logits(self, step: int, n: int, static: bool) -> Tensor:
        """The model's logits for step ``step`` with ``n`` tokens so far; advances the next positions."""
        model, mask, full_mask, cache = self.model, self.mask, self.full_mask, self.cache
        if cache is None:  # recompute the whole sequence
            return model(self.out[:, :n], attention_mask=None if mask is None else full_mask[:, :n]).logits
        if step == 0:  # prefill (eager: prompt lengths vary)
            prompt_pos = None if not static or mask is None else (mask.long().cumsum(-1) - 1).clamp(min=0)
            return model(
                self.prompt, attention_mask=mask, past_key_values=cache, use_cache=True, position_ids=prompt_pos
            ).logits
        if static:  # the compiled step: same shapes, same buffers every time
            if self.graphs:
                torch.compiler.cudagraph_mark_step_begin()
            logits = self.step_fn(model, self.out[:, n - 1 : n], self.position, cache)
        else:  # one new token against the cache
            logits = model(
                self.out[:, n - 1 : n],
                attention_mask=None if mask is None else full_mask[:, :n],
                past_key_values=cache,
                use_cache=True,
                position_ids=None if mask is None else self.position,
            ).logits
        if self.position is not None:  # static, or eager with a mask: explicit positions, one further
            self.position = self.position + 1
        return logits


# ----------------------------------------------------------------------------- public API
@dataclass
class _Request:
    ids: Tensor
    mask: Optional[Tensor]
    max_new_tokens: int
    settings: SamplingSettings
    eos: Optional[list[int]]
    pad_id: Optional[int]
    generator: Optional[torch.Generator]
    use_cache: bool
    compile_mode: Optional[str] = None


def _prepare(
    model: Any,
    input_ids: Any,
    max_new_tokens: Any,
    do_sample: bool,
    temperature: float,
    top_k: Optional[int],
    top_p: Optional[float],
    repetition_penalty: Optional[float],
    eos_token_id: Any,
    pad_token_id: Optional[int],
    attention_mask: Optional[Tensor],
    use_cache: bool,
    seed: Any,
    prompt_overflow: str,
    compile: Union[bool, str] = False,
) -> _Request:
    _check_model(model)
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ModelError(f"generate(max_new_tokens={max_new_tokens!r}): expected an integer >= 0")
    if prompt_overflow not in OVERFLOW_MODES:
        raise ModelError(f"generate(prompt_overflow={prompt_overflow!r}): use one of {', '.join(OVERFLOW_MODES)}")
    settings = SamplingSettings(bool(do_sample), temperature, top_k, top_p, repetition_penalty)
    settings.check()
    device = model.embed.weight.device
    ids = _check_ids(model, input_ids).to(device)
    vocab = model.config.vocab_size
    eos = _token_ids("eos_token_id", eos_token_id, vocab)
    pad = _token_ids("pad_token_id", pad_token_id, vocab)
    if pad is not None and len(pad) != 1:
        raise ModelError(f"generate(pad_token_id={pad_token_id!r}): expected one token id")
    pad_id = pad[0] if pad is not None else eos[0] if eos is not None else None
    mask = None
    if attention_mask is not None:
        ids, mask = left_pad(ids, attention_mask)
    ids, mask = _fit_context(ids, mask, max_new_tokens, model.config.max_position_embeddings, prompt_overflow)
    mode = _compile_mode(compile, bool(use_cache), device)
    return _Request(ids, mask, max_new_tokens, settings, eos, pad_id, _generator(seed, device), bool(use_cache), mode)


def _compile_mode(compile: Any, use_cache: bool, device: torch.device) -> Optional[str]:
    """generate(compile=...) -> a torch.compile mode, or None for the eager loop."""
    if compile is False or compile is None:
        return None
    if compile is not True and compile not in COMPILE_MODES:
        raise ModelError(
            f"generate(compile={compile!r}): use True, False or a torch.compile mode: {', '.join(COMPILE_MODES)}"
        )
    if not use_cache:
        raise ModelError("generate(compile=...) decodes over a static KV cache; it needs use_cache=True")
    if compile is True:
        return "reduce-overhead" if device.type == "cuda" else "default"
    return compile


def _decoder(model: Any, r: _Request, rows: Optional[slice] = None) -> _Decoder:
    ids, mask = (r.ids, r.mask) if rows is None else (r.ids[rows], None if r.mask is None else r.mask[rows])
    return _Decoder(
        model, ids, mask, r.max_new_tokens, r.settings, r.eos, r.pad_id, r.generator, r.use_cache, r.compile_mode
    )


def _decode_rows(model: Any, r: _Request, rows: slice, streamer: Optional[Streamer], streamed: list[bool]) -> Tensor:
    decoder = _decoder(model, r, rows)
    for tokens in decoder.steps():
        if streamer is not None:
            streamed[0] = True
            streamer(tokens)
    return decoder.result()


def _run_split(model: Any, r: _Request, rows: slice, streamer: Optional[Streamer], streamed: list[bool]) -> Tensor:
    """Decode ``rows`` of the batch; on out-of-memory split them in halves and retry."""
    with contextlib.suppress(OutOfMemoryError):  # handled below, once the failed attempt's memory is released
        return _decode_rows(model, r, rows, streamer, streamed)
    n = rows.stop - rows.start
    if streamed[0]:
        raise ModelError(
            "out of accelerator memory after tokens were streamed; generate fewer prompts at once "
            "or lower max_new_tokens"
        )
    if n == 1:
        raise ModelError(
            f"out of accelerator memory generating one prompt of {r.ids.shape[1]} tokens + "
            f"{r.max_new_tokens} new; lower max_new_tokens, shorten the prompt, or use a smaller dtype"
        )
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = rows.start + n // 2
    warnings.warn(
        f"generate: a batch of {n} prompts does not fit in accelerator memory; splitting it into "
        f"{n // 2} + {n - n // 2} and retrying",
        RuntimeWarning,
        stacklevel=3,
    )
    parts = [
        _run_split(model, r, slice(rows.start, half), streamer, streamed),
        _run_split(model, r, slice(half, rows.stop), streamer, streamed),
    ]
    width = max(p.shape[1] for p in parts)
    # a part that stopped early has every row finished: fill with the pad id
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=r.pad_id or 0) for p in parts])


@torch.inference_mode()
def _generate(model: Any, r: _Request, streamer: Optional[Streamer]) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        if r.max_new_tokens == 0:
            return r.ids.clone()
        return _run_split(model, r, slice(0, r.ids.shape[0]), streamer, [False])
    finally:
        model.train(was_training)


def generate(
    model: Any,
    input_ids: Tensor,  # [B, T] prompt token ids (left-padded when attention_mask has zeros)
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    repetition_penalty: Optional[float] = None,
    eos_token_id: Union[int, Sequence[int], None] = None,
    attention_mask: Optional[Tensor] = None,  # [B, T] 1 = token, 0 = padding
    use_cache: bool = True,
    seed: Union[int, torch.Generator, None] = None,
    streamer: Optional[Streamer] = None,
    prompt_overflow: str = "error",
    pad_token_id: Optional[int] = None,
    compile: Union[bool, str] = False,
) -> Tensor:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns ids [B, T + N], N <= max_new_tokens.

    do_sample:          False: greedy (argmax); True: draw from the (filtered) distribution
    temperature:        logits are divided by it before sampling (> 0; 1.0: unchanged)
    top_k:              sample only among the k most likely tokens (>= 1; None: all)
    top_p:              sample only from the smallest set of tokens whose probability reaches p ((0, 1])
    repetition_penalty: CTRL penalty (> 0; 1.0 / None: off) on every token already in the row,
                        prompt included; applies to greedy decoding too
    eos_token_id:       id or ids ending a row; later positions get ``pad_token_id`` (default: the first
                        eos id); decoding stops when every row has ended
    attention_mask:     padding mask of the prompts (see the module docstring for padding rules)
    use_cache:          False recomputes the whole sequence every step (same tokens, slower; for checks)
    seed:               an int or a torch.Generator for sampling; the global RNG is used only when None
    streamer:           called with each step's new tokens [B] as they are chosen (finished rows: pad id)
    prompt_overflow:    "error": T + max_new_tokens > max_position_embeddings raises ModelError;
                        "truncate_left": keep only the last prompt tokens that fit (logged)
    compile:            True (or a torch.compile mode) decodes over a static KV cache with a compiled
                        one-token step: traced once per model and cache size (CUDA: CUDA graphs, mode
                        "reduce-overhead"); the same tokens as the eager loop. The prompt runs eagerly.

    Runs under ``torch.inference_mode`` in eval mode; the model's train/eval mode is restored after.
    If the batch runs out of accelerator memory it is split in halves and retried (with a warning;
    the streamer then sees the halves one after the other, and sampled tokens differ from an
    unsplit run). Bad arguments raise ModelError naming the argument and the fix.
    """
    if streamer is not None and not callable(streamer):
        raise ModelError(
            f"generate(streamer=...): expected a callable receiving token ids [B], got {type(streamer).__name__}"
        )
    r = _prepare(
        model,
        input_ids,
        max_new_tokens,
        do_sample,
        temperature,
        top_k,
        top_p,
        repetition_penalty,
        eos_token_id,
        pad_token_id,
        attention_mask,
        use_cache,
        seed,
        prompt_overflow,
        compile,
    )
    return _generate(model, r, streamer).clone()  # a normal tensor, usable outside inference mode


def stream_generate(model: Any, input_ids: Tensor, max_new_tokens: int = 32, **kwargs: Any) -> Iterator[Tensor]:
    """Like :func:`generate` (same arguments but ``streamer``), but returns an iterator over each
    step's new tokens [B] as they come. Arguments are checked at the call. The model is back in
    its previous train/eval mode once the iterator is exhausted or closed. Out of accelerator
    memory raises ModelError here (use generate, which splits the batch)."""
    if "streamer" in kwargs:
        raise ModelError("stream_generate yields the tokens itself; pass streamer= to generate instead")
    r = _prepare(model, input_ids, max_new_tokens, **_defaults(kwargs))
    return (tokens.clone() for tokens in _stream(model, r))  # cloned outside inference mode: normal tensors


def _defaults(kwargs: dict) -> dict:
    known = dict(
        do_sample=False,
        temperature=1.0,
        top_k=None,
        top_p=None,
        repetition_penalty=None,
        eos_token_id=None,
        pad_token_id=None,
        attention_mask=None,
        use_cache=True,
        seed=None,
        prompt_overflow="error",
        compile=False,
    )
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ModelError(f"stream_generate got unknown arguments {unknown}; known: {', '.join(known)}")
    return {**known, **kwargs}


@torch.inference_mode()
def _stream(model: Any, r: _Request) -> Iterator[Tensor]:
    was_training = model.training
    model.eval()
    try:
        try:
            yield from _decoder(model, r).steps()
        except OutOfMemoryError:
            raise ModelError(
                f"out of accelerator memory streaming {r.ids.shape[0]} prompts; stream fewer at "
                "once, lower max_new_tokens, or use generate(), which splits the batch"
            ) from None
    finally:
        model.train(was_training)


__all__ = [
    "SamplingSettings",
    "apply_repetition_penalty",
    "choose_tokens",
    "generate",
    "left_pad",
    "stream_generate",
    "top_k_filter",
    "top_p_filter",
]


class GenerationMixin:
    """``model.generate(...)`` for a model class that decodes with this module (``ComposedModel``)."""

    def generate(self, input_ids: Tensor, max_new_tokens: int = 32, **kwargs: Any) -> Tensor:
        """Decode new tokens after ``input_ids`` (see composer.generation.generate)."""
        return generate(self, input_ids, max_new_tokens, **kwargs)
