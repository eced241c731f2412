"""Evaluate a checkpoint on a split and write a report a person can read.

    python evaluate.py checkpoint=outputs/.../checkpoints/best.pt                 # the data option's val split
    python evaluate.py checkpoint=... data=cached data.val_split_path=DIR
    python evaluate.py checkpoint=... split=train risk_high_target_recall=0.99
    python evaluate.py checkpoint=... hydra.run.dir=reports/best                  # where the report goes

Writes metrics.json, per_class.json/.md, confusion_{risk,reason,action}.png, calibration.png and
predictions.jsonl into the run directory (default outputs/eval/<date>/<time>).
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sim.core.cli import fail_cleanly
from sim.evaluation.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    with fail_cleanly():
        report = evaluate(cfg, HydraConfig.get().runtime.output_dir)
    return report.get("risk_high_recall")


if __name__ == "__main__":
    main()
