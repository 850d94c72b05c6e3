"""The training stream every data module shares: exact resume, DDP sharding, workers, the factory, the configs."""

from __future__ import annotations

import inspect
import itertools
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from composer import ConfigError, conf_dir, load_config
from composer.data import DATAMODULES, RecallDataModule, build_datamodule, options


def recall(**kw) -> RecallDataModule:
    args = {"seed": 3, "vocab_size": 32, "num_pairs": 4, "seq_len": 16, "batch_size": 4, "num_val_examples": 8}
    dm = RecallDataModule(**{**args, **kw})
    dm.setup("fit")
    return dm


def take(dm, n: int) -> list[torch.Tensor]:
    return [b["input_ids"] for b in itertools.islice(iter(dm.train_dataloader()), n)]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_resume_from_state_dict_continues_the_stream_exactly():
    full = take(recall(), 9)
    resumed = recall()
    resumed.load_state_dict({"batches_consumed": 5})
    assert resumed.state_dict() == {"batches_consumed": 5}
    assert same(take(resumed, 4), full[5:])


def test_state_dict_counts_optimizer_steps_times_accumulation_under_a_trainer():
    dm = recall()
    dm.trainer = SimpleNamespace(global_step=3, accumulate_grad_batches=2, global_rank=0, world_size=1)
    assert dm.state_dict() == {"batches_consumed": 6}


def test_ranks_read_disjoint_shares_of_the_single_process_stream():
    single = take(recall(), 6)
    ranks = []
    for r in range(2):
        dm = recall()
        dm.rank, dm.world_size = r, 2
        ranks.append(take(dm, 3))
    assert same(ranks[0], single[0::2]) and same(ranks[1], single[1::2])
    assert not any(torch.equal(x, y) for x in ranks[0] for y in ranks[1])
    via_trainer = recall()
    via_trainer.trainer = SimpleNamespace(global_rank=1, world_size=2, global_step=0, accumulate_grad_batches=1)
    assert same(take(via_trainer, 3), ranks[1])


def test_resume_under_ddp_continues_each_rank():
    dm = recall()
    dm.rank, dm.world_size = 1, 2
    full = take(dm, 5)
    dm2 = recall()
    dm2.rank, dm2.world_size = 1, 2
    dm2.load_state_dict({"batches_consumed": 2})
    assert same(take(dm2, 3), full[2:])


def test_worker_processes_give_the_same_stream():
    assert same(take(recall(num_workers=2), 5), take(recall(), 5))


class Recorder(L.LightningModule):
    """Trains one scalar; records the training batches it sees."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].clone())
        return (self.w - batch["input_ids"].float().mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(max_steps: int, ckpt_path=None, save=None) -> list[torch.Tensor]:
    model = Recorder()
    trainer = L.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model, datamodule=recall(), ckpt_path=ckpt_path)
    if save:
        trainer.save_checkpoint(save)
    return model.seen


def test_lightning_resume_from_a_checkpoint_sees_the_uninterrupted_batches(tmp_path):
    uninterrupted = fit(5)
    first = fit(2, save=tmp_path / "step2.ckpt")
    second = fit(5, ckpt_path=tmp_path / "step2.ckpt")
    assert len(uninterrupted) == 10 and len(first) == 4
    assert same(first + second, uninterrupted)


def test_factory_rejects_unknown_names_and_keys():
    with pytest.raises(ConfigError, match="data.name"):
        build_datamodule({"name": "nope"}, seed=0)
    with pytest.raises(ConfigError) as err:
        build_datamodule({"name": "recall", "num_pair": 4}, seed=0)
    assert "data.num_pair" in str(err.value) and "did you mean 'num_pairs'" in str(err.value)


@pytest.mark.parametrize("name", sorted(DATAMODULES))
def test_each_yaml_lists_every_option_with_the_code_default(name):
    path = conf_dir() / "data" / f"{name}.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    assert cfg.pop("name") == name
    defaults = {k: (None if v is inspect.Parameter.empty else v) for k, v in options(name).items()}
    yaml = {k: (None if v == "???" else v) for k, v in cfg.items()}
    assert yaml == defaults
    text = path.read_text()
    assert all(
        f"{key}:" in line and "#" in line for key in cfg for line in text.splitlines() if line.startswith(f"{key}:")
    )


def test_hydra_composed_config_builds_each_module(tmp_path):
    (tmp_path / "t.txt").write_text("hello world, " * 300)
    cfg = load_config(["data=text", f"data.path={tmp_path / 't.txt'}", "data.seq_len=16", "data.batch_size=2"])
    dm = build_datamodule(cfg.data, seed=cfg.seed, model_max_positions=64)
    dm.setup("fit")
    assert dm.vocab_size == len(set("hello world, ")) + 1
    for fixed in ("path", "tokenizer", "seq_len", "batch_size", "val_fraction"):
        assert fixed in cfg.data
    assert load_config([]).data.name == "recall"
