"""The job layer: what `python -m dreamlite_jax.main` runs on top of the library.

`stages` runs a job (the stage context, the registry of stage kinds, DONE/STARTED
records and staleness), `shared_models` and `stage_data` give every stage the job's
models and batches, `report` writes the job's report, `preemption` turns a stopped
trainer into a stopped job, and one `<kind>_stage` module per stage kind runs that kind.
The library (models, diffusion, training algorithms, rewards, evaluators, converters,
data pipelines) imports nothing from here.
"""
