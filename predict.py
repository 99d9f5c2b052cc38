"""Predict the class of images: `python predict.py ckpt_path=outputs/runs/RUN photo.jpg photos/ [out=preds.csv]`.

Arguments without `=` are image files or folders (so the shell's `photos/*.jpg` works); the
rest are Hydra overrides. The work is alexnet_lab.inference.predict_main. Options:
PredictConfig in alexnet_lab/config.py.
"""

from alexnet_lab.cli import predict_command

if __name__ == "__main__":
    predict_command()
