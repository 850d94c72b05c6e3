"""Text in and out of generation: encoding a prompt (warning about characters the tokenizer does not
know) and decoding new tokens as they come, emitting text only once it decodes cleanly.

Works with a ``tokenizers.Tokenizer`` (what ``save_pretrained`` stores beside a model) and with anything
that has ``encode(text)`` (an object with ``.ids`` or a list of ids) and ``decode(ids)``.
"""

from __future__ import annotations

import warnings
from typing import Any

from .errors import ModelError

REPLACEMENT = "\ufffd"  # what a decoder writes for an incomplete (or invalid) UTF-8 sequence
CONTEXT_TOKENS = 5  # tokens decoded before the new ones (a decoder may write a token differently at the start)


def encode_prompt(tokenizer: Any, text: str, warn: bool = True, stacklevel: int = 2) -> list[int]:
    """``text``'s token ids; with ``warn``, a UserWarning naming the characters the tokenizer turned
    into its unknown token (a character-level vocabulary knows only the characters of its training text)."""
    if not isinstance(text, str):
        raise ModelError(f"prompt must be a str (or token ids), got {type(text).__name__}")
    encoding = tokenizer.encode(text)
    ids = [int(i) for i in getattr(encoding, "ids", encoding)]
    unknown = unknown_characters(tokenizer, text, encoding)
    if warn and unknown:
        warnings.warn(unknown_message(tokenizer, unknown), UserWarning, stacklevel=stacklevel)
    return ids


def unknown_characters(tokenizer: Any, text: str, encoding: Any) -> list[str]:
    """The pieces of ``text`` (in order, each once) that ``encoding`` holds as the unknown token."""
    unk = _unknown_id(tokenizer)
    ids = list(getattr(encoding, "ids", encoding))
    if unk is None or unk not in ids:
        return []
    offsets = getattr(encoding, "offsets", None)
    if offsets is None:  # no offsets to point at the characters: say that some are unknown
        return ["?"]
    pieces = [text[start:end] for i, (start, end) in zip(ids, offsets, strict=True) if i == unk]
    return list(dict.fromkeys(pieces))


def unknown_message(tokenizer: Any, unknown: list[str]) -> str:
    unk = _unknown_id(tokenizer)
    shown = ", ".join(repr(c) for c in unknown[:20]) + (", ..." if len(unknown) > 20 else "")
    return (
        f"prompt characters {shown} are not in the tokenizer's vocabulary and were encoded as the unknown "
        f"token (id {unk}); the model never saw them: leave them out or use a tokenizer that has them "
        "(data.tokenizer=byte covers every character)"
    )


def _unknown_id(tokenizer: Any) -> Any:
    unk_id = getattr(tokenizer, "unk_token_id", None)  # transformers' tokenizers
    if unk_id is not None:
        return unk_id
    token = getattr(getattr(tokenizer, "model", None), "unk_token", None)  # tokenizers' WordLevel, BPE, ...
    if not token or not hasattr(tokenizer, "token_to_id"):
        return None
    return tokenizer.token_to_id(token)


class TextDecoder:
    """Incremental detokenization: ``push(id)`` returns the text that id completes ("" while it ends in an
    incomplete character, e.g. the first byte of a two-byte UTF-8 character under a byte-level tokenizer);
    ``finish()`` returns what is left. The pieces joined equal ``decode(prompt + new)`` less
    ``decode(prompt)`` whenever the latter is a prefix of the former (byte-level and character tokenizers).

    Each step decodes only the tokens since the last emitted piece plus a few before them (the way vLLM
    does), so a long generation costs O(1) per token, not the O(n) of re-decoding everything.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = [int(i) for i in prompt_ids]
        self.read = len(self.ids)  # ids before this one are emitted (or are the prompt)
        self.prefix = max(0, self.read - CONTEXT_TOKENS)  # decoding starts here: context for the new ids

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        piece, text = self._new_text()
        if not piece or text.endswith(REPLACEMENT):
            return ""  # nothing new yet, or an incomplete character: wait for the next token
        self.prefix, self.read = self.read, len(self.ids)
        return piece

    def finish(self) -> str:
        """The text still held back (an incomplete character is written as U+FFFD)."""
        piece, _ = self._new_text()
        self.prefix = self.read = len(self.ids)
        return piece

    def _new_text(self) -> tuple[str, str]:
        """(the text the ids since ``read`` add, the decoded text from ``prefix``)."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        common = 0
        for a, b in zip(before, text, strict=False):
            if a != b:
                break
            common += 1
        return text[common:], text
