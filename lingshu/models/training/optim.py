"""AdamW parameter groups of the training loop: which parameters get weight decay.

Weight decay is applied to weight *matrices* only: a parameter is decayed when it has two or
more dimensions and is neither the weight of an ``nn.Embedding``/``nn.EmbeddingBag`` nor a bare
``nn.Parameter`` whose name contains ``emb`` (e.g. a learned positional embedding). Biases,
norm scales/shifts and every other 1-D parameter are not decayed (:func:`param_groups`).
"""

from __future__ import annotations

from torch import nn

from lingshu.models.training.ddp import unwrap_model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decay on weight matrices only (see module docstring)."""
    model = unwrap_model(model)
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
        for pname, p in module.named_parameters(recurse=False):
            if p.ndim < 2 or "emb" in pname.lower():
                no_decay_ids.add(id(p))
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if id(p) in no_decay_ids else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
