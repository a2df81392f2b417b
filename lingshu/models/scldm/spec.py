"""scLDM's record for the pipeline (see :mod:`lingshu.models.spec`)."""

from lingshu.models.spec import ModelSpec

SPECS = (
    ModelSpec(
        name="scldm",
        cls="lingshu.models.scldm.model:ScLDM",
        note="scLDM (CZI's latent diffusion model, this project's implementation from the "
        "paper): a permutation-invariant negative-binomial autoencoder, then a Diffusion "
        "Transformer on its latent tokens trained by flow matching, sampled with classifier-free "
        "guidance.",
        pretrains=True,
        generates_from="fit",
        sampling_keys=frozenset({"guidance", "sample_steps", "sample_batch", "output"}),
        generation_keys=frozenset({"sample_steps", "sample_batch"}),
        fit_keys=frozenset({"dit_d_model", "dit_layers", "dit_heads", "flow_steps",
                            "flow_batch_size", "flow_lr", "condition_dropout",
                            "identity_dropout"}),
    ),
)
