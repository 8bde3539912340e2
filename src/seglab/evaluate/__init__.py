"""Evaluation: streaming confusion-matrix metrics (``metrics``), test-time augmentation, ensembles.

Submodules are imported explicitly (``from seglab.evaluate.metrics import ...``) so that importing
the package does not pull in Keras for NumPy-only users.
"""
