"""Evaluate a trained checkpoint: `python eval.py ckpt_path=outputs/runs/RUN` (its test split),
`python eval.py ckpt_path=RUN data=folder data.raw_dir=DIR` (every image of another folder).

Thin entry point; the work is alexnet_lab.inference.eval_main. Options: EvalConfig in alexnet_lab/config.py.
"""

from alexnet_lab.cli import eval_command

if __name__ == "__main__":
    eval_command()
