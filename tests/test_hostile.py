"""Hostile and careless input, by class: every bad value is a composer error naming the argument and the
fix; nothing runs from a checkpoint the user did not choose."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import small_model_dict

from composer import CheckpointError, ComposedModel, ConfigError, InvalidParameter, ModelError, compose

pytestmark = pytest.mark.usefixtures("one_torch_thread")
V = 64


@pytest.fixture(scope="module")
def lm() -> ComposedModel:
    return compose(small_model_dict(), seed=0).eval()


@pytest.fixture(scope="module")
def classifier() -> ComposedModel:
    return compose(small_model_dict(head={"type": "classification", "num_classes": 3}), seed=0).eval()


X = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- model inputs
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"input_ids": torch.zeros(0, 5, dtype=torch.long)}, r"input_ids has no rows \(batch 0"),
        ({"input_ids": X.to(torch.uint8)}, r"input_ids must be int64 or int32, got torch.uint8"),
        ({"input_ids": X.to("meta")}, r"input_ids are on meta, the model on cpu"),
        ({"labels": X.float()}, r"labels must be int64 or int32, got torch.float32"),
        ({"labels": X[:, :3]}, r"labels must have shape \(2, 5\) \(\[batch, seq_len\] token ids\), got \(2, 3\)"),
        ({"labels": X + V}, r"labels hold \d+, outside \[0, 64\) \(or -100: ignored\).*vocab_size"),
        ({"labels": torch.full((2, 5), -3)}, r"labels hold -3, outside \[0, 64\)"),
        ({"labels": [[1, 2]]}, r"labels must have shape \(2, 5\).*got list"),
        ({"attention_mask": torch.full((2, 5), 2)}, r"attention_mask must hold only 0 \(padding\) and 1.*found 2"),
        ({"attention_mask": torch.full((2, 5), 0.5)}, r"attention_mask must hold only 0.*found 0.5"),
        ({"position_ids": torch.arange(60, 65)[None]}, r"position_ids hold 64, outside \[0, max_position_embeddings"),
        ({"position_ids": torch.arange(-1, 4)[None]}, r"position_ids hold -1"),
        ({"position_ids": torch.arange(4)[None]}, r"position_ids must have shape \(2, 5\) or \(1, 5\), got \(1, 4\)"),
        ({"position_ids": torch.arange(5.0)[None]}, r"position_ids must be int64 or int32"),
        ({"past_key_values": (1, 2)}, r"past_key_values must be the Cache .* got tuple"),
        ({"past_key_values": []}, r"past_key_values must be the Cache .* got list"),
    ],
)
def test_bad_model_inputs_are_model_errors_naming_the_argument(lm, kwargs, match):
    call = {"input_ids": X, **kwargs}
    with pytest.raises(ModelError, match=match):
        lm(**call)


def test_a_cache_of_another_model_or_batch_is_refused(lm):
    other = compose(small_model_dict(num_layers=3), seed=0)
    with pytest.raises(ModelError, match=r"past_key_values has 3 layers, this model 2"):
        lm(X, past_key_values=other.allocate_cache(2, 8))
    with pytest.raises(ModelError, match=r"past_key_values holds 3 rows, input_ids 2"):
        lm(X, past_key_values=lm.allocate_cache(3, 8))


def test_classification_labels_are_checked(classifier):
    with pytest.raises(ModelError, match=r"labels hold 3, outside \[0, 3\).*num_classes"):
        classifier(X, labels=torch.tensor([0, 3]))
    with pytest.raises(ModelError, match=r"labels must have shape \(2,\) \(\[batch\] class indices\)"):
        classifier(X, labels=X)
    out = classifier(X, labels=torch.tensor([2, -100]))  # the ignore index is allowed
    assert torch.isfinite(out.loss)


def test_a_model_on_the_meta_device_says_how_to_run_it():
    with pytest.raises(ModelError, match=r"the model is on the meta device .* compose\(config\)"):
        compose(small_model_dict(), device="meta")(X)


def test_valid_inputs_still_pass(lm):
    labels = torch.where(X > 30, -100, X)
    mask = torch.ones(2, 5, dtype=torch.bool)
    out = lm(X, attention_mask=mask, labels=labels, position_ids=torch.arange(5)[None])
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("dtype, want", [("float16", torch.float16), ("torch.bfloat16", torch.bfloat16)])
def test_compose_accepts_dtype_names(dtype, want):
    assert {p.dtype for p in compose(small_model_dict(), dtype=dtype).parameters()} == {want}


@pytest.mark.parametrize("dtype", ["int8", "fp8", 3])
def test_compose_refuses_other_dtypes_by_name(dtype):
    with pytest.raises(InvalidParameter, match=r"dtype: .* is not a floating dtype. Fix: use one of float32"):
        compose(small_model_dict(), dtype=dtype)


# ----------------------------------------------------------------------------- code on load
PLUGIN = "tests.plugins.my_attention.MyAttention"


@pytest.mark.parametrize("where", ["config.json", "header"])
def test_a_dotted_path_in_a_checkpoint_is_not_imported(tmp_path, where, monkeypatch):
    """A module on the path that records its own import: named by a checkpoint, it is never imported."""
    (tmp_path / "evil_plugin.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('IMPORTED').write_text('ran')\nAttn = object\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = compose(small_model_dict(), seed=0)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    doc = json.loads((ckpt / "config.json").read_text())
    doc["model"]["attention"] = {"type": "evil_plugin.Attn"}
    if where == "config.json":
        (ckpt / "config.json").write_text(json.dumps(doc))
        target = ckpt
    else:  # a lone file: the config comes from the safetensors header
        from composer import weights

        (ckpt / "config.json").unlink()
        header = weights.read_header(ckpt / "model.safetensors")
        meta = dict(header.metadata, composer_config=json.dumps(doc))
        weights.write_safetensors(weights.unique_state(model), ckpt, "5GB", meta, {"format_version": "1.0"})
        target = ckpt / "model.safetensors"
    with pytest.raises(CheckpointError) as info:
        ComposedModel.from_pretrained(target)
    text = str(info.value)
    assert "'evil_plugin.Attn'" in text and "trust_plugins=['evil_plugin']" in text
    assert "--trust-plugin evil_plugin" in text
    assert not (tmp_path / "IMPORTED").exists() and "evil_plugin" not in sys.modules


def test_a_trusted_plugin_loads_and_registered_names_need_no_trust(tmp_path):
    model = compose(small_model_dict(attention={"type": PLUGIN}), seed=0)
    model.save_pretrained(tmp_path / "plugged")
    with pytest.raises(CheckpointError, match=r"trust_plugins=\['tests'\]"):
        ComposedModel.from_pretrained(tmp_path / "plugged")
    loaded = ComposedModel.from_pretrained(tmp_path / "plugged", trust_plugins=["tests.plugins"])
    assert type(loaded.layers[0].attn).__name__ == "MyAttention"
    compose(small_model_dict(), seed=0).save_pretrained(tmp_path / "plain")
    assert ComposedModel.from_pretrained(tmp_path / "plain").num_parameters() > 0
    # the user's own YAML may still name a dotted path: only loading a checkpoint is guarded
    assert type(compose(small_model_dict(attention={"type": PLUGIN}), device="meta").layers[0].attn).__name__ == (
        "MyAttention"
    )


# ----------------------------------------------------------------------------- plugins
@pytest.mark.parametrize(
    "plugin, match",
    [
        ("ReturnsList", r"model\.layers\[0\]: a dry forward on the meta device failed \(\w+Error"),
        ("FailsInForward", r"model\.layers\[0\]: a dry forward .* failed \(ZeroDivisionError: division by zero"),
        (
            "FailsInInit",
            r"model\.layers\[0\]\.attention: tests\.plugins\.broken_attention\.FailsInInit\(cfg, ctx\) "
            r"raised ValueError: the plugin's own check failed",
        ),
    ],
)
def test_a_broken_plugin_is_named_when_the_model_is_built(plugin, match, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    with pytest.raises(ConfigError, match=match) as info:
        compose(small_model_dict(attention={"type": f"tests.plugins.broken_attention.{plugin}"}), device="meta")
    assert "tests.plugins.broken_attention" in str(info.value)


def test_the_command_lines_take_the_trust_opt_in(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from composer.cli.convert import export_main
    from composer.cli.generate import main_ as generate_main

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    compose(small_model_dict(attention={"type": PLUGIN}), seed=0).save_pretrained(tmp_path / "plugged")
    with pytest.raises(CheckpointError, match=r"composer-export --trust-plugin tests"):
        export_main([str(tmp_path / "plugged"), str(tmp_path / "hf")])
    with pytest.raises(CheckpointError, match=r"composer-generate trust_plugin=tests"):
        generate_main([f"ckpt={tmp_path / 'plugged'}", "prompt_ids=1,2", "max_new_tokens=2", "device=cpu"])
    assert generate_main(
        [
            f"ckpt={tmp_path / 'plugged'}",
            "prompt_ids=1,2",
            "max_new_tokens=2",
            "device=cpu",
            "trust_plugin=tests.plugins",
        ]
    ) in (0, None)
    assert capsys.readouterr().out.strip()
