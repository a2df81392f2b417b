"""scVI's record for the pipeline (see :mod:`lingshu.models.spec`)."""

from lingshu.models.spec import ModelSpec

SPECS = (
    ModelSpec(
        name="scvi",
        cls="lingshu.models.scvi_tools.model:ScviModel",
        note="scVI (scvi-tools): a zero-inflated negative-binomial VAE on the training counts with context, "
        "batch and perturbation (identity plus the shared perturbation features) as decoder "
        "covariates; a condition is predicted by decoding the context's control cells' latents "
        "with the perturbation's covariates set.",
        generates_from="fit",
    ),
)
