"""experiments/: every experiment file composes (no training), the folder is on composer-train's
search path from any working directory, and the experiments say what their write-ups claim."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from composer.config import load_config, to_container
from composer.errors import ConfigError
from composer.model import compose
from composer.train import experiments_dir, with_experiments
from composer.train_config import check_config

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted((REPO / "experiments" / "experiment").glob("*.yaml"))
MIXERS = sorted(p.stem for p in (REPO / "experiments" / "mixer").glob("*.yaml"))
ARCHS = sorted(p.stem for p in (REPO / "experiments" / "arch").glob("*.yaml"))
TEXT = "data.path=any.txt"  # text experiments need a file only when they run


def compose_experiment(name: str, *overrides: str):
    needs_text = "override /data: text" in (REPO / "experiments" / "experiment" / f"{name}.yaml").read_text()
    return load_config(
        [f"experiment={name}", *([TEXT] if needs_text else []), *overrides], config_dirs=[experiments_dir()]
    )


def test_the_experiments_folder_is_the_checkouts():
    assert experiments_dir() == REPO / "experiments"
    assert {"recall_mixers", "shakespeare", "memory_speed"} <= {p.stem for p in EXPERIMENTS}
    groups = {p.name for p in (REPO / "experiments").iterdir() if p.is_dir()}
    assert groups == {"experiment", "mixer", "arch"}, "a new group folder needs a composition test here"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_composes_and_validates(path):
    assert path.read_text().startswith("# @package _global_\n"), "experiment files are global packages"
    cfg = compose_experiment(path.stem)
    check_config(cfg)
    vocab = cfg.data.get("vocab_size") or 65  # text: the characters of the file
    model = compose({**to_container(cfg.model), "vocab_size": vocab}, device="meta")
    assert model.num_parameters() > 0
    assert f"experiment={path.stem}" in path.read_text(), "the header shows the command that runs it"


@pytest.mark.parametrize("mixer", MIXERS)
def test_every_mixer_of_the_recall_ablation_composes(mixer):
    layers = ["model.num_layers=4"] if mixer == "hybrid" else []  # one attention layer in four
    cfg = compose_experiment("recall_mixers", f"mixer={mixer}", "model.hidden_size=128", *layers)
    check_config(cfg)
    model = compose({**to_container(cfg.model), "vocab_size": cfg.data.vocab_size}, device="meta")
    expected = {
        "mha": ["mha"] * 2,
        "gqa": ["gqa"] * 2,
        "mqa": ["mqa"] * 2,
        "swa": ["sliding_window"] * 2,
        "nope": ["mha"] * 2,
        "mamba2": ["mamba2"] * 2,
        "gated_deltanet": ["gated_deltanet"] * 2,
        "gla": ["gla"] * 2,
        "hybrid": ["gated_deltanet"] * 3 + ["mha"],
    }[mixer]
    assert [s.attention.type for s in model.config.layer_specs()] == expected
    assert model.config.layer(0).position.type == ("none" if mixer == "nope" else "rope")
    assert model.config.hidden_size == 128 and model.config.num_layers == len(expected)


def test_recall_sliding_window_is_shorter_than_the_key_value_span():
    cfg = compose_experiment("recall_mixers", "mixer=swa")
    window, layers = cfg.model.attention.window, cfg.model.num_layers
    pairs, seq_len = cfg.data.num_pairs, cfg.data.seq_len
    assert window < 2 * pairs  # smaller than the block of key-value pairs
    assert (window - 1) * layers < seq_len - 2 * pairs  # the queries' region is mostly out of reach


def test_shakespeare_architectures_have_equal_parameters_and_budget():
    assert ARCHS == ["gpt2", "llama"]
    gpt2, llama = (compose_experiment("shakespeare", f"arch={a}") for a in ARCHS)
    models = [compose({**to_container(c.model), "vocab_size": 65}, device="meta") for c in (gpt2, llama)]
    counts = [m.num_parameters() for m in models]
    assert abs(counts[0] - counts[1]) / counts[0] < 0.01
    for key in ("trainer", "optim", "scheduler", "data"):
        assert to_container(gpt2[key]) == to_container(llama[key]), key
    assert (
        gpt2.model.num_layers,
        gpt2.model.hidden_size,
        gpt2.model.num_heads,
        gpt2.data.seq_len,
        gpt2.data.batch_size,
        gpt2.trainer.max_steps,
        gpt2.optim.lr,
        gpt2.model.dropout,
        gpt2.data.val_fraction,
    ) == (4, 128, 4, 64, 12, 2000, 1e-3, 0.0, 0.1)
    layers = [m.config.layer(0) for m in models]
    assert [(x.norm.type, x.ffn.type, x.position.type) for x in layers] == [
        ("layernorm", "mlp", "learned"),
        ("rmsnorm", "swiglu", "rope"),
    ]
    assert models[0].config.name == "gpt2" and compose_experiment("shakespeare").model.name == "gpt2"  # default


def test_memory_speed_grid_composes():
    for precision in ("32-true", "bf16-mixed"):
        for mode in ("none", "every_layer", "every_2"):
            cfg = compose_experiment(
                "memory_speed", f"trainer.precision={precision}", f"model.gradient_checkpointing={mode}"
            )
            check_config(cfg)
            compose({**to_container(cfg.model), "vocab_size": cfg.data.vocab_size}, device="meta")


# ----------------------------------------------------------------------------- the search path
def test_search_path_is_added_once_among_the_overrides():
    root = f"file://{REPO / 'experiments'}"
    argv = with_experiments(["experiment=recall_mixers", "--cfg", "job"])
    assert argv == ["experiment=recall_mixers", f"hydra.searchpath=['{root}']", "--cfg", "job"]
    assert with_experiments(argv) == argv  # a DDP child re-running the command adds nothing
    mine = with_experiments(["--multirun", "hydra.searchpath=[file:///my/configs]", "seed=1,2"])
    assert mine == ["--multirun", f"hydra.searchpath=['file:///my/configs','{root}']", "seed=1,2"]
    assert with_experiments([])[0].startswith("hydra.searchpath=")


def test_experiments_env_points_elsewhere(tmp_path, monkeypatch):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\nseed: 42\n")
    monkeypatch.setenv("COMPOSER_EXPERIMENTS", str(tmp_path))
    assert experiments_dir() == tmp_path
    assert load_config(["experiment=mine"], config_dirs=[experiments_dir()]).seed == 42
    monkeypatch.setenv("COMPOSER_EXPERIMENTS", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="COMPOSER_EXPERIMENTS"):
        experiments_dir()


def test_composer_train_finds_experiments_from_any_directory(tmp_path, monkeypatch, capsys):
    from composer.train import main

    monkeypatch.chdir(tmp_path)
    main(["+experiment=recall_mixers", "mixer=swa", "--cfg", "job"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["attention"]["type"] == "sliding_window" and cfg["model"]["num_layers"] == 2
    with pytest.raises(SystemExit) as exit_:
        main(["experiment=recal_mixers"])
    assert exit_.value.code == 2 and "did you mean 'recall_mixers'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
