"""Training: the `train@<model>` stage, by concern.

``run`` (the stage: plan, train, write artefacts) uses ``plan`` (what params.yaml and the shards
decide), ``loop`` (the recipe around Keras' fit), ``resume`` (per-epoch commits), ``schedules``,
``losses``, ``precision`` (dtype policy) and ``strategy`` (devices and workers); ``settings`` holds
one run's knobs, read from the typed config.

Submodules are imported explicitly (``from seglab.train.run import run_train``) so that importing
the package stays cheap.
"""
