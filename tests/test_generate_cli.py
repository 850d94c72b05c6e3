"""composer-generate: end to end in a subprocess (save_pretrained + a tokenizers.Tokenizer), streaming, errors."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import small_model_dict
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from composer import ComposedModel, compose, load_config
from composer.cli import run
from composer.cli.generate import TextPrinter, main_
from composer.data.tokenizer import char_tokenizer
from composer.generation import generate

PROMPT = "héllo wörld"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models decode token by token: one thread is faster than two on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def byte_tokenizer() -> Tokenizer:
    """Byte-level tokenizer without merges: 256 ids, multi-byte characters span several tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def small_lm() -> ComposedModel:
    cfg = small_model_dict(
        vocab_size=256,
        init_std=0.35,
        tie_embeddings=False,
        position={"type": "rope"},
        attention={"type": "gqa", "num_kv_heads": 2},
    )
    return compose(cfg, seed=5)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model"
    small_lm().save_pretrained(path, tokenizer=byte_tokenizer())
    return path


@pytest.fixture(scope="module")
def ckpt_no_tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model"
    small_lm().save_pretrained(path)
    return path


def expected_text(ckpt: Path, max_new_tokens: int, prompt: str = PROMPT, **kwargs) -> str:
    tok = byte_tokenizer()
    ids = tok.encode(prompt).ids
    out = generate(ComposedModel.from_pretrained(ckpt), torch.tensor([ids]), max_new_tokens, **kwargs)
    return tok.decode(out[0].tolist())


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("composer-generate")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "composer.cli.generate"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(command + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def run_main(argv: list[str]) -> str:
    out = io.StringIO()
    assert main_(argv + ["device=cpu"], out=out) == 0  # sampled tokens depend on the device's generator
    return out.getvalue()


# ----------------------------------------------------------------------------- end to end
def test_subprocess_prints_prompt_and_greedy_continuation(ckpt, tmp_path):
    result = cli(f"ckpt={ckpt}", f"prompt={PROMPT}", "max_new_tokens=12", "device=cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = expected_text(ckpt, 12)
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    assert result.stdout == text + "\n"


def test_subprocess_errors_exit_2_without_traceback(ckpt, tmp_path):
    missing = cli(f"ckpt={tmp_path / 'nope'}", "prompt=hi", cwd=tmp_path)
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    bad = cli(f"ckpt={ckpt}", "prompt=hi", "top_p=1.5", cwd=tmp_path)
    assert bad.returncode == 2
    assert "top_p must be in (0, 1]" in bad.stderr and "Traceback" not in bad.stderr
    assert bad.stdout == ""  # nothing echoed before the arguments were checked


def test_sampling_options(ckpt):
    # temperature / top_k / top_p switch sampling on unless do_sample is given
    sampled = run_main(
        [f"ckpt={ckpt}", f"prompt={PROMPT}", "max_new_tokens=10", "temperature=0.8", "top_k=20", "seed=3"]
    )
    assert sampled == expected_text(ckpt, 10, do_sample=True, temperature=0.8, top_k=20, seed=3) + "\n"
    assert sampled != expected_text(ckpt, 10) + "\n"
    nucleus = run_main(
        [
            f"ckpt={ckpt}",
            f"prompt={PROMPT}",
            "max_new_tokens=10",
            "do_sample=true",
            "top_p=0.9",
            "repetition_penalty=1.3",
            "seed=4",
        ]
    )
    assert nucleus == expected_text(ckpt, 10, do_sample=True, top_p=0.9, repetition_penalty=1.3, seed=4) + "\n"
    with pytest.warns(UserWarning, match="only apply when sampling"):
        greedy = run_main(
            [f"ckpt={ckpt}", f"prompt={PROMPT}", "max_new_tokens=10", "do_sample=false", "temperature=0.5"]
        )
    assert greedy == expected_text(ckpt, 10) + "\n"
    quiet = run_main([f"ckpt={ckpt}", f"prompt={PROMPT}", "max_new_tokens=10", "echo=false"])
    assert quiet == expected_text(ckpt, 10)[len(PROMPT) :] + "\n"


def test_eos_token_by_text_or_id_stops_generation(ckpt):
    tok = byte_tokenizer()
    prompt = tok.encode(PROMPT).ids
    ids = generate(ComposedModel.from_pretrained(ckpt), torch.tensor([prompt]), 12)[0, len(prompt) :].tolist()
    # a generated token that is a printable character but not a digit (digits are read as ids)
    stop = next(i for i in ids[1:] if tok.id_to_token(i).isprintable() and not tok.id_to_token(i).isdigit())
    cut = tok.decode(prompt + ids[: ids.index(stop) + 1])
    args = [f"ckpt={ckpt}", f"prompt={PROMPT}", "max_new_tokens=12"]
    by_text = run_main(args + [f"eos_token_id={tok.id_to_token(stop)}"])
    by_id = run_main(args + [f"eos_token_id={stop}"])
    assert by_text == by_id == cut + "\n"
    assert len(cut) < len(expected_text(ckpt, 12))


def test_prompt_ids_without_a_tokenizer(ckpt_no_tokenizer):
    out = run_main([f"ckpt={ckpt_no_tokenizer}", "prompt_ids=5,6,7", "max_new_tokens=4"])
    ids = generate(ComposedModel.from_pretrained(ckpt_no_tokenizer), torch.tensor([[5, 6, 7]]), 4)
    assert out == " ".join(map(str, ids[0].tolist())) + "\n"
    assert (
        run_main([f"ckpt={ckpt_no_tokenizer}", "prompt_ids=5,6,7", "max_new_tokens=4", "echo=false"])
        == " ".join(map(str, ids[0, 3:].tolist())) + "\n"
    )


def test_text_streams_as_tokens_come_and_holds_back_partial_characters():
    tok = byte_tokenizer()
    writes: list[str] = []

    class Recorder(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return super().write(text)

    out = Recorder()
    printer = TextPrinter(tok, tok.encode("ab").ids, out, echo=True)
    for token in tok.encode("cé!").ids:  # é is two tokens
        printer(torch.tensor([token]))
    printer.close()
    assert out.getvalue() == "abcé!\n"
    assert [w for w in writes if w] == ["ab", "c", "é", "!", "\n"]  # é printed once complete, never U+FFFD


def test_the_suggested_max_new_tokens_is_accepted(ckpt):
    args = [f"ckpt={ckpt}", "prompt=hi", "context_overflow=error"]
    assert run(main_, args + ["max_new_tokens=63", "device=cpu"]) == 2
    assert run_main(args + ["max_new_tokens=62"]) == expected_text(ckpt, 62, prompt="hi") + "\n"


def test_char_text_model_generates_past_its_context_window(tmp_path, capsys):
    """The README's command on the char_text experiment's model (learned positions, context 64): a
    6-character prompt and 200 new tokens, each token past the window predicted from the last 64."""
    tok = char_tokenizer(["ROMEO:\nJULIET: O Romeo, Romeo! wherefore art thou Romeo?\n"])
    cfg = load_config(["experiment=char_text", f"model.vocab_size={tok.get_vocab_size()}"]).model
    model = compose(cfg, seed=0)
    path = tmp_path / "model"
    model.save_pretrained(path, tokenizer=tok)
    text = run_main([f"ckpt={path}", "prompt=ROMEO:", "max_new_tokens=200", "temperature=0.8", "top_k=50", "seed=1"])
    ids = generate(
        model, torch.tensor([tok.encode("ROMEO:").ids]), 200, do_sample=True, temperature=0.8, top_k=50, seed=1
    )
    assert ids.shape == (1, 206)
    assert text == tok.decode(ids[0].tolist()) + "\n"
    # unknown characters of the prompt are named on stderr (they become [UNK])
    capsys.readouterr()
    run_main([f"ckpt={path}", "prompt=ROMEO: ¿qué?", "max_new_tokens=3"])
    assert "warning: prompt characters '¿', 'q', 'é' are not in the tokenizer's vocabulary" in capsys.readouterr().err


def test_threads_option_sets_torch_threads_for_the_call_only(ckpt, monkeypatch):
    counts = []
    real = ComposedModel.forward
    monkeypatch.setattr(
        ComposedModel, "forward", lambda self, *a, **k: (counts.append(torch.get_num_threads()), real(self, *a, **k))[1]
    )
    before = torch.get_num_threads()
    run_main([f"ckpt={ckpt}", f"prompt={PROMPT}", "max_new_tokens=3", "threads=2"])
    assert set(counts) == {2} and torch.get_num_threads() == before
    counts.clear()
    torch.set_num_threads(2)
    try:
        run_main([f"ckpt={ckpt}", f"prompt={PROMPT}", "max_new_tokens=3"])  # threads=auto: a small model, one thread
        assert set(counts) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "argv, message",
    [
        (["prompt=hi"], "ckpt: is required"),
        (["ckpt={ckpt}"], "prompt: is required"),
        (["ckpt={ckpt}", "prompt=hi", "prompt_ids=1"], "either prompt or prompt_ids"),
        (["ckpt={ckpt}", "prompt=hi", "max_new_tokns=3"], "did you mean 'max_new_tokens'"),
        (["ckpt={ckpt}", "hello"], "hello: expected key=value"),
        (["ckpt={ckpt}", "prompt=hi", "max_new_tokens=many"], "max_new_tokens: 'many' is not an integer"),
        (["ckpt={ckpt}", "prompt=hi", "do_sample=maybe"], "do_sample: 'maybe' is not true or false"),
        (["ckpt={ckpt}", "prompt=hi", "dtype=int8"], "dtype: 'int8' is not supported"),
        (["ckpt={ckpt}", "prompt=hi", "device=gpu0"], "device: 'gpu0' is not a device"),
        (["ckpt={ckpt}", "prompt=hi", "device=cuda:99"], "invalid composer-generate arguments: device: 'cuda:99'"),
        (["ckpt={ckpt}", "prompt=hi", "eos_token_id=<nope>"], "not a token of the tokenizer's vocabulary"),
        (["ckpt={ckpt}", "prompt=hi", "top_k=0", "max_new_tokens=3"], "top_k must be an integer >= 1"),
        (["ckpt={ckpt}", "prompt_ids=1,999"], "token id 999 is outside the vocabulary"),
        (
            ["ckpt={ckpt}", "prompt=hi", "max_new_tokens=63", "context_overflow=error"],
            "exceeds max_position_embeddings=64 (context_overflow='error'); use max_new_tokens <= 62 for this 2-token",
        ),
        (["ckpt={ckpt}", "prompt=hi", "context_overflow=slide"], "context_overflow='slide'"),
        (["ckpt={ckpt}", "prompt=hi", "prompt_overflow=error"], "prompt_overflow: was replaced. Fix: use context_"),
        (["ckpt={ckpt}", "prompt_ids="], "prompt_ids: is empty"),
        (["ckpt={ckpt}", "prompt_ids=,"], "prompt_ids: is empty"),
        (["ckpt={ckpt}", "prompt=hi", "threads=0"], "threads: '0' is not auto or a whole number >= 1"),
        (["ckpt={bare}", "prompt=hi"], "has no tokenizer.json"),
    ],
)
def test_errors_are_messages_with_exit_2(argv, message, ckpt, ckpt_no_tokenizer, capsys):
    argv = [a.format(ckpt=ckpt, bare=ckpt_no_tokenizer) for a in argv]
    assert run(main_, argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ")
    assert message in captured.err
    assert captured.out == ""


def test_help(capsys):
    assert run(main_, ["--help"]) == 0
    assert "composer-generate ckpt=" in capsys.readouterr().out
