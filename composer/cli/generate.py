"""composer-generate: continue a prompt with a saved model, streaming the text as it is decoded.

    composer-generate ckpt=runs/tiny/model prompt="Once upon a time" max_new_tokens=64
    composer-generate ckpt=runs/tiny/model prompt="Once" temperature=0.8 top_p=0.95 seed=0
    composer-generate ckpt=runs/tiny/model prompt_ids=1,2,3 max_new_tokens=8     # no tokenizer: ids

Options (key=value):
  ckpt=DIR                 a folder written by save_pretrained (model + tokenizer.json beside it); required
  prompt=TEXT              encoded with the folder's tokenizer.json
  prompt_ids=1,2,3         token ids instead of text (needed when the folder has no tokenizer)
  max_new_tokens=64        tokens to add
  do_sample=false          sample instead of greedy decoding; temperature / top_k / top_p set it to true
                           unless do_sample is given
  temperature=1.0  top_k=null  top_p=null  repetition_penalty=null  seed=null
  eos_token_id=null        id(s) (3 or 3,7) or token text ("</s>") that end the generation
  context_overflow=crop    crop: past the context window each token is predicted from the last
                           max_position_embeddings tokens (nanoGPT) | error: refuse prompt + max_new_tokens
                           longer than the context
  threads=auto             CPU threads: auto (one for a small step's work, else one per idle core) | a number
  device=auto              auto (cuda if available) | cpu | cuda | cuda:1 ...
  dtype=null               load weights as float32 | bfloat16 | float16 (null: as saved)
  echo=true                print the prompt before the continuation
  trust_plugin=PKG[,PKG]   let the checkpoint's config name components of these packages by import path

Prints the prompt and the continuation (ids separated by spaces without a tokenizer). Errors
print a message and exit 2 (full traceback with HYDRA_FULL_ERROR=1).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TextIO

import torch

from ..checkpoint import load_tokenizer
from ..contract.options import did_you_mean
from ..errors import ConfigError, Problem
from ..generation_text import TextDecoder, unknown_characters, unknown_message
from ..model import ComposedModel, target_device
from . import parse_value, run

USAGE = __doc__
HEADER = "invalid composer-generate arguments"
OPTIONS = (
    "ckpt",
    "prompt",
    "prompt_ids",
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "seed",
    "eos_token_id",
    "context_overflow",
    "threads",
    "device",
    "dtype",
    "echo",
    "trust_plugin",
)
SAMPLING = ("temperature", "top_k", "top_p")
DTYPES = ("float32", "bfloat16", "float16")
NULL = ("null", "none", "~", "")
RENAMED = {"prompt_overflow": "context_overflow=crop (the default) or context_overflow=error"}


# ----------------------------------------------------------------------------- arguments
def parse_args(argv: list[str]) -> dict[str, str]:
    """``key=value`` arguments -> {key: value}; unknown keys and bare words are ConfigErrors."""
    opts, problems = {}, []
    for arg in argv:
        key, eq, value = arg.partition("=")
        key = key.lstrip("+")
        if not eq:
            problems.append(Problem(arg, "expected key=value", f"e.g. prompt={arg!r} or ckpt={arg}"))
        elif key in RENAMED:
            problems.append(Problem(key, "was replaced", f"use {RENAMED[key]}"))
        elif key not in OPTIONS:
            problems.append(
                Problem(key, "unknown option", f"{did_you_mean(key, OPTIONS)}options: {', '.join(OPTIONS)}")
            )
        else:
            opts[key] = value
    if problems:
        raise ConfigError(problems, header=HEADER)
    return opts


def _typed(opts: dict[str, str], key: str, kind: Callable[[str], Any], default: Any, what: str) -> Any:
    text = opts.get(key)
    if text is None or text.strip().lower() in NULL:
        return default
    return parse_value(key, text, kind, what, header=HEADER)


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ValueError(text)


def _ids(text: str) -> list[int]:
    return [int(x) for x in text.replace(" ", "").split(",") if x]


def _threads(text: str) -> Any:
    if text.lower() == "auto":
        return "auto"
    count = int(text)
    if count < 1:
        raise ValueError(text)
    return count


# ----------------------------------------------------------------------------- loading
def load(ckpt: Optional[str], device: str, dtype: Optional[str], trust: str = "") -> tuple[Any, Any]:
    """The model and the tokenizer (or None) saved in ``ckpt``."""
    if not ckpt:
        raise ConfigError(
            [Problem("ckpt", "is required", "pass ckpt=<folder written by save_pretrained>")],
            header=HEADER,
        )
    path = Path(ckpt).expanduser()
    if not path.exists():
        raise ConfigError(
            [
                Problem(
                    "ckpt",
                    f"{path} does not exist",
                    "pass the folder written by model.save_pretrained (or composer-train)",
                )
            ],
            header=HEADER,
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch_device = target_device(device)
    except ConfigError as exc:
        raise ConfigError(exc.problems, header=HEADER) from None
    trusted = [t.strip() for t in trust.split(",") if t.strip()]
    model = ComposedModel.from_pretrained(path, device=torch_device, dtype=dtype, trust_plugins=trusted)
    return model, load_tokenizer(path)


def _eos(text: Optional[str], tokenizer: Any) -> Optional[list[int]]:
    if text is None or text.strip().lower() in NULL:
        return None
    try:
        return _ids(text)
    except ValueError:
        pass
    token_id = tokenizer.token_to_id(text) if tokenizer is not None else None
    if token_id is None:
        where = "the tokenizer's vocabulary" if tokenizer is not None else "a model without a tokenizer"
        raise ConfigError(
            [
                Problem(
                    "eos_token_id",
                    f"{text!r} is not a token id and not a token of {where}",
                    "pass ids (eos_token_id=2 or 2,7) or a token text of the vocabulary",
                )
            ],
            header=HEADER,
        )
    return [token_id]


# ----------------------------------------------------------------------------- printing
class TextPrinter:
    """Streams decoded text (composer.generation_text.TextDecoder): a piece is printed once it decodes
    cleanly, so an incomplete UTF-8 character (decoded as U+FFFD) waits for its last byte. The prompt
    is echoed with the first token, so argument errors print nothing on stdout."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], out: TextIO, echo: bool):
        self.decoder, self.out = TextDecoder(tokenizer, prompt_ids), out
        self.prompt: Optional[str] = tokenizer.decode(list(prompt_ids)) if echo else None

    def __call__(self, tokens: Any) -> None:  # tokens [1]
        self._write(self.decoder.push(int(tokens[0])))

    def _write(self, text: str) -> None:
        if self.prompt is not None:
            self.out.write(self.prompt)
            self.prompt = None
        if text:
            self.out.write(text)
        self.out.flush()

    def close(self) -> None:
        self._write(self.decoder.finish())
        self.out.write("\n")
        self.out.flush()


class IdPrinter:
    """Streams token ids separated by spaces (for models saved without a tokenizer)."""

    def __init__(self, prompt_ids: list[int], out: TextIO, echo: bool):
        self.pending = [str(i) for i in prompt_ids] if echo else []  # echoed with the first token
        self.out, self.first = out, True

    def __call__(self, tokens: Any) -> None:  # tokens [1]
        self._write([str(int(tokens[0]))])

    def _write(self, words: list[str]) -> None:
        words, self.pending = self.pending + words, []
        if words:
            self.out.write(("" if self.first else " ") + " ".join(words))
            self.first = False
        self.out.flush()

    def close(self) -> None:
        self._write([])
        self.out.write("\n")
        self.out.flush()


# ----------------------------------------------------------------------------- main
def _problem(key: str, what: str, fix: str) -> ConfigError:
    return ConfigError([Problem(key, what, fix)], header=HEADER)


def _check_prompt_options(opts: dict[str, str]) -> None:
    if "prompt" in opts and "prompt_ids" in opts:
        raise _problem("prompt_ids", "given together with prompt", "pass either prompt or prompt_ids")
    if "prompt" not in opts and "prompt_ids" not in opts:
        raise _problem("prompt", "is required", 'pass prompt="some text" (or prompt_ids=1,2,3)')
    if "prompt_ids" in opts and not _typed(opts, "prompt_ids", _ids, None, "comma-separated integers"):
        raise _problem("prompt_ids", "is empty", "pass comma-separated token ids (prompt_ids=1,2,3) or prompt=TEXT")


def _settings(opts: dict[str, str]) -> dict[str, Any]:
    """generate's keyword arguments from the options."""
    settings = dict(
        max_new_tokens=_typed(opts, "max_new_tokens", int, 64, "an integer"),
        temperature=_typed(opts, "temperature", float, 1.0, "a number"),
        top_k=_typed(opts, "top_k", int, None, "an integer"),
        top_p=_typed(opts, "top_p", float, None, "a number"),
        repetition_penalty=_typed(opts, "repetition_penalty", float, None, "a number"),
        seed=_typed(opts, "seed", int, None, "an integer"),
        context_overflow=_typed(opts, "context_overflow", str, "crop", "crop or error"),
        threads=_typed(opts, "threads", _threads, "auto", "auto or a whole number >= 1"),
    )
    sampling_given = any(_typed(opts, k, str, None, "") is not None for k in SAMPLING)
    settings["do_sample"] = _typed(opts, "do_sample", _bool, sampling_given, "true or false")
    return settings


def _prompt_ids(opts: dict[str, str], tokenizer: Any) -> list[int]:
    """The prompt's ids: prompt_ids as given, or the prompt encoded (warning about unknown characters)."""
    given = _typed(opts, "prompt_ids", _ids, None, "comma-separated integers")
    if given is not None:
        return given
    if tokenizer is None:
        raise _problem(
            "prompt",
            f"the model folder {opts['ckpt']} has no tokenizer.json to encode text",
            "pass token ids (prompt_ids=1,2,3), or save the tokenizer with model.save_pretrained(dir, tokenizer=tok)",
        )
    prompt = opts["prompt"]
    encoding = tokenizer.encode(prompt)
    unknown = unknown_characters(tokenizer, prompt, encoding)
    if unknown:
        print(f"warning: {unknown_message(tokenizer, unknown)}", file=sys.stderr)
    if not encoding.ids:
        raise _problem("prompt", "encodes to no tokens", "pass a non-empty prompt")
    return list(encoding.ids)


def main_(argv: list[str], out: Optional[TextIO] = None) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    out = out or sys.stdout
    opts = parse_args(argv)
    _check_prompt_options(opts)
    dtype = _typed(opts, "dtype", str, None, "a dtype")
    if dtype is not None and dtype not in DTYPES:
        raise _problem("dtype", f"{dtype!r} is not supported", f"use one of {', '.join(DTYPES)}")
    settings = _settings(opts)
    echo = _typed(opts, "echo", _bool, True, "true or false")
    model, tokenizer = load(opts.get("ckpt"), opts.get("device", "auto"), dtype, opts.get("trust_plugin", ""))
    prompt_ids = _prompt_ids(opts, tokenizer)
    eos = _eos(opts.get("eos_token_id"), tokenizer)
    printer = (
        TextPrinter(tokenizer, prompt_ids, out, echo) if tokenizer is not None else IdPrinter(prompt_ids, out, echo)
    )
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    model.generate(ids, eos_token_id=eos, streamer=printer, **settings)
    printer.close()
    return 0


def main() -> None:
    sys.exit(run(main_))


if __name__ == "__main__":
    main()
