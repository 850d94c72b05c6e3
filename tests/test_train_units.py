"""Training building blocks without a training run: optimizer groups, schedules, atomic
checkpoints, config validation, vocabulary / head / init_from rules, sweep pre-checks."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import small_model_dict
from test_train_helpers import TINY, cli_env

from composer.callbacks import peak_flops
from composer.checkpoint_io import AtomicCheckpointIO
from composer.config import load_config, to_container
from composer.errors import ConfigError
from composer.model import compose
from composer.optim import build_optimizer, build_scheduler, lr_factor, parameter_groups
from composer.schema import resolve_model_config
from composer.summary import RunRecord, write_metrics
from composer.train import _sweep_jobs, precheck
from composer.train_config import check_config, fit_model_to_data, init_from_config
from composer.training import block_classes, build_strategy, check_trainer


# ----------------------------------------------------------------------------- optimizer
def test_weight_decay_only_on_matrices_and_tied_weight_once():
    model = compose(small_model_dict(position={"type": "learned"}, tie_embeddings=True), seed=0)
    decay, no_decay = parameter_groups(model, 0.1)
    decayed = {id(p) for p in decay["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim >= 2), name
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    all_params = decay["params"] + no_decay["params"]
    assert len(all_params) == len({id(p) for p in all_params}) == len(list(model.parameters()))
    assert model.embed.weight is model.head.proj.weight  # tied: counted once above

    decay, _ = parameter_groups(model, 0.1, decay_embeddings=False)
    kept = {id(p) for p in decay["params"]}
    assert id(model.embed.weight) not in kept and id(model.position.weight) not in kept
    assert any(p.ndim == 2 for p in decay["params"])


def test_adamw_settings_and_fused_auto_off_on_cpu():
    model = compose(small_model_dict(), seed=0)
    opt = build_optimizer(
        model, {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05, "betas": [0.8, 0.9], "eps": 1e-6, "fused": "auto"}
    )
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["lr"] == 1e-3 and opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["eps"] == 1e-6
    assert not opt.defaults.get("fused")
    with pytest.raises(ConfigError, match="optim.betas"):
        build_optimizer(model, {"lr": 1e-3, "betas": [0.9]})


# ----------------------------------------------------------------------------- schedules
def test_schedules_warm_up_then_decay_to_min_lr():
    # warmup: (step + 1) / (warmup + 1) of the peak
    assert lr_factor(0, "cosine", 4, 100, 0.1) == pytest.approx(1 / 5)
    assert lr_factor(3, "cosine", 4, 100, 0.1) == pytest.approx(4 / 5)
    assert lr_factor(4, "cosine", 4, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(52, "cosine", 4, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: mid point
    assert lr_factor(100, "cosine", 4, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(500, "cosine", 4, 100, 0.1) == pytest.approx(0.1)  # stays at min_lr
    assert lr_factor(52, "linear", 4, 100, 0.0) == pytest.approx(0.5)
    assert lr_factor(90, "constant", 4, 100, 0.0) == 1.0

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    sched = build_scheduler(opt, {"name": "cosine", "warmup_steps": 2, "min_lr": 0.1}, max_steps=10)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False))  # monotone decay after warmup
    assert lrs[10] == pytest.approx(0.1) and lrs[11] == pytest.approx(0.1)
    # the schedule's state survives a checkpoint round trip
    again = build_scheduler(
        torch.optim.AdamW(model.parameters(), lr=1.0),
        {"name": "cosine", "warmup_steps": 2, "min_lr": 0.1},
        max_steps=10,
    )
    again.load_state_dict(sched.state_dict())
    assert again.last_epoch == sched.last_epoch


def test_scheduler_config_errors_name_the_key():
    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    with pytest.raises(ConfigError, match="scheduler.min_lr") as info:
        build_scheduler(opt, {"name": "cosine", "warmup_steps": 0, "min_lr": 1.0}, max_steps=10)
    assert "optim.lr" in str(info.value)
    with pytest.raises(ConfigError, match="scheduler.name.*'cosin'"):
        build_scheduler(opt, {"name": "cosin"}, max_steps=10)


# ----------------------------------------------------------------------------- atomic checkpoints
def test_atomic_checkpoint_survives_a_failed_write(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    good = path.read_bytes()

    def crash(obj, f, *args, **kwargs):  # writes half a checkpoint (f: the temp file, open), then fails
        f.write(good[: len(good) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temp file left
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1


CHILD = """
import sys, torch
from composer.checkpoint_io import AtomicCheckpointIO
io = AtomicCheckpointIO()
step = 0
while True:
    step += 1
    io.save_checkpoint({"step": step, "w": torch.full((4_000_000,), float(step))}, sys.argv[1])
    print(step, flush=True)
"""


def test_atomic_checkpoint_killed_mid_write_keeps_a_complete_file(tmp_path):
    """SIGKILL a process that rewrites a 16 MB checkpoint in a loop: the file on disk is always a
    complete checkpoint (the previous or the new one), never a partial one."""
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(path)], stdout=subprocess.PIPE, text=True, env=cli_env()
    )
    try:
        for _ in range(3):  # a few complete saves, then kill at an arbitrary moment of the next one
            assert proc.stdout.readline().strip(), "the child process died"
        time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] >= 3 and torch.equal(ckpt["w"], torch.full((4_000_000,), float(ckpt["step"])))


# ----------------------------------------------------------------------------- config validation
def test_config_problems_all_reported_with_their_keys():
    cfg = load_config(
        [
            "trainer.max_steps=0",
            "trainer.precision=fp8",
            "optim.lr=-1",
            "trainer.val_check_interval=0",
            "+trainer.max_epoch=3",
            "callbacks.progress_bar=fancy",
            "ckpt_path=/nonexistent.ckpt",
        ]
    )
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    text = str(info.value)
    for key in (
        "trainer.max_steps",
        "trainer.precision",
        "optim.lr",
        "trainer.val_check_interval",
        "trainer.max_epoch",
        "callbacks.progress_bar",
        "ckpt_path",
    ):
        assert key in text, key
    assert "did you mean 'max_epochs'" in text


def test_non_finite_numbers_fail_validation():
    """inf and nan are floats but no setting: clipping, validation batches, lr and min_lr reject them."""
    cfg = load_config(
        ["trainer.gradient_clip_val=inf", "trainer.limit_val_batches=nan", "optim.lr=nan", "scheduler.min_lr=-inf"]
    )
    assert math.isinf(cfg.trainer.gradient_clip_val) and math.isnan(cfg.optim.lr)  # Hydra reads them as floats
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    paths = {p.path for p in info.value.problems}
    assert {"trainer.gradient_clip_val", "trainer.limit_val_batches", "optim.lr", "scheduler.min_lr"} <= paths
    assert "inf must be a number >= 0 or null" in str(info.value)
    check_config(load_config(["trainer.gradient_clip_val=1.0", "trainer.limit_val_batches=0.5", "optim.lr=1e-3"]))


def test_reserved_trainer_keys_point_to_their_config_group():
    problems = check_trainer({"precision": "32-true", "callbacks": [], "max_steps": 5})
    assert any(p.path == "trainer.callbacks" and "callbacks.*" in p.fix for p in problems)


def test_16_mixed_needs_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="trainer.precision.*bf16-mixed"):
        check_config(load_config(["trainer.precision=16-mixed"]))
    check_config(load_config(["trainer.precision=bf16-true"]))
    with pytest.raises(ConfigError, match="trainer.strategy.*fsdp.*trainer=ddp"):
        check_config(load_config(["trainer=fsdp", "trainer.accelerator=cpu"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks Lightning for a GPU that must be missing")
def test_lightning_trainer_errors_become_config_errors(tmp_path):
    from composer.training import build_trainer

    cfg = load_config(["trainer.accelerator=gpu"])
    check_config(cfg)  # passes the static checks ...
    model = compose(small_model_dict(), device="meta")
    data = SimpleNamespace(tokenizer=None, task="lm", metric="answer_accuracy")
    with pytest.raises(ConfigError, match="trainer: .*(GPU|gpu|CUDA|cuda)"):  # ... Lightning's check names it
        build_trainer(cfg, tmp_path, model, data)


def test_corrupt_checkpoint_path_is_a_config_error(tmp_path):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ConfigError, match="ckpt_path.*not a PyTorch checkpoint"):
        check_config(load_config([f"ckpt_path={bad}"]))


def _data(**kw):
    base = {"vocab_size": 65, "task": "lm", "num_classes": None, "name": "text", "tokenizer": None}
    return SimpleNamespace(**{**base, **kw})


def test_vocab_follows_the_data_unless_forced():
    base = resolve_model_config(load_config([]).model)
    out = fit_model_to_data(base, _data(), {"tokenizer": "char"}, user_keys=set())
    assert out.vocab_size == 65
    big = fit_model_to_data(base.replace(vocab_size=100), _data(), {"tokenizer": "char"}, user_keys={"vocab_size"})
    assert big.vocab_size == 100
    with pytest.raises(ConfigError) as info:
        fit_model_to_data(base.replace(vocab_size=10), _data(), {"tokenizer": "char"}, user_keys={"vocab_size"})
    assert "model.vocab_size" in str(info.value) and "data.tokenizer=char" in str(info.value)


def test_classification_data_needs_a_classification_head():
    lm = resolve_model_config(load_config([]).model)
    data = _data(task="classification", num_classes=3)
    with pytest.raises(ConfigError, match="model/head=classification.*model=bert_tiny"):
        fit_model_to_data(lm, data, {}, user_keys=set())
    bert = resolve_model_config(load_config(["model=bert_tiny"]).model)
    out = fit_model_to_data(bert, data, {}, user_keys=set())
    assert out.head.num_classes == 3 and out.head.type == "classification"
    compose(out, device="meta")
    with pytest.raises(ConfigError, match="model.head.*language modelling"):
        fit_model_to_data(bert, _data(), {}, user_keys=set())


def test_init_from_override_that_changes_a_shape_is_named():
    saved = compose(small_model_dict(), device="meta").config
    cfg = load_config(["model.hidden_size=64", "model.dropout=0.1"])
    with pytest.raises(ConfigError) as info:
        init_from_config(saved, cfg.model, {"hidden_size", "dropout"}, "runs/x/model")
    text = str(info.value)
    assert "model.hidden_size" in text and "init_from=runs/x/model" in text and "model.dropout" not in text
    merged = init_from_config(saved, cfg.model, {"dropout"}, "runs/x/model")
    assert merged.dropout == 0.1 and merged.hidden_size == saved.hidden_size


def _count_builds(monkeypatch, module) -> list:
    """The ``device`` of every ``compose`` call made through ``module`` from now on."""
    builds, real = [], module.compose

    def counting(config, *args, **kwargs):
        builds.append(kwargs.get("device"))
        return real(config, *args, **kwargs)

    monkeypatch.setattr(module, "compose", counting)
    return builds


def test_init_from_builds_the_saved_and_the_merged_model_once(monkeypatch):
    import composer.train_config

    builds = _count_builds(monkeypatch, composer.train_config)
    saved = compose(small_model_dict(), device="meta").config  # hidden 32 = 4 heads x 8
    assert init_from_config(saved, load_config([]).model, set(), "x") is saved and builds == []
    merged = init_from_config(
        saved, load_config(["model.dropout=0.1", "model.init_std=0.01"]).model, {"dropout", "init_std"}, "x"
    )
    assert (merged.dropout, merged.init_std, merged.hidden_size) == (0.1, 0.01, 32)
    assert builds == ["meta", "meta"]  # the saved and the merged model, nothing per override
    builds.clear()
    with pytest.raises(ConfigError, match="model.hidden_size"):
        init_from_config(saved, load_config(["model.hidden_size=64"]).model, {"hidden_size"}, "x")
    assert builds == ["meta"] * 3  # shapes differ: then each override alone, to name it
    # 8 heads x 4 keeps every shape although head_dim=4 alone would not: the merged config decides
    cfg = load_config(["model.num_heads=8", "model.attention.head_dim=4"]).model
    merged = init_from_config(saved, cfg, {"num_heads", "attention.head_dim"}, "x")
    assert (merged.num_heads, merged.attention.head_dim) == (8, 4)
    # 8 heads x 8 changes the attention's shapes although neither override does alone
    cfg = load_config(["model.num_heads=8", "model.attention.head_dim=8"]).model
    with pytest.raises(ConfigError, match="model.attention.head_dim, model.num_heads: together change"):
        init_from_config(saved, cfg, {"num_heads", "attention.head_dim"}, "x")


def test_prepare_builds_the_model_once(monkeypatch):
    """No meta model beside the real one: compose validates the final config before allocating."""
    import composer.run
    import composer.train_config

    builds = _count_builds(monkeypatch, composer.run)
    config_builds = _count_builds(monkeypatch, composer.train_config)
    prepared = composer.run.prepare(load_config(TINY), TINY)
    assert builds == [None] and config_builds == []
    assert prepared.model.config.vocab_size == 16  # fitted to the data (data.vocab_size=16)
    assert prepared.config["trainer"]["max_steps"] == 6  # the validated config, as plain data


# ----------------------------------------------------------------------------- the run record
def test_run_record_writes_the_fields_the_run_reached(tmp_path):
    """metrics.json holds the fields the run got to (in the record's order), nulls for values it
    reached without one; non-finite numbers are written as null."""
    record = RunRecord(overrides=["seed=1"], seed=1, run_dir=str(tmp_path))
    assert list(record.to_dict()) == ["status", "error", "overrides", "seed", "run_dir"]
    assert not record.steps  # not reached: false, like a missing key
    record.steps, record.val_loss, record.val_ppl = 3, float("inf"), None
    record.fail(ValueError("boom"), wall_s=1.5)
    written = json.loads(write_metrics(tmp_path, record).read_text())
    assert list(written) == [
        "status", "error", "overrides", "seed", "run_dir", "steps", "val_loss", "val_ppl", "error_type", "wall_s"
    ]  # fmt: skip
    assert written["status"] == "failed" and written["error"] == "boom" and written["error_type"] == "ValueError"
    assert written["val_loss"] is None and written["val_ppl"] is None and written["steps"] == 3
    assert record.to_dict()["val_loss"] == float("inf")  # the record itself keeps the value


# ----------------------------------------------------------------------------- command line pre-checks
def test_precheck_reports_bad_overrides_as_config_errors():
    with pytest.raises(ConfigError, match="trainer.max_step.*max_steps"):
        precheck(["trainer.max_step=3"])
    with pytest.raises(ConfigError, match="model"):
        precheck(["-m", "model=tiny,no_such_preset"])  # the second job of the sweep
    precheck(["-m", "model/attention=mha,gqa", "seed=1,2"])


def test_sweep_jobs_enumerate_choices_and_skip_sampled_intervals():
    jobs, complete = _sweep_jobs(["model/attention=mha,gqa", "seed=range(1,3)", "optim.lr=interval(0.001,0.01)", "a=1"])
    assert not complete  # the interval's values are the sweeper's
    assert _sweep_jobs(["seed=1,2"]) == ([["seed=1"], ["seed=2"]], True)
    assert jobs == [
        ["model/attention=mha", "seed=1", "a=1"],
        ["model/attention=mha", "seed=2", "a=1"],
        ["model/attention=gqa", "seed=1", "a=1"],
        ["model/attention=gqa", "seed=2", "a=1"],
    ]


# ----------------------------------------------------------------------------- strategies and MFU
def test_fsdp_wraps_the_block_classes_and_checkpoints_through_the_strategy():
    from lightning.pytorch.strategies import FSDPStrategy

    model = compose(small_model_dict(gradient_checkpointing="every_layer"), seed=0)
    strategy = build_strategy(
        {"strategy": "fsdp", "strategy_options": {"activation_checkpointing": True, "sharding_strategy": "FULL_SHARD"}},
        model,
    )
    assert isinstance(strategy, FSDPStrategy)
    blocks = block_classes(model)
    assert blocks == {type(model.layers[0])}
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == blocks
    assert strategy.kwargs["use_orig_params"]  # per-parameter weight decay groups need the original params
    # the strategy recomputes the blocks ...
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == blocks
    assert model.config.gradient_checkpointing == "none"  # ... so the model does not as well
    assert build_strategy({"strategy": "ddp"}, model) == "ddp"


def test_cpu_threads_follow_the_idle_cores(monkeypatch):
    from composer.training import cpu_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "getloadavg", lambda: (5.3, 4.0, 3.0))
    assert cpu_threads("auto", "cpu") == 1  # a busy machine: one thread, no OpenMP oversubscription
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.1, 0.1))
    assert cpu_threads("auto", "auto") == 2
    assert cpu_threads(3, "cpu") == 3 and cpu_threads(None, "cpu") is None
    assert cpu_threads("auto", "gpu") is None
    assert any(p.path == "trainer.cpu_threads" for p in check_trainer({"precision": "32-true", "cpu_threads": 0}))


def test_no_mfu_on_cpu():
    assert peak_flops(torch.device("cpu"), "bf16-mixed") is None
    assert math.isfinite(lr_factor(0, "constant", 0, 1, 0.0))


# ----------------------------------------------------------------------------- experiments
def test_packaged_experiments_compose_and_override_the_groups():
    from composer.config import conf_dir

    names = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))
    assert {"char_text", "smoke"} <= set(names)
    for name in names:
        cfg = load_config(
            [f"experiment={name}", "data.path=any.txt"] if name == "char_text" else [f"experiment={name}"]
        )
        check_config(cfg)
        compose({**to_container(cfg.model), "vocab_size": 65}, device="meta")
    char = load_config(["experiment=char_text", "data.path=any.txt"])
    assert (char.model.name, char.model.num_layers, char.model.hidden_size) == ("gpt2", 4, 128)
    assert (char.data.name, char.data.tokenizer, char.data.seq_len, char.data.batch_size) == ("text", "char", 64, 12)
    assert char.trainer.max_steps == 2000


def test_plus_experiment_means_the_experiment_group():
    from composer.train import _normalise

    assert _normalise(["+experiment=smoke", "seed=1"]) == ["experiment=smoke", "seed=1"]
    precheck(_normalise(["+experiment=smoke"]))


def test_ranks_started_by_torchrun_or_slurm_do_not_write_hydra_folders(monkeypatch, capsys):
    from composer.train import main

    monkeypatch.setenv("RANK", "1")
    main(["--cfg", "hydra"])
    assert "output_subdir: null" in capsys.readouterr().out
    monkeypatch.setenv("RANK", "0")
    main(["--cfg", "hydra"])
    assert "output_subdir: .hydra" in capsys.readouterr().out


PEAK_SCRIPT = textwrap.dedent("""
    import torch
    from composer.memory import peak_memory, proc_status_mb, reset_peak_memory
    torch.set_num_threads(1)

    def train(rows):
        model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])
        opt = torch.optim.AdamW(model.parameters())
        for _ in range(3):
            model(torch.randn(rows, 512)).square().mean().backward()
            opt.step()
            opt.zero_grad()

    train(64)  # pages in the library code the steps run (file-backed: no trim returns them) before the base
    reset_peak_memory()
    base = proc_status_mb("VmRSS")
    train(8192)  # a first "run": training steps whose buffers glibc keeps after they are freed
    first_peak = peak_memory()["peak_rss_mb"]
    freed = proc_status_mb("VmRSS")
    start = reset_peak_memory()  # what a sweep's next run does first
    print(base, first_peak, freed, start, peak_memory()["peak_rss_mb"])
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and malloc_trim are Linux's")
def test_a_sweeps_next_run_starts_its_memory_count_from_what_it_holds():
    # glibc's thresholds pinned: buffers of up to 32 MiB come from the heap and freeing them never trims it
    # (what a long sweep process reaches by itself; glibc's own adaptive thresholds made the kept amount vary)
    env = {**cli_env(), "MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(16 << 30)}
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    base, first_peak, freed, start, new_peak = map(float, out.stdout.split())
    assert freed - base > 100, "the first run keeps freed memory (else this test shows nothing)"
    # most of it goes back to the OS, and the peak restarts from there
    assert start - base < 0.5 * (freed - base), (base, freed, start)
    assert new_peak - start < 20 and new_peak < first_peak - 100, (first_peak, start, new_peak)
