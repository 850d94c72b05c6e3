"""Config loading: the packaged Hydra tree from any cwd, user presets, wrapped errors, and the
component YAML files kept identical to the schema."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from composer import ConfigError, compose, conf_dir, load_config
from composer.catalogue import component_yaml
from composer.config import split_overrides
from composer.registry import FAMILIES
from composer.schema import COMPONENT_SLOTS, ModelConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Families selectable as config groups (conf/model/<family>/<name>.yaml). Blocks are chosen
# inline (`block: parallel` in _base.yaml), not as a group.
GROUP_FAMILIES = ("attention", "ffn", "norm", "position", "head")


def builtin_names(family: str) -> list[str]:
    reg = FAMILIES[family]
    return [n for n in reg.names() if reg.get(n).cls.__module__.startswith("components.")]


def test_load_config_from_another_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(["model=gpt2", "model.num_layers=2"])
    assert cfg.model.hidden_size == 768 and cfg.model.num_layers == 2
    assert cfg.model.attention.type == "mha" and cfg.model.attention.bias is True
    assert load_config().model.name == "tiny", "the default model is tiny"
    assert conf_dir().is_dir() and (conf_dir() / "model" / "gpt2.yaml").is_file()
    assert not list(tmp_path.iterdir()), "loading a config writes nothing to the cwd"


def test_user_preset_in_config_dir(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "my_model.yaml").write_text(
        "defaults: [tiny, _self_]\nname: mine\nhidden_size: 64\nattention: {type: gqa, num_kv_heads: 2}\n"
    )
    (tmp_path / "model" / "scratch.yaml").write_text(
        "defaults: [_base, {attention: mqa}, {ffn: mlp}, {norm: layernorm}, {position: alibi}, {head: lm}, _self_]\n"
        "vocab_size: 100\nhidden_size: 32\nnum_layers: 2\nnum_heads: 4\nmax_position_embeddings: 16\n"
    )
    cfg = load_config(["model=my_model"], config_dirs=[tmp_path])
    assert cfg.model.name == "mine" and cfg.model.hidden_size == 64 and cfg.model.num_layers == 4
    model = compose(cfg.model, device="meta")
    assert model.layers[0].attn.num_kv_heads == 2
    cfg = load_config(["model=scratch"], config_dirs=[str(tmp_path)])
    assert compose(cfg.model, device="meta").config.position.type == "alibi"
    with pytest.raises(ConfigError, match="model: no config named 'my_model'"):
        load_config(["model=my_model"])  # not without the folder
    with pytest.raises(ConfigError, match="is not a directory"):
        load_config([], config_dirs=[tmp_path / "nowhere"])


def test_missing_preset_lists_options_with_did_you_mean():
    with pytest.raises(ConfigError) as info:
        load_config(["model=gpt3"])
    err = info.value
    assert err.problems[0].path == "model"
    assert "no config named 'gpt3'" in str(err) and "did you mean 'gpt2'?" in str(err)
    presets = sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml"))
    assert f"available: {', '.join(presets)}" in str(err)
    with pytest.raises(ConfigError, match=r"model\.attention: no config named 'gqa2'.*did you mean 'gqa'"):
        load_config(["model/attention=gqa2"])


def test_unknown_key_override():
    with pytest.raises(ConfigError) as info:
        load_config(["model.num_layer=3"])
    assert info.value.problems[0].path == "model.num_layer"
    assert "did you mean 'num_layers'?" in str(info.value) and "+model.num_layer=" in str(info.value)
    with pytest.raises(ConfigError, match=r"model\.position\.thetta.*did you mean 'theta'"):
        load_config(["model/position=rope", "model.position.thetta=1"])
    with pytest.raises(ConfigError) as info:  # a mapping merged into the model: the key inside it
        load_config(["seed=1", "model={num_layer: 2}"])
    assert info.value.problems[0].path == "model.num_layer" and "did you mean 'num_layers'?" in str(info.value)


def test_wrong_type_value_is_a_config_error_naming_the_key():
    cfg = load_config(["model.num_layers=abc", "model.attention.bias=maybe"])
    with pytest.raises(ConfigError) as info:
        compose(cfg.model)
    paths = [p.path for p in info.value.problems]
    assert paths == ["model.num_layers", "model.attention.bias"], str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(["model.layers.0=1"])  # an index into the empty layers list
    assert info.value.problems[0].path == "model.layers[0]" and "model.layers.0=1" in str(info.value)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["model.num_layers"], "model.num_layers"),
        (["seed=1", "model.num_layers=[1"], "model.num_layers"),
        (["seed=1", "model..x=1"], "model..x"),
        (["model.num_layers='abc"], "model.num_layers"),
        (["seed=1", "model=[1,2]"], "model"),
        (["=3"], ""),
    ],
)
def test_malformed_override(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    assert info.value.problems[0].path == key, str(info.value)
    assert f"cannot apply override {overrides[-1]!r}" in str(info.value) and "Fix:" in str(info.value)


def test_group_override():
    cfg = load_config(["model/attention=gqa", "model.attention.num_kv_heads=2"])
    assert cfg.model.attention.type == "gqa" and cfg.model.attention.num_kv_heads == 2
    assert compose(cfg.model, device="meta").layers[0].attn.num_kv_heads == 2
    cfg = load_config(["model=gpt2", "model/ffn=moe", "model.ffn.num_experts=2"])
    assert cfg.model.ffn.type == "moe" and cfg.model.attention.bias is True


def test_interpolation_error_names_the_key():
    cfg = load_config(["model.hidden_size=${nowhere}"])
    with pytest.raises(ConfigError, match="hidden_size"):
        compose(cfg.model)


def test_split_overrides():
    mine, rest = split_overrides(["batch_size=4", "model=gpt2", "seq_len=8", "x"], ["batch_size", "seq_len"])
    assert mine == {"batch_size": "4", "seq_len": "8"} and rest == ["model=gpt2", "x"]


# ============================================================================ YAML files vs schema
@pytest.mark.parametrize("family", GROUP_FAMILIES)
def test_component_yaml_files_match_the_schema(family):
    folder = conf_dir() / "model" / family
    files = {p.stem for p in folder.glob("*.yaml")}
    names = set(builtin_names(family))
    assert names <= files, f"built-in {family} components without a file: {sorted(names - files)}"
    assert files <= names, f"files for unregistered {family} components: {sorted(files - names)}"
    for name in sorted(names):
        text = (folder / f"{name}.yaml").read_text()
        assert text == component_yaml(family, name), (
            f"conf/model/{family}/{name}.yaml is out of date: regenerate it with "
            f"composer.catalogue.component_yaml({family!r}, {name!r})"
        )


def test_component_groups_are_exactly_the_component_families():
    groups = {p.name for p in (conf_dir() / "model").iterdir() if p.is_dir()}
    assert groups == set(GROUP_FAMILIES)
    assert set(GROUP_FAMILIES) | {"block"} == set(FAMILIES) == set(COMPONENT_SLOTS)


def test_base_yaml_has_exactly_the_model_fields_with_their_defaults():
    base = OmegaConf.to_container(OmegaConf.load(conf_dir() / "model" / "_base.yaml"))
    fields = {f.name: f for f in dataclasses.fields(ModelConfig) if f.name not in COMPONENT_SLOTS or f.name == "block"}
    assert set(base) == set(fields)
    for name, f in fields.items():
        if f.default is not dataclasses.MISSING:
            want = f.default
        elif f.default_factory is not dataclasses.MISSING:
            want = f.default_factory()
        else:
            want = "???"
        assert base[name] == want, f"_base.yaml {name}: {base[name]!r} != schema default {want!r}"


@pytest.mark.parametrize("family", ["attention", "ffn", "norm", "position", "block"])
def test_the_selectors_the_catalogue_prints_work(family):
    """composer-components prints how to pick a component on the command line: every form it
    shows composes and builds (the block is an option of the model, not a config group)."""
    from composer.catalogue import selectors
    from composer.registry import FAMILIES
    from composer.schema import resolve_model_config

    name = FAMILIES[family].names()[-1]
    for how in selectors(family):
        override = how.replace("<name>", name).replace(", <option>: ...", "")
        cfg = resolve_model_config(load_config([override]).model)
        chosen = cfg.layer(0).block if family == "block" else getattr(cfg.layer(0), family)
        assert chosen.type == name, override


def test_an_unknown_group_option_beside_an_unknown_key_is_named_not_recursed_on():
    """Looking up the unknown key's siblings recomposes the group choices, which fail the same way: the
    lookup is made once (this recursed until Python's limit)."""
    with pytest.raises(ConfigError) as info:
        load_config(["experiment=no_such_experiment", "mixer=mamba2"])
    assert {p.path for p in info.value.problems} == {"experiment", "mixer"}
