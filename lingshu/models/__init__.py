"""Models of the benchmark. Every model implements :class:`lingshu.models.base.PerturbationModel`
and is registered by name in :data:`lingshu.models.registry.MODELS`."""
