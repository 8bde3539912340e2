"""Evaluation: the evaluate stage, test-time augmentation, ensembles (the metrics are `seglab.metrics`).

Submodules are imported explicitly (``from seglab.evaluate.evaluate import ...``) so that importing
the package does not pull in Keras for NumPy-only users.
"""
