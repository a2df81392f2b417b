"""Lingshu-Cell, a masked discrete diffusion model over whole-transcriptome count tokens.

``network`` holds the network (SPEC 1.2), ``diffusion`` the masking, the loss and the sampler
(SPEC 1.3, 1.4), ``model`` the benchmark adapter (tokens in, cells out); the count quantiser
is :mod:`lingshu.tokens` and the training loop :mod:`lingshu.models.training`. Nothing is
imported here, so that reading the model's spec does not import torch.
"""
