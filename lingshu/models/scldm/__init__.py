"""scLDM (Palla et al., arXiv 2511.02986), reimplemented from its description (SPEC 3).

``autoencoder`` holds stage 1 (the permutation-invariant VAE with a negative-binomial head),
``latent`` stage 2 (the Diffusion Transformer, the flow-matching loss and the guided Euler
sampler), ``layers`` the transformer pieces both use. The benchmark adapter is
:mod:`lingshu.models.scldm_model`.
"""

from lingshu.models.scldm.autoencoder import (
    AutoencoderConfig,
    ScLDMAutoencoder,
    nb_log_likelihood,
    reconstruction_pearson,
)
from lingshu.models.scldm.latent import (
    DiTConfig,
    LatentDiT,
    euler_sample,
    flow_matching_loss,
    guided_velocity,
)

__all__ = [
    "AutoencoderConfig",
    "DiTConfig",
    "LatentDiT",
    "ScLDMAutoencoder",
    "euler_sample",
    "flow_matching_loss",
    "guided_velocity",
    "nb_log_likelihood",
    "reconstruction_pearson",
]
