"""Train the notebook's AlexNet: `python train.py [overrides]`, `python train.py -m model.downscale=4,8,16`.

Thin entry point; the task is alexnet_lab.train.main. Config lives in conf/ (see README.md).
"""

import hydra
from omegaconf import DictConfig

from alexnet_lab.train import main as run_job


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    return run_job(cfg)


if __name__ == "__main__":
    main()
