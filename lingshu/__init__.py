"""lingshu-bench: a benchmark of generative virtual-cell models on perturbation prediction.

The package is what the Snakemake rules call (``python -m lingshu <command>``); every stage is
also a plain Python function so it can be tested and reused without Snakemake.
"""

__version__ = "0.1.0"
