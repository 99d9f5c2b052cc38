"""Train the notebook's AlexNet: `python train.py [overrides]`, `python train.py -m model.downscale=4,8,16`.

Thin entry point; the command is alexnet_lab.cli.train_command, the task alexnet_lab.train.
Config lives in conf/ (see README.md).
"""

from alexnet_lab.cli import train_command

if __name__ == "__main__":
    train_command()
