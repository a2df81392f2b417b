"""The three reference baselines' records for the pipeline (see :mod:`lingshu.models.spec`)."""

from lingshu.models.spec import ModelSpec

SPECS = (
    ModelSpec(
        name="control_mean",
        cls="lingshu.models.baselines.model:ControlMean",
        note="predicts no effect: the context's real control cells, resampled, so its "
        "pseudobulk is the control pseudobulk. Reference of the paper's average score.",
        baseline=True,
        reads_perturbation=False,
    ),
    ModelSpec(
        name="perturbation_mean",
        cls="lingshu.models.baselines.model:PerturbationMean",
        note="predicts the mean of the training perturbations (the Virtual Cell Challenge "
        "cell-mean baseline): the average effect, the same for every perturbation. Reference of "
        "the VCC score.",
        baseline=True,
        reads_perturbation=False,
    ),
    ModelSpec(
        name="linear",
        cls="lingshu.models.baselines.model:LinearModel",
        note="ridge regression on perturbation / context embeddings (Ahlmann-Eltze et al.): "
        "simple and hard to beat.",
        baseline=True,
    ),
)
