"""Lingshu-Cell's record for the pipeline (see :mod:`lingshu.models.spec`)."""

from lingshu.models.spec import ModelSpec

SPECS = (
    ModelSpec(
        name="lingshu",
        cls="lingshu.models.mddm.model:LingshuCell",
        note="Lingshu-Cell, the masked discrete diffusion model over the whole transcriptome "
        "(this project's implementation; pre-trained, then fine-tuned on the training cells).",
        pretrains=True,
        generates_from="pretrain",
        ddp=True,
        tokens=True,
        sampling_keys=frozenset({"guidance", "sample_steps", "sample_batch",
                                 "unconditional_steps", "prior_injection", "stratified"}),
        generation_keys=frozenset({"unconditional_steps", "sample_batch", "stratified"}),
        fit_keys=frozenset({"finetune_steps", "identity_dropout", "cond_lr_scale",
                             "full_mask_share", "calibrate_steps"}),
    ),
)
