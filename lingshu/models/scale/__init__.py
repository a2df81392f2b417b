"""SCALE (Chen et al. 2026, arXiv 2603.17380), reimplemented from the paper's description.

``network`` holds the hierarchical set-aware encoder, the condition aggregation, the JiT-style
endpoint network, the endpoint loss and the ODE sampler; ``model`` the benchmark adapter (the
PCA transport space, set sampling, training and prediction). Nothing is imported here, so that
reading the model's spec does not import torch.
"""
