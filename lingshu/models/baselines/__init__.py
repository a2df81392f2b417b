"""The reference baselines (control mean, perturbation mean, linear); classes in ``model``."""
