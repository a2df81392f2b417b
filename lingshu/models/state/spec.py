"""STATE's record for the pipeline (see :mod:`lingshu.models.spec`)."""

from lingshu.models.spec import ModelSpec

SPECS = (
    ModelSpec(
        name="state",
        cls="lingshu.models.state.model:StateModel",
        note="STATE (Arc Institute's State Transition model), trained and run by the arc-state "
        "package itself: sets of control cells plus a perturbation encoding through a "
        "bidirectional LLaMA to the perturbed set, energy-distance loss. Held-out perturbations "
        "reach it through the shared perturbation features.",
        env="state",
    ),
)
