"""The inputs and settings of a ``generate`` call: argument checks, left padding, what happens past the
context window, the random generator and the CPU thread count. Every problem is a ModelError naming the
argument and the fix.

Shapes: B batch, T prompt length (padded).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .contract import is_int
from .errors import ModelError

OVERFLOW_MODES = ("crop", "error")
# parameters x batch rows per decode step below which one CPU thread decodes as fast as two on an idle
# machine (measured: benchmarks/bench_decode.py) -- and a second thread makes it several times slower on a
# busy one, where OpenMP threads wait on each other
SMALL_DECODE_WORK = 1 << 23


# ----------------------------------------------------------------------------- the model and the prompt
def check_model(model: Any) -> None:
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


def check_ids(model: Any, input_ids: Any) -> Tensor:
    """The prompt ids [B, T] as a long tensor: 2-D, at least one row and one token, ids in the vocabulary."""
    if not isinstance(input_ids, Tensor):
        raise ModelError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ModelError(
            f"input_ids must be 2-D [batch, seq_len] with seq_len >= 1, got shape "
            f"{tuple(input_ids.shape)}; add a batch dimension with input_ids.unsqueeze(0)"
        )
    if input_ids.shape[0] == 0:
        raise ModelError(
            f"input_ids has no prompts (shape {tuple(input_ids.shape)}); pass at least one row [1, seq_len]"
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


def check_flag(name: str, value: Any) -> bool:
    """``value`` if it is a bool; a string such as "false" is truthy, so anything else is refused."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ModelError(
        f"generate({name}={value!r}): expected True or False, got {type(value).__name__} "
        f"(a string such as 'false' would count as true); pass {name}=True or {name}=False"
    )


def token_ids(name: str, value: Any, vocab: int) -> Optional[list[int]]:
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


# ----------------------------------------------------------------------------- the context window
def check_context(prompt_length: int, max_new_tokens: int, limit: int, context_overflow: Any) -> None:
    """Refuse an unknown ``context_overflow``, and with "error" a prompt plus new tokens longer than the
    context ``limit``, suggesting values that are accepted for this prompt. "crop" accepts any length."""
    if context_overflow not in OVERFLOW_MODES:
        raise ModelError(
            f"generate(context_overflow={context_overflow!r}): use 'crop' (past the context window each token "
            "is predicted from the last max_position_embeddings tokens) or 'error'"
        )
    total = prompt_length + max_new_tokens
    if context_overflow == "crop" or total <= limit:
        return
    fixes = []
    if prompt_length < limit:
        fixes.append(f"max_new_tokens <= {limit - prompt_length} for this {prompt_length}-token prompt")
    if max_new_tokens < limit:
        fixes.append(f"a prompt of at most {limit - max_new_tokens} tokens")
    fixes.append(f"context_overflow='crop' (each token past the window sees the last {limit} tokens)")
    raise ModelError(
        f"prompt length {prompt_length} + max_new_tokens {max_new_tokens} = {total} exceeds "
        f"max_position_embeddings={limit} (context_overflow='error'); use " + ", or ".join(fixes)
    )


# ----------------------------------------------------------------------------- randomness and threads
def make_generator(seed: Union[int, torch.Generator, None], device: torch.device) -> Optional[torch.Generator]:
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    if not is_int(seed):
        raise ModelError(f"generate(seed={seed!r}): seed must be an integer or a torch.Generator")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def decode_threads(setting: Any, model: Any, rows: int, device: torch.device, tokens: int = 1) -> Optional[int]:
    """The intra-op thread count for steps that run ``tokens`` tokens of ``rows`` prompts through ``model``
    (None: leave torch's as is): one-token decode steps, or ``max_position_embeddings`` tokens past the window.

    ``"auto"`` (CPUs only; never more than torch is set to now): one thread when a step's work (parameters
    x rows x tokens) is under SMALL_DECODE_WORK, else one per idle core (see :func:`idle_cores`).
    An integer >= 1: that many. None: torch's setting, untouched.
    """
    if setting is None:
        return None
    if setting == "auto":
        if device.type != "cpu":
            return None
        work = rows * tokens * sum(p.numel() for p in model.parameters())
        if work < SMALL_DECODE_WORK:
            return 1
        return max(1, min(torch.get_num_threads(), idle_cores()))
    most = max(256, 4 * (os.cpu_count() or 1), torch.get_num_threads())  # bounded: 10**6 threads crash torch
    if is_int(setting) and 1 <= setting <= most:
        return int(setting)
    raise ModelError(
        f"generate(threads={setting!r}): use 'auto', a thread count in [1, {most}], or None to keep torch's "
        f"setting (now {torch.get_num_threads()})"
    )


def idle_cores() -> int:
    """The cores this process may run on less the threads of other processes running now (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - _others_running())


def _others_running() -> int:
    """Runnable threads of other processes at this moment: /proc/loadavg's count less this process's own
    running threads (Linux); elsewhere the 1-minute load average less this process."""
    try:
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        own = sum(_running(stat) for stat in Path("/proc/self/task").glob("*/stat"))
        return max(0, running - own)
    except (OSError, ValueError, IndexError):
        try:
            return max(0, round(os.getloadavg()[0]) - 1)
        except OSError:  # no load average on this platform
            return 0


def _running(stat: Path) -> bool:
    try:
        text = stat.read_text()
    except OSError:  # the thread ended meanwhile
        return False
    return text[text.rindex(")") + 2] == "R"  # the state follows the (command name)


@contextlib.contextmanager
def thread_count(threads: Optional[int]) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` inside the block (None: unchanged); whatever the block
    leaves (the decoder switches past the context window), torch's count before it is restored after."""
    before = torch.get_num_threads()
    if threads is not None and threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
