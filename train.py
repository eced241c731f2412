"""Train a Spatial Intent Model.

    python train.py                                  # defaults: SmolLM2-135M (offline GGUF), synthetic data
    python train.py llm=opt125m data=cached data.train_split_path=... data.val_split_path=...
    python train.py training.epochs=3 model.K=2      # any key
    python train.py -m optim.lr=1e-3,3e-4            # a multirun sweep
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sim.cli import fail_cleanly
from sim.train import objective, train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | tuple[float, ...]:
    with fail_cleanly():
        result = train(cfg)
    return objective(result, cfg.objective)


if __name__ == "__main__":
    main()
