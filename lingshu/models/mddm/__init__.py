"""Lingshu-Cell, a masked discrete diffusion model over whole-transcriptome count tokens.

``network`` holds the network (SPEC 1.2), ``diffusion`` the masking, the loss and the sampler
(SPEC 1.3, 1.4); the count quantiser is :mod:`lingshu.tokens`.
"""

from lingshu.models.mddm.diffusion import diffusion_loss, mask_tokens, sample, unmask_schedule
from lingshu.models.mddm.network import PRESETS, LingshuNetwork, NetworkConfig, config_from_preset

__all__ = [
    "PRESETS",
    "LingshuNetwork",
    "NetworkConfig",
    "config_from_preset",
    "diffusion_loss",
    "mask_tokens",
    "sample",
    "unmask_schedule",
]
