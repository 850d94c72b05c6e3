"""Fuzzing the boundaries (hypothesis, in the normal run, a few minutes in all): random mutations of valid
model configs, of Hugging Face config.json values, of checkpoint bytes and of model inputs. The outcome is
success or a composer.ComposerError, never another exception, never a hang (a per-example deadline), and
never a NaN from a config that validated."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import small_model_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from composer import ComposedModel, ComposerError, compose
from tests.test_properties import valid_configs

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FUZZ = settings(max_examples=1500, deadline=timedelta(seconds=10), suppress_health_check=list(HealthCheck))

HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2, 3, 7, 2**31, 2**62]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e300, -0.0, 0.5]),
    st.text(max_size=6),
    st.sampled_from(["mha", "gqa", "moe", "rope", "swiglu", "parallel", "true", "false", "1e9", "???", "${x}"]),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.sampled_from(["type", "window", "num_heads", "x"]), st.integers(-2, 4), max_size=2),
)


def _nodes(value: Any, path: tuple = ()) -> list[tuple]:
    """Every path into a nested dict / list (the root included)."""
    out = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _nodes(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _nodes(v, (*path, i))
    return out


def _mutate(draw, doc: Any, hostile=HOSTILE) -> Any:
    """One random edit: replace a value, delete a key, or add an unknown one, anywhere in ``doc``."""
    path = draw(st.sampled_from(_nodes(doc)))
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if not path:
        return draw(hostile) if action == "replace" else doc
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if action == "replace":
        parent[path[-1]] = draw(hostile)
    elif action == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[draw(st.sampled_from(["typo", "num_head", "windw", "type"]))] = draw(hostile)
    return doc


PATTERNS = st.sampled_from(
    [
        {},
        {"layer_pattern": ["mqa*2", "mha"], "mixers": {"mqa": {"qk_norm": True}}},
        {
            "layer_pattern": {"first": ["mha"], "cycle": ["local", "mqa"]},
            "layer_kinds": {"local": {"attention": {"type": "sliding_window", "window": 2}, "position": "none"}},
        },
    ]
)


@st.composite
def mutated_configs(draw) -> dict:
    raw = {**draw(valid_configs()), **copy.deepcopy(draw(PATTERNS))}  # (mutated in place below)
    for _ in range(draw(st.integers(1, 3))):
        raw = _mutate(draw, raw)
    return raw


def _finite(out: Any, vocab: int = 10**9) -> bool:
    """Finite logits (a padded vocabulary's padding columns are -inf by design: left out)."""
    return out.logits is None or bool(torch.isfinite(out.logits[..., :vocab].float()).all())


@FUZZ
@given(raw=mutated_configs())
def test_mutated_model_configs_validate_or_raise_a_composer_error(raw):
    try:
        model = compose(raw, seed=0)
    except ComposerError:
        return
    if model.num_parameters() > 5_000_000:
        return  # valid and large: building it was the test
    x = torch.randint(0, model.config.vocab_size, (2, min(5, model.config.max_position_embeddings)))
    with torch.no_grad():
        out = model.eval()(x)
    assert _finite(out, model.config.vocab_size), "a config that validated gave non-finite logits"


# ----------------------------------------------------------------------------- Hugging Face config.json
FAMILIES = {  # a small composed model of each family (exported with composer's own export_hf)
    "gpt2": small_model_dict(attention={"type": "mha", "bias": True}, ffn={"type": "mlp", "activation": "gelu_tanh"}),
    "llama": small_model_dict(
        position={"type": "rope"},
        norm={"type": "rmsnorm"},
        ffn={"type": "swiglu", "intermediate_size": 48},
        attention={"type": "gqa", "num_kv_heads": 2},
        tie_embeddings=False,
    ),
    "mistral": small_model_dict(
        position={"type": "rope"},
        norm={"type": "rmsnorm"},
        ffn={"type": "swiglu", "intermediate_size": 48},
        attention={"type": "sliding_window", "window": 8, "num_kv_heads": 2},
        tie_embeddings=False,
    ),
    "gpt_neox": small_model_dict(
        position={"type": "rope", "rotary_fraction": 0.25},
        block={"type": "parallel"},
        attention={"type": "mha", "bias": True},
        ffn={"type": "mlp", "activation": "gelu"},
        tie_embeddings=False,
    ),
}


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory) -> dict[str, Path]:
    from composer.hf import export_hf

    out = {}
    for name, raw in FAMILIES.items():
        folder = tmp_path_factory.mktemp(f"hf_{name}")
        export_hf(compose(raw, seed=0), folder)
        out[name] = folder
    return out


@FUZZ
@given(family=st.sampled_from(sorted(FAMILIES)), data=st.data())
def test_mutated_hugging_face_configs_import_or_raise_a_composer_error(hf_folders, tmp_path_factory, family, data):
    from composer.hf import import_hf

    folder = tmp_path_factory.mktemp("mutated")
    shutil.copytree(hf_folders[family], folder, dirs_exist_ok=True)
    doc = json.loads((folder / "config.json").read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        doc = _mutate(data.draw, doc)
    (folder / "config.json").write_text(json.dumps(doc))
    try:
        model = import_hf(folder)
    except ComposerError:
        return
    with torch.no_grad():
        out = model(torch.randint(0, model.config.vocab_size, (1, min(4, model.config.max_position_embeddings))))
    assert _finite(out, model.config.vocab_size), "an imported config that validated gave non-finite logits"


# ----------------------------------------------------------------------------- checkpoint bytes
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    compose(FAMILIES["llama"], seed=0).save_pretrained(folder)
    return folder


@FUZZ
@given(
    target=st.sampled_from(["model.safetensors", "config.json"]),
    edit=st.sampled_from(["flip", "truncate", "insert", "header"]),
    where=st.floats(0, 1),
    byte=st.integers(0, 255),
)
def test_damaged_checkpoints_load_or_raise_a_composer_error(checkpoint, tmp_path_factory, target, edit, where, byte):
    folder = tmp_path_factory.mktemp("damaged")
    shutil.copytree(checkpoint, folder, dirs_exist_ok=True)
    path = folder / target
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little") + 8 if target.endswith(".safetensors") else len(data)
    at = int(where * ((header if edit == "header" else len(data)) - 1))
    if edit in ("flip", "header"):
        data[at] = byte
    elif edit == "truncate":
        data = data[:at]
    else:
        data[at:at] = bytes([byte]) * 3
    path.write_bytes(bytes(data))
    with contextlib.suppress(ComposerError):  # loading may fail, as a composer error only
        ComposedModel.from_pretrained(folder)


# ----------------------------------------------------------------------------- model inputs
@pytest.fixture(scope="module")
def lm() -> ComposedModel:
    return compose(FAMILIES["llama"], seed=0).eval()


def _tensor(draw, shape_hint: tuple) -> Any:
    kind = draw(st.sampled_from(["ok", "shape", "dtype", "values", "empty", "other"]))
    b, t = shape_hint
    if kind == "other":
        return draw(st.sampled_from([None, [[1, 2]], 3, "ids", (1, 2)]))
    shape = shape_hint if kind != "shape" else draw(st.sampled_from([(b,), (b, t, 1), (b + 1, t), (1, t + 1)]))
    if kind == "empty":
        shape = draw(st.sampled_from([(0, t), (b, 0)]))
    dtype = (
        draw(st.sampled_from([torch.long, torch.int32]))
        if kind != "dtype"
        else draw(st.sampled_from([torch.float32, torch.bool, torch.uint8, torch.float16]))
    )
    hi = 64 if kind != "values" else draw(st.sampled_from([-5, 2**40, 3]))
    low = min(hi, 0) - (2 if kind == "values" else 0)
    return torch.randint(low, max(hi, low + 1), shape).to(dtype)


@FUZZ
@given(data=st.data())
def test_random_model_inputs_run_or_raise_a_model_error(lm, data):
    b, t = 2, 5
    call: dict[str, Any] = {"input_ids": _tensor(data.draw, (b, t))}
    for name in ("attention_mask", "labels", "position_ids"):
        if data.draw(st.booleans()):
            call[name] = _tensor(data.draw, (b, t) if name != "position_ids" else (1, t))
    if data.draw(st.booleans()):
        call["past_key_values"] = data.draw(st.sampled_from([(), "cache", lm.allocate_cache(3, 8), [1]]))
    try:
        with torch.no_grad():
            out = lm(**call)
    except ComposerError:
        return
    assert _finite(out)
    assert out.loss is None or math.isfinite(out.loss.item()) or bool((call.get("labels") == -100).all())


# ----------------------------------------------------------------------------- generation arguments
GEN_VALUES = {
    "max_new_tokens": st.one_of(st.integers(-2, 6), st.sampled_from([2**40, 1.5, "3", None, True])),
    "do_sample": st.sampled_from([True, False, "false", 1, None]),
    "temperature": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, -1, 1e-30, "1"])),
    "top_k": st.one_of(st.integers(-2, 100), st.sampled_from([None, 2.5, "5", 2**62])),
    "top_p": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([None, 0, 1, 2])),
    "repetition_penalty": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([None, 0])),
    "eos_token_id": st.one_of(st.integers(-3, 70), st.lists(st.integers(-1, 70), max_size=3), st.sampled_from(["2"])),
    "pad_token_id": st.one_of(st.integers(-3, 70), st.sampled_from([None, 1.0])),
    "use_cache": st.sampled_from([True, False, "yes", None]),
    "seed": st.one_of(st.integers(-5, 2**70), st.sampled_from([None, "1", 1.5])),
    "context_overflow": st.sampled_from(["crop", "error", "wrap", None, 3]),
    "compile": st.sampled_from([False, "no", 2]),
    "threads": st.one_of(st.sampled_from(["auto", "all", None, 0, -1, 1, 2, 10**6, 1.5])),
}


@FUZZ
@given(data=st.data())
def test_random_generation_arguments_decode_or_raise_a_composer_error(lm, data):
    """Every argument of ``generate`` fuzzed (types, ranges, non-finite floats): the outcome is tokens of
    the model's vocabulary within the asked length, or a composer error."""
    b, t = data.draw(st.sampled_from([(1, 3), (2, 4)]))
    ids = _tensor(data.draw, (b, t))
    kwargs = {k: data.draw(v) for k, v in GEN_VALUES.items() if data.draw(st.booleans())}
    if data.draw(st.booleans()):
        mask = _tensor(data.draw, (b, t))
        kwargs["attention_mask"] = (
            mask.clamp(0, 1) if isinstance(mask, torch.Tensor) and data.draw(st.booleans()) else mask
        )
    try:
        out = lm.generate(ids, **kwargs)
    except ComposerError:
        return
    asked = kwargs.get("max_new_tokens", 32)
    assert out.dtype == torch.long and out.shape[0] == ids.shape[0]
    assert ids.shape[1] <= out.shape[1] <= ids.shape[1] + asked
    new = out[:, ids.shape[1] :]
    pad = kwargs.get("pad_token_id")
    assert bool(((new >= 0) & (new < lm.config.vocab_size)).all()) or pad is not None, new
