"""The trainer's seam for loggers, early stopping and sweep pruning."""

from __future__ import annotations

from conftest import TINY, make_cfg

from sim.core.run import RunDir, read_jsonl
from sim.training.callbacks import Callback
from sim.training.trainer import Trainer

SMALL = [
    *TINY,
    "data.train_kwargs.num_samples=64",
    "data.val_kwargs.num_samples=32",
    "data.batch_size=32",
    "training.epochs=4",
]


class Recorder(Callback):
    def __init__(self, stop_after: int) -> None:
        self.calls: list[tuple] = []
        self.stop_after = stop_after

    def on_fit_start(self, trainer):
        self.calls.append(("start",))

    def on_epoch_end(self, trainer, epoch, train, val, is_best):
        self.calls.append(("epoch", epoch, val["loss"], is_best))
        trainer.should_stop = epoch >= self.stop_after

    def on_fit_end(self, trainer, result):
        self.calls.append(("end", result["best_epoch"]))


def test_callbacks_see_every_epoch_and_can_stop_training(tmp_path):
    recorder = Recorder(stop_after=2)
    trainer = Trainer(make_cfg(*SMALL), RunDir(tmp_path), callbacks=[recorder])
    trainer.setup()
    result = trainer.fit()
    val = read_jsonl(tmp_path / "metrics" / "val_metrics.jsonl")
    assert [r["epoch"] for r in val] == [1, 2], "training went on after a callback asked it to stop"
    assert recorder.calls[0] == ("start",) and recorder.calls[-1] == ("end", result["best_epoch"])
    assert [c[1:3] for c in recorder.calls if c[0] == "epoch"] == [(r["epoch"], r["loss"]) for r in val]
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
