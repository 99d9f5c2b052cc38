"""Evaluate a trained checkpoint: `python eval.py ckpt_path=outputs/runs/RUN` (its test split),
`python eval.py ckpt_path=RUN data=folder data.raw_dir=DIR` (every image of another folder).

Thin entry point; the work is alexnet_lab.inference.eval_main. Options in conf/eval.yaml.
"""

import hydra
from omegaconf import DictConfig

from alexnet_lab.inference import eval_main


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    eval_main(cfg)


if __name__ == "__main__":
    main()
