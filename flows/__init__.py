"""Prefect flows over the DVC pipeline: `pipeline.seglab_pipeline` runs the stages with retries,
`retrain.retrain_if_changed` retrains when `dvc status` reports a change, `serve` schedules it.

Kept out of the `seglab` package on purpose: the flows orchestrate the `seglab <stage>` commands
that `dvc.yaml` declares and add nothing the pipeline itself depends on.
"""
