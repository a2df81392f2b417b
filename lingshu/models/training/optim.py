"""AdamW parameter groups of the training loop: which parameters get weight decay.

Weight decay is applied to weight *matrices* only: a parameter is decayed when it has two or
more dimensions and is neither the weight of an ``nn.Embedding``/``nn.EmbeddingBag`` nor a bare
``nn.Parameter`` whose name contains ``emb`` (e.g. a learned positional embedding) or ``bias``
(e.g. Lingshu-Cell's per-gene head bias, a (genes, tokens) table of log-probabilities). Biases,
norm scales/shifts and every other 1-D parameter are not decayed (:func:`param_groups`).

``lr_scale`` ({name prefix: multiplier}) gives the parameters whose names start with a prefix a
learning rate that many times the schedule's (the longest matching prefix wins); each group
carries its multiplier as ``"lr_scale"``, which the loop applies at every step.
"""

from __future__ import annotations

from torch import nn

from lingshu.models.training.ddp import unwrap_model


def _scale_of(name: str, lr_scale: dict[str, float]) -> float:
    matches = [prefix for prefix in lr_scale if name.startswith(prefix)]
    return float(lr_scale[max(matches, key=len)]) if matches else 1.0


def param_groups(model: nn.Module, weight_decay: float,
                 lr_scale: dict[str, float] | None = None) -> list[dict]:
    """AdamW parameter groups: decay on weight matrices only, and learning-rate multipliers by
    parameter-name prefix (see module docstring)."""
    model = unwrap_model(model)
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
        for pname, p in module.named_parameters(recurse=False):
            if p.ndim < 2 or "emb" in pname.lower() or "bias" in pname.lower():
                no_decay_ids.add(id(p))
    lr_scale = dict(lr_scale or {})
    buckets: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (id(p) not in no_decay_ids, _scale_of(name, lr_scale))
        buckets.setdefault(key, []).append(p)
    groups = []
    for decayed in (True, False):  # decayed groups first, as before multipliers existed
        for (d, scale), params in buckets.items():
            if d == decayed:
                group = {"params": params, "weight_decay": weight_decay if d else 0.0}
                if scale != 1.0:
                    group["lr_scale"] = scale
                groups.append(group)
    return groups
