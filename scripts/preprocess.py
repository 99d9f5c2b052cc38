"""Build (or find) the preprocessed cache of a raw folder and print a report.

    python scripts/preprocess.py                                   # the embedded data set
    python scripts/preprocess.py data=folder data.raw_dir=PATH     # your own download
    python scripts/preprocess.py data=folder data.raw_dir=PATH data.image_size=128 data.discard.min_copies=10

Training does the same on its first run (same `data` config, same cache); this shows what
was kept and discarded, and why, before any training. Bad input: one line on stderr, exit 2.
The command is alexnet_lab.cli.preprocess_command.
"""

from alexnet_lab.cli import preprocess_command

if __name__ == "__main__":
    preprocess_command()
