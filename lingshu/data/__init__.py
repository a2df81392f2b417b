"""The data layer: download, simulate, validate and preprocess, split, normalise."""
