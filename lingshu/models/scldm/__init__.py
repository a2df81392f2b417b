"""scLDM (Palla et al., arXiv 2511.02986), reimplemented from its description (SPEC 3).

``autoencoder`` holds stage 1 (the permutation-invariant VAE with a negative-binomial head),
``latent`` stage 2 (the Diffusion Transformer, the flow-matching loss and the guided Euler
sampler), ``layers`` the transformer pieces both use, ``model`` the benchmark adapter. Nothing
is imported here, so that reading the model's spec does not import torch.
"""
