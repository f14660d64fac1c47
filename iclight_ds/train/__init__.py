"""Training: run resolution, the DeepSpeed engine, objectives, conditioning, the loop, checkpoints, metrics, the
memory planner, export and the command line. `python -m iclight_ds.train` runs `cli.main`."""
