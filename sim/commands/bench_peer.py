"""The peer a user would otherwise pick: the same model under Lightning's Trainer, for `sim bench peer=true`.

The LightningModule holds the model `train.py` builds from the same overrides (same prefix, heads, loss
and batches), with its frozen LLM in fp32 and Lightning's `precision="bf16-mixed"` (autocast to bf16
over fp32 weights), gradient clipping and AdamW: what the Lightning documentation recommends for bf16.
Needs `pip install lightning` (the `peer` extra); nothing else in SIM imports it.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from omegaconf import DictConfig, open_dict

from sim.core.errors import ConfigError
from sim.evaluation.metrics import compute_losses
from sim.models.build import build_model
from sim.models.model import SimV0Model


def require_lightning() -> Any:
    try:
        import lightning
    except ImportError as exc:
        raise ConfigError("peer=true times a Lightning peer: pip install -e '.[peer]' (the lightning package)") from exc
    return lightning


def peer_model(cfg: DictConfig, dv: int | None) -> SimV0Model:
    """The model `cfg` builds as a Lightning user would hold it: the frozen LLM in fp32 with the
    library's own kernels (its default attention, unfused activations), no autocast of its own
    (Lightning adds it)."""
    fp32 = copy.deepcopy(cfg)
    with open_dict(fp32):
        fp32.llm.dtype, fp32.training.amp = "float32", False
        fp32.llm.attn_implementation, fp32.llm.fused_activations = None, False
        fp32.llm.packed_weights, fp32.llm.skip_unread_rows = False, False
    return build_model(fp32, dv, torch.device("cpu"))


def time_lightning_peer(
    cfg: DictConfig, dv: int | None, loader: Any, loss_weights: dict[str, float], steps: int, warmup: int
) -> dict[str, Any]:
    """Samples/s of `steps` Lightning training steps (after `warmup`), wall clock between batches included."""
    L: Any = require_lightning()  # optional dependency: typed as Any
    model = peer_model(cfg, dv)
    clip = float(cfg.training.grad_clip or 0.0) or None
    lr, weight_decay = float(cfg.optim.lr), float(cfg.optim.weight_decay)

    class Peer(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
            return compute_losses(self.model(batch), batch, loss_weights)["objective"]

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.model.trainable_parameters(), lr=lr, weight_decay=weight_decay)

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.start: float | None = None
            self.end = 0.0
            self.samples = 0
            self.seen = 0  # batches over epochs (batch_idx restarts each epoch)

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            if self.seen == warmup:
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.seen += 1
            if self.seen > warmup:
                self.samples += int(batch["telemetry"].shape[0])
                self.end = time.perf_counter()

    clock = Clock()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=warmup + steps,
        gradient_clip_val=clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[clock],
    )
    trainer.fit(Peer(), train_dataloaders=loader)
    if clock.start is None or not clock.samples:
        raise ConfigError(f"the Lightning peer ran fewer than warmup+1={warmup + 1} steps: the split is too small")
    seconds = clock.end - clock.start
    return {"samples_per_s": clock.samples / seconds, "seconds": seconds, "lightning": L.__version__}
