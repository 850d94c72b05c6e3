"""Text generation: greedy and sampled decoding over a pre-allocated KV cache.

    ids = generate(model, prompt_ids, 32)                                     # greedy, [B, T + 32]
    ids = generate(model, prompt_ids, 32, do_sample=True, top_p=0.9, seed=0)  # nucleus sampling
    for tokens in stream_generate(model, prompt_ids, 32): ...                 # tokens [B], step by step
    for piece in stream_text(model, tokenizer, "Once upon", 32): ...          # str pieces, as they decode

One call allocates one cache per layer for prompt + max_new_tokens tokens (at most the context;
rolling for sliding-window layers), runs the prompt through the model once (prefill), then feeds one
token per step. Nothing is concatenated per token: prompt and new tokens live in one output
buffer, the padding mask in another.

Past the context window (``context_overflow="crop"``, the default): once prompt and new tokens
exceed ``max_position_embeddings`` (P), each further token is predicted from the last P tokens
alone, re-encoded from scratch with positions 0..P-1 and no cache -- nanoGPT's crop, for every
position encoding. It is the only continuation every encoding defines: a learned table has no
position P, and a rotary / ALiBi / position-free model run over a sliding KV cache would attend to
keys computed from contexts longer than any it was trained on (each cached key still carries what its
token saw before the window moved). For rotary, ALiBi and none the restart at position 0 changes
nothing (attention sees only distances), so this equals a fresh call on the cropped context token for
token. Each token past the window costs one forward pass over P tokens. ``context_overflow="error"``
refuses prompt + max_new_tokens > P instead. A prompt longer than P is kept whole in the output.

Batches: prompts of different lengths are LEFT-padded, with ``attention_mask`` [B, T]
(1 token, 0 padding); each row then decodes exactly as it would alone. Right-padded input
(each row's tokens contiguous, padding after them) is detected and converted to left padding
with a warning; the returned ids are in the converted (left-padded) layout. Any other mask
(holes inside a row, an empty row) is refused.

Stopping: with ``eos_token_id`` (one id or a list) a row is finished once it emits one; its
later positions hold ``pad_token_id`` (default: the first eos id), and decoding stops early
when every row is finished, so the result may be shorter than T + max_new_tokens.

Threads: on a CPU, ``threads="auto"`` (the default) runs a step with one intra-op thread when its work
(parameters x rows x tokens) is small, else with one per idle core, never more than torch is set to
(composer.generation_inputs ``decode_threads``): steps past the window (P tokens each) may get more
than the one-token steps. torch's count is restored after the call.

Shapes: B batch, T prompt length (padded), N new tokens, V vocabulary.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor

from .contract import is_int, member
from .errors import ModelError
from .generation_inputs import (
    check_context,
    check_flag,
    check_ids,
    check_model,
    decode_threads,
    left_pad,
    make_generator,
    thread_count,
    token_ids,
)
from .generation_text import TextDecoder, encode_prompt
from .sampling import (  # noqa: F401  (re-exported: generation's public names)
    SamplingSettings,
    apply_repetition_penalty,
    choose_tokens,
    top_k_filter,
    top_p_filter,
)

OutOfMemoryError = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
Streamer = Callable[[Tensor], Any]  # receives each step's new tokens [B]
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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
        self.limit = model.config.max_position_embeddings  # P: the context window
        self.window_threads: Optional[int] = None  # torch's threads past the window (the caller restores them)

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
        capacity = min(t + self.max_new, self.limit)  # past the window the cache is not used (crop)
        self.cache = None  # a prompt longer than the window: every step re-encodes the last P tokens
        if static and t <= self.limit:  # positions as tensors; the cache keeps the prompt's padding
            self.cache, self.step_fn = static_cache(model, b, capacity), compiled_step(self.compile_mode)
            self.graphs = "cudagraphs" in self.compile_mode or self.compile_mode == "reduce-overhead"
            if self.position is None:
                self.position = torch.full((1, 1), t, device=ids.device)
        elif self.use_cache and t <= self.limit:
            self.cache = model.allocate_cache(b, capacity)

    def _window_logits(self, n: int) -> Tensor:
        """Logits of the last (at most P) of the ``n`` tokens so far, encoded from scratch without a cache:
        positions restart at 0 for each row's first token in the window (nanoGPT's crop past the window)."""
        start = max(0, n - self.limit)
        if start and self.window_threads is not None:  # the first step past the window: P tokens a step
            torch.set_num_threads(self.window_threads)
            self.window_threads = None
        mask = None if self.full_mask is None else self.full_mask[:, start:n]
        return self.model(self.out[:, start:n], attention_mask=mask).logits

    def _logits(self, step: int, n: int, static: bool) -> Tensor:
        """The model's logits for step ``step`` with ``n`` tokens so far; advances the next positions."""
        model, mask, full_mask, cache = self.model, self.mask, self.full_mask, self.cache
        if cache is None or n > self.limit:  # no cache, or past the window: recompute (the last P tokens)
            return self._window_logits(n)
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
DEFAULTS: dict[str, Any] = dict(  # generate's keyword arguments and their defaults (stream_generate takes them too)
    do_sample=False,
    temperature=1.0,
    top_k=None,
    top_p=None,
    repetition_penalty=None,
    eos_token_id=None,
    attention_mask=None,
    use_cache=True,
    seed=None,
    context_overflow="crop",
    pad_token_id=None,
    compile=False,
    threads="auto",
)


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
    threads: Optional[int] = None  # intra-op threads for the call (None: torch's, untouched)
    window_threads: Optional[int] = None  # ... from the first step past the context window


MAX_NEW_TOKENS = 1 << 24  # the bound on max_position_embeddings: 16,777,216 tokens


def _prepare(model: Any, input_ids: Any, max_new_tokens: Any, **o: Any) -> _Request:
    """Every argument checked (ModelError naming it), the prompt moved to the model's device and left-padded."""
    check_model(model)
    if not is_int(max_new_tokens) or not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ModelError(
            f"generate(max_new_tokens={max_new_tokens!r}): expected an integer in [0, {MAX_NEW_TOKENS}] "
            "(the output is allocated up front)"
        )
    settings = SamplingSettings(
        check_flag("do_sample", o["do_sample"]), o["temperature"], o["top_k"], o["top_p"], o["repetition_penalty"]
    )
    settings.check()
    use_cache = check_flag("use_cache", o["use_cache"])
    device = model.embed.weight.device
    ids = check_ids(model, input_ids).to(device)
    vocab = model.config.vocab_size
    eos = token_ids("eos_token_id", o["eos_token_id"], vocab)
    pad = token_ids("pad_token_id", o["pad_token_id"], vocab)
    if pad is not None and len(pad) != 1:
        raise ModelError(f"generate(pad_token_id={o['pad_token_id']!r}): expected one token id")
    pad_id = pad[0] if pad is not None else eos[0] if eos is not None else None
    mask = None
    if o["attention_mask"] is not None:
        ids, mask = left_pad(ids, o["attention_mask"])
    check_context(ids.shape[1], max_new_tokens, model.config.max_position_embeddings, o["context_overflow"])
    mode = _compile_mode(o["compile"], use_cache, device)
    limit, rows = model.config.max_position_embeddings, ids.shape[0]
    threads = decode_threads(o["threads"], model, rows, device)
    past = ids.shape[1] + max_new_tokens > limit  # steps past the window run the last P tokens each
    window_threads = decode_threads(o["threads"], model, rows, device, tokens=limit) if past else None
    generator = make_generator(o["seed"], device)
    return _Request(
        ids, mask, max_new_tokens, settings, eos, pad_id, generator, use_cache, mode, threads, window_threads
    )


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
    decoder = _Decoder(
        model, ids, mask, r.max_new_tokens, r.settings, r.eos, r.pad_id, r.generator, r.use_cache, r.compile_mode
    )
    decoder.window_threads = r.window_threads
    return decoder


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
        with thread_count(r.threads):
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
    context_overflow: str = "crop",
    pad_token_id: Optional[int] = None,
    compile: Union[bool, str] = False,
    threads: Union[str, int, None] = "auto",
) -> Tensor:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns ids [B, T + N], N <= max_new_tokens.

    do_sample:          False: greedy (argmax); True: draw from the (filtered) distribution (a bool:
                        anything else, e.g. the string "false", is refused)
    temperature:        logits are divided by it before sampling (> 0; 1.0: unchanged)
    top_k:              sample only among the k most likely tokens (>= 1; None: all)
    top_p:              sample only from the smallest set of tokens whose probability reaches p ((0, 1])
    repetition_penalty: CTRL penalty (> 0; 1.0 / None: off) on every token already in the row,
                        prompt included (also tokens cropped out of the window); applies to greedy decoding
    eos_token_id:       id or ids ending a row; later positions get ``pad_token_id`` (default: the first
                        eos id); decoding stops when every row has ended
    attention_mask:     padding mask of the prompts (see the module docstring for padding rules)
    use_cache:          False recomputes the whole sequence every step (same tokens, slower; for checks)
    seed:               an int or a torch.Generator for sampling; the global RNG is used only when None
    streamer:           called with each step's new tokens [B] as they are chosen (finished rows: pad id)
    context_overflow:   "crop" (default): any length; once prompt + new tokens pass max_position_embeddings
                        (P), each token is predicted from the last P tokens re-encoded from position 0
                        (nanoGPT's crop; see the module docstring). "error": T + max_new_tokens > P raises
                        ModelError, suggesting a max_new_tokens this prompt fits
    compile:            True (or a torch.compile mode) decodes over a static KV cache with a compiled
                        one-token step: traced once per model and cache size (CUDA: CUDA graphs, mode
                        "reduce-overhead"); the same tokens as the eager loop. The prompt runs eagerly.
    threads:            CPU intra-op threads for the call: "auto" (one for a step of small work, else one
                        per idle core, never more than torch's setting; chosen for the one-token steps and
                        for the steps past the window), a count >= 1, or None (torch's setting, untouched:
                        use it when several Python threads generate at once); restored after

    Runs under ``torch.inference_mode`` in eval mode; the model's train/eval mode is restored after.
    If the batch runs out of accelerator memory it is split in halves and retried (with a warning;
    the streamer then sees the halves one after the other, and sampled tokens differ from an
    unsplit run). Bad arguments raise ModelError naming the argument and the fix.
    """
    if streamer is not None and not callable(streamer):
        raise ModelError(
            f"generate(streamer=...): expected a callable receiving token ids [B], got {type(streamer).__name__}"
        )
    options = dict(locals())  # the keyword arguments above, by name (DEFAULTS lists the same names)
    for name in ("model", "input_ids", "max_new_tokens", "streamer"):
        options.pop(name)
    r = _prepare(model, input_ids, max_new_tokens, **options)
    return _generate(model, r, streamer).clone()  # a normal tensor, usable outside inference mode


def stream_generate(model: Any, input_ids: Tensor, max_new_tokens: int = 32, **kwargs: Any) -> Iterator[Tensor]:
    """Like :func:`generate` (same arguments but ``streamer``), but returns an iterator over each
    step's new tokens [B] as they come. Arguments are checked at the call. The model is back in
    its previous train/eval mode (and torch's thread count restored) once the iterator is exhausted
    or closed; while it is open, code between steps runs with the decoding thread count. Out of
    accelerator memory raises ModelError here (use generate, which splits the batch)."""
    r = _prepare(model, input_ids, max_new_tokens, **_options("stream_generate", kwargs))
    return (tokens.clone() for tokens in _stream(model, r))  # cloned outside inference mode: normal tensors


def stream_text(
    model: Any, tokenizer: Any, prompt: Union[str, Sequence[int]], max_new_tokens: int = 32, **kwargs: Any
) -> Iterator[str]:
    """Continue one prompt and yield the new text in pieces as it decodes (:func:`generate`'s arguments
    but ``streamer`` and ``attention_mask``). ``prompt``: text (encoded with ``tokenizer``; characters the
    tokenizer does not know are named in a warning) or token ids. A piece is yielded only once it decodes
    cleanly: a character split over several tokens (byte-level tokenizers) comes whole, never as U+FFFD.
    The pieces joined are ``tokenizer.decode(prompt + new ids)`` less the decoded prompt.

        from composer.generation import stream_text
        for piece in stream_text(model, tokenizer, "ROMEO:", 200, do_sample=True, top_k=50, seed=0):
            print(piece, end="", flush=True)
    """
    if "attention_mask" in kwargs:
        raise ModelError("stream_text continues one prompt and takes no attention_mask; use stream_generate")
    ids = encode_prompt(tokenizer, prompt, stacklevel=3) if isinstance(prompt, str) else [int(i) for i in prompt]
    if not ids:
        raise ModelError(f"stream_text(prompt={prompt!r}): the prompt encodes to no tokens; pass a non-empty prompt")
    tokens = stream_generate(model, torch.tensor([ids]), max_new_tokens, **kwargs)  # moved to the model's device
    return _pieces(tokens, TextDecoder(tokenizer, ids))


def _pieces(tokens: Iterator[Tensor], decoder: TextDecoder) -> Iterator[str]:
    for step in tokens:  # [1]
        piece = decoder.push(int(step[0]))
        if piece:
            yield piece
    tail = decoder.finish()
    if tail:
        yield tail


def _options(caller: str, kwargs: dict) -> dict:
    """``kwargs`` over generate's defaults; an unknown name is a ModelError listing the known ones."""
    if "streamer" in kwargs:
        raise ModelError(f"{caller} yields the tokens itself; pass streamer= to generate instead")
    unknown = sorted(set(kwargs) - set(DEFAULTS))
    if unknown:
        hint = " (prompt_overflow is now context_overflow='crop' or 'error')" if "prompt_overflow" in unknown else ""
        raise ModelError(f"{caller} got unknown arguments {unknown}{hint}; known: {', '.join(DEFAULTS)}")
    return {**DEFAULTS, **kwargs}


@torch.inference_mode()
def _stream(model: Any, r: _Request) -> Iterator[Tensor]:
    was_training = model.training
    model.eval()
    try:
        with thread_count(r.threads):
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
    "stream_text",
    "top_k_filter",
    "top_p_filter",
]


class GenerationMixin:
    """``model.generate(...)`` for a model class that decodes with this module (``ComposedModel``)."""

    def generate(self, input_ids: Tensor, max_new_tokens: int = 32, **kwargs: Any) -> Tensor:
        """Decode new tokens after ``input_ids`` (see composer.generation.generate)."""
        return generate(self, input_ids, max_new_tokens, **kwargs)
