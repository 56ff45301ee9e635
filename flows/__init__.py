"""Prefect flows: forget (manifest -> patches -> merged model -> report), audit (any model
-> report) and nightly (forget on manifests/nightly.yaml; fails when a gate fails). Flows
only wire tasks (tasks/); the work is in fmn.run.stages."""
