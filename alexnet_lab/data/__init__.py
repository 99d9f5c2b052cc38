"""Data flow: synthetic (embedded data set) -> preprocess (raw folder -> uint8 cache)
-> datamodule (cache -> batches) -> augment (batched tensor ops on the device)."""
