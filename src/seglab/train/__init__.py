"""Training: segmentation losses (``losses``), learning-rate schedules and the fit stage.

Submodules are imported explicitly (``from seglab.train.losses import get_loss``) so that importing
the package stays cheap and independent of the other training modules.
"""
