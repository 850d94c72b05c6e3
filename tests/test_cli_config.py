"""Config files and the command line: a user's --config-dir (its presets selectable, its YAML errors named
by file and line), every problem of a command line reported at once, a component type switched on the
command line, and a run folder that cannot be made."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_train_helpers import TINY, train_cli

from composer import ConfigError
from composer.cli.plan import main_ as plan_main
from composer.config import load_config
from composer.train import precheck, with_experiments


@pytest.fixture
def config_dir(tmp_path) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("defaults: [tiny, _self_]\nnum_layers: 3\nname: mine\n")
    (tmp_path / "model" / "broken.yaml").write_text("defaults: [tiny, _self_]\nnum_layers: [2\n")
    return tmp_path


def test_a_preset_in_the_users_config_dir_is_found_beside_the_experiments(config_dir):
    argv = precheck(with_experiments(["--config-dir", str(config_dir), "model=mine", "experiment=smoke"]))
    assert "model=mine" in argv
    cfg = load_config(["model=mine", f"hydra.searchpath=[file://{config_dir.parent}]"], config_dirs=[config_dir])
    assert cfg.model.num_layers == 3 and cfg.model.name == "mine"


def test_a_yaml_syntax_error_names_the_file_and_line(config_dir):
    with pytest.raises(ConfigError) as info:
        load_config(["model=broken"], config_dirs=[config_dir])
    text = str(info.value)
    assert f"{config_dir / 'model' / 'broken.yaml'}:3:1: is not valid YAML" in text
    assert "opened at line 2, column 13" in text


def test_every_problem_of_a_command_line_is_reported_at_once(capsys):
    argv = [
        "model.num_heads=0",
        "model.ffn.type=swigl",
        "model.attention.num_kv_head=2",
        "model.norm.eps=-1",
        "trainer.max_stesp=3",
    ]
    code, _, err = train_cli(argv, capsys)
    assert code == 2
    for key in (
        "model.num_heads",
        "model.ffn.type",
        "model.attention.num_kv_head",
        "model.norm.eps",
        "trainer.max_stesp",
    ):
        assert f"  - {key}:" in err, (key, err)
    assert "did you mean 'swiglu'" in err and "did you mean 'max_steps'" in err
    with pytest.raises(ConfigError) as info:  # composer-plan too
        plan_main(["model.num_heads=0", "model.attention.num_kv_head=2"])
    assert {p.path for p in info.value.problems} == {"model.num_heads", "model.attention.num_kv_head"}


def test_one_misspelt_key_alone_is_still_one_problem():
    with pytest.raises(ConfigError) as info:
        load_config(["model.hidden_sise=3"])
    assert [p.path for p in info.value.problems] == ["model.hidden_sise"]
    assert info.value.remaining == []


def test_switching_a_presets_component_type_drops_the_presets_options_for_the_old_type(capsys, tmp_path):
    code, _, err = train_cli([*TINY, "model.ffn.type=moe", "trainer.max_steps=1", f"hydra.run.dir={tmp_path}"], capsys)
    assert code == 0, err
    assert plan_main(["model.ffn.type=moe", "model.ffn.num_experts=4"]) == 0
    # an option the command line gives itself is kept, and reported when the new type lacks it
    code, _, err = train_cli([*TINY, "model.ffn.type=moe", "model.ffn.multiple_of=3"], capsys)
    assert code == 2 and "model.ffn.multiple_of: unknown option of 'moe'" in err


def test_a_run_folder_that_cannot_be_made_is_a_config_error(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    code, _, err = train_cli([*TINY, f"hydra.run.dir={tmp_path / 'a_file' / 'run'}"], capsys)
    assert code == 2 and "hydra.run.dir: cannot make" in err and "Not a directory" in err
    code, _, _ = train_cli([*TINY, f"hydra.run.dir={tmp_path / 'new' / 'run'}", "model.hidden_size=31"], capsys)
    assert code == 2 and not (tmp_path / "new").exists(), "the folder tried is not left behind"
