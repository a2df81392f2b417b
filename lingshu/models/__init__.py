"""Models of the benchmark: one package per model (its adapter in ``model.py``, its record in
``spec.py``), the interface they implement (:mod:`lingshu.models.base`), the harness between
files and models (:mod:`lingshu.models.harness`) and the shared training loop
(:mod:`lingshu.models.training`)."""
