"""SCALE's record for the pipeline (see :mod:`lingshu.models.spec`)."""

from lingshu.models.spec import ModelSpec

SPECS = (
    ModelSpec(
        name="scale",
        cls="lingshu.models.scale.model:ScaleModel",
        note="SCALE (this project's implementation from the paper's description): conditional "
        "transport of sets of control cells to the perturbed population in a PCA space, with a "
        "set-aware encoder, seed-attention condition aggregation, a Gaussian-control mixed prior "
        "and endpoint (x-prediction) flow training; held-out perturbations reach it through the "
        "shared perturbation features.",
        sampling_keys=frozenset({"guidance", "sample_steps", "decode"}),
    ),
)
