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
    with pytest.raises(ModelError, match=r"past_key_values layer 0 holds 3 rows, input_ids 2"):
        lm(X, past_key_values=lm.allocate_cache(3, 8))


def test_a_hybrids_cache_is_checked_on_every_layer():
    """A cache of the wrong batch is refused whatever the first layer's kind (a mixer's state, MLA's latent)."""
    for pattern in (["gla", "mha"], ["mha", "mamba2"], ["mla", "gated_deltanet"]):
        m = compose(small_model_dict(layer_pattern=pattern), seed=0)
        cache = m.allocate_cache(2, 8)
        cache[1] = m.allocate_cache(3, 8)[1]  # one layer's cache for another batch
        with pytest.raises(ModelError, match=r"past_key_values layer 1 holds 3 rows, input_ids 2"):
            m(X, past_key_values=cache)


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


# ----------------------------------------------------------------------------- data loss
EXPORTABLE = dict(
    position={"type": "rope"},
    norm={"type": "rmsnorm"},
    tie_embeddings=False,
    ffn={"type": "swiglu", "intermediate_size": 48},
)  # a Llama: it has a Hugging Face equivalent


@pytest.fixture
def saved(tmp_path):
    model = compose(small_model_dict(**EXPORTABLE), seed=0)
    model.save_pretrained(tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def _files(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("where", ["same", "inside"])
def test_export_into_its_own_source_is_refused_even_with_overwrite(saved, where, capsys):
    from composer.cli import run
    from composer.cli.convert import export_main

    _, src = saved
    before = _files(src)
    target = src if where == "same" else src / "hf"
    for extra in ([], ["--overwrite"]):
        assert run(export_main, [str(src), str(target), *extra]) == 2
        err = capsys.readouterr().err
        assert ("is the source folder" if where == "same" else "is inside the source folder") in err
        assert "Traceback" not in err
    assert _files(src) == before and not (src / "hf").exists()


def test_export_over_another_checkpoint_needs_overwrite(saved, tmp_path, capsys):
    from composer.cli import run
    from composer.cli.convert import export_main

    _, src = saved
    other = tmp_path / "other"
    compose(small_model_dict(num_layers=1), seed=1).save_pretrained(other)
    before = _files(other)
    assert run(export_main, [str(src), str(other)]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err and _files(other) == before
    assert run(export_main, [str(src), str(other), "--overwrite"]) == 0
    assert json.loads((other / "config.json").read_text())["model_type"] == "llama"


def test_import_into_its_source_or_over_a_checkpoint_is_refused(saved, tmp_path, capsys):
    from composer.cli import run
    from composer.cli.convert import export_main, import_main

    _, src = saved
    hf = tmp_path / "hf"
    assert run(export_main, [str(src), str(hf)]) == 0
    before = _files(hf)
    assert run(import_main, [str(hf), str(hf)]) == 2 and "is the source folder" in capsys.readouterr().err
    assert run(import_main, [str(hf), str(src)]) == 2 and "already holds a checkpoint" in capsys.readouterr().err
    assert _files(hf) == before


def test_save_pretrained_keeps_another_checkpoint_unless_asked(saved):
    model, folder = saved
    before = _files(folder)
    other = compose(small_model_dict(num_layers=1), seed=1)
    with pytest.raises(CheckpointError, match=r"already holds a checkpoint .* overwrite=True"):
        other.save_pretrained(folder)
    assert _files(folder) == before
    model.save_pretrained(folder)  # the same architecture (more training, say): no flag needed
    other.save_pretrained(folder, overwrite=True)
    assert ComposedModel.from_pretrained(folder).config.num_layers == 1
    (folder / "notes.txt").write_text("mine")
    other.save_pretrained(folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine", "files that are not a checkpoint's are never touched"


# ----------------------------------------------------------------------------- foreign configs
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from composer.hf import export_hf

    folder = tmp_path_factory.mktemp("hf")
    model = compose(
        small_model_dict(
            position={"type": "rope"},
            norm={"type": "rmsnorm"},
            ffn={"type": "swiglu", "intermediate_size": 48},
            tie_embeddings=False,
        ),
        seed=0,
    )
    export_hf(model, folder)
    return folder


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("tie_word_embeddings", "false", r"config.json:tie_word_embeddings: expected bool, got str 'false'"),
        ("rms_norm_eps", "abc", r"config.json:rms_norm_eps: expected float, got str 'abc'"),
        ("rms_norm_eps", float("nan"), r"config.json:rms_norm_eps: nan is not a finite number"),
        ("sliding_window", "big", r"config.json:sliding_window: expected int, got str 'big'"),
        ("num_hidden_layers", "two", r"config.json:num_hidden_layers: expected int, got str 'two'"),
        ("num_hidden_layers", 2.5, r"config.json:num_hidden_layers: expected int, got float 2.5"),
        ("num_hidden_layers", 200_000, r"config.json:num_hidden_layers: 200,000 is above the size limit 1,024"),
        ("num_attention_heads", 0, r"config.json:num_attention_heads: 0 is below the minimum 1"),
        ("vocab_size", 2**62, r"config.json:vocab_size: .* is above the size limit"),
    ],
)
def test_values_of_a_hugging_face_config_are_typed_like_yaml(hf_folder, tmp_path, key, value, match):
    import shutil

    from composer import ConfigError
    from composer.hf import import_hf

    folder = tmp_path / "bad"
    shutil.copytree(hf_folder, folder)
    doc = json.loads((folder / "config.json").read_text())
    doc[key] = value
    (folder / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=match):
        import_hf(folder)


@pytest.mark.parametrize("where", ["config.json", "index", "hf"])
def test_deeply_nested_json_is_a_checkpoint_error_naming_the_file(saved, hf_folder, tmp_path, where):
    from composer.hf import import_hf

    deep = '{"a": ' * 5000 + "1" + "}" * 5000
    if where == "config.json":
        (saved[1] / "config.json").write_text(deep)
        load, path = (lambda: ComposedModel.from_pretrained(saved[1])), saved[1] / "config.json"
    elif where == "index":
        (saved[1] / "model.safetensors.index.json").write_text(deep)
        load, path = (lambda: ComposedModel.from_pretrained(saved[1])), saved[1] / "model.safetensors.index.json"
    else:
        import shutil

        shutil.copytree(hf_folder, tmp_path / "hf")
        (tmp_path / "hf" / "config.json").write_text(deep)
        load, path = (lambda: import_hf(tmp_path / "hf")), tmp_path / "hf" / "config.json"
    with pytest.raises(CheckpointError, match="nested deeper than 64|not a valid shard index") as info:
        load()
    assert str(path) in str(info.value)


def test_a_safetensors_header_nested_too_deep_is_refused(tmp_path):
    import struct

    from composer import weights

    header = ('{"__metadata__": {"x": "y"}, "t": ' + "[" * 3000 + "]" * 3000 + "}").encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match=r"model.safetensors: the safetensors header is not valid JSON .*nested"):
        weights.read_header(path)


# ----------------------------------------------------------------------------- sizes and numbers
@pytest.mark.parametrize(
    "changes, match",
    [
        ({"num_layers": 200_000}, r"model.num_layers: 200,000 is above the size limit 1,024 .*limits.num_layers"),
        ({"hidden_size": 1e9}, r"model.hidden_size: 1,000,000,000 is above the size limit"),
        ({"vocab_size": 2**62}, r"model.vocab_size: .* is above the size limit 4,194,304"),
        ({"head": {"type": "classification", "num_classes": 10**12}}, r"model.head.num_classes: .* size limit"),
        ({"ffn": {"type": "mlp", "intermediate_size": 2**30}}, r"model.ffn.intermediate_size: .* size limit"),
        ({"limits": {"hidden_sise": 10}}, r"model.limits.hidden_sise: is not a size limit.*did you mean 'hidden_size'"),
    ],
)
def test_sizes_are_bounded_before_anything_is_built(changes, match):
    with pytest.raises(InvalidParameter, match=match):
        compose(small_model_dict(**changes), device="meta")


def test_a_size_limit_can_be_raised_by_the_config():
    model = compose(
        small_model_dict(num_layers=1100, hidden_size=8, num_heads=2, limits={"num_layers": 2048}), device="meta"
    )
    assert len(model.layers) == 1100


@pytest.mark.parametrize(
    "changes",
    [
        {"init_std": float("nan")},
        {"dropout": float("inf")},
        {"norm": {"type": "layernorm", "eps": float("nan")}},
        {"position": {"type": "rope", "theta": float("inf")}},
        {"attention": {"type": "mha", "softmax_scale": float("nan")}},
        {"attention": {"type": "mha", "logit_softcap": float("inf")}},
        {"position": {"type": "alibi", "max_bias": float("nan")}},
        {"ffn": {"type": "moe", "aux_loss_weight": float("inf"), "expert": {"type": "mlp"}}},
        {"position": {"type": "rope", "scaling": "linear", "scaling_factor": float("nan")}},
    ],
)
def test_non_finite_floats_fail_validation(changes):
    with pytest.raises(InvalidParameter, match=r"is not a finite number"):
        compose(small_model_dict(**changes), device="meta")


def test_a_build_that_does_not_fit_states_both_numbers(monkeypatch):
    from composer import devices

    monkeypatch.setattr(devices, "available_bytes", lambda device: 1024**2)
    with pytest.raises(InvalidParameter, match=r"the model's weights: 0\.\d+ GiB needed on cpu, 0\.00 GiB free"):
        compose(small_model_dict(hidden_size=256, num_heads=4))
    assert compose(small_model_dict(hidden_size=256, num_heads=4), device="meta")  # meta allocates nothing


def test_plan_refuses_an_unknown_device_type():
    from composer.plan import plan

    with pytest.raises(InvalidParameter, match=r"device: 'tpu' is not a device type .* did you mean 'xpu'"):
        plan(small_model_dict(), device="tpu")


def test_a_bad_override_followed_by_another_on_the_same_layer_is_reported():
    """Found by the fuzz suite: the second override of layer 0 merged onto the first one's bool."""
    raw = small_model_dict(layers=[{"select": [0], "norm": False}, {"select": 0, "norm": {"type": "layernorm"}}])
    with pytest.raises(InvalidParameter, match=r"model.layers\[0\].norm: expected a norm type name or a mapping"):
        compose(raw, device="meta")
