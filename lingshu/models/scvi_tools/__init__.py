"""scVI (Lopez et al. 2018) run by the scvi-tools package, as a benchmark model.

``model`` holds the adapter (it imports torch and scvi-tools); ``spec`` its record for the
pipeline. Nothing is imported here, so that reading the model's spec stays light.
"""
