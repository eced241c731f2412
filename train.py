"""Train a Spatial Intent Model.

python train.py                                  # defaults: SmolLM2-135M (offline GGUF), synthetic data
python train.py llm=opt125m data=cached data.train_split_path=... data.val_split_path=...
python train.py training.epochs=3 model.K=2      # any key
python train.py -m optim.lr=1e-3,3e-4            # a multirun sweep
torchrun --nproc_per_node=2 train.py ...         # DDP over 2 processes, one run directory
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from hydra_plugins.sim_basic_sweeper import use_as_basic
from sim.core.cli import fail_cleanly
from sim.training.distributed import launch_overrides
from sim.training.train import objective, train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | tuple[float, ...]:
    with fail_cleanly():
        result = train(cfg)
    return objective(result, cfg.objective)


if __name__ == "__main__":
    # Under torchrun: join the process group before Hydra resolves the run dir (one for all ranks).
    sys.argv.extend(launch_overrides())
    use_as_basic()
    main()
