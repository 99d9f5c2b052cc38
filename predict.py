"""Predict the class of images: `python predict.py ckpt_path=outputs/runs/RUN photo.jpg photos/ [out=preds.csv]`.

Arguments without `=` are image files or folders (so the shell's `photos/*.jpg` works);
the rest are Hydra overrides of conf/predict.yaml. The work is alexnet_lab.inference.predict_main.
"""

import sys

import hydra
from omegaconf import DictConfig

from alexnet_lab.inference import predict_main, split_path_arguments

sys.argv[1:], _PATHS = split_path_arguments(sys.argv[1:])  # Hydra only accepts key=value arguments


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    predict_main(cfg, _PATHS)


if __name__ == "__main__":
    main()
