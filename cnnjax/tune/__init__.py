"""cnnjax.tune: hyperparameter sweeps over the one training engine.

Submodules: `space` (grid and random search spaces over dotted config fields, trial ids) and
`sweep` (`run_sweep`: each trial is one `train_and_evaluate` run in its own workdir; resumable
results table and plot).
"""
