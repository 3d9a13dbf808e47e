"""cnnjax.tune: hyperparameter sweeps over the one training engine.

Submodules: `space` (grid and random search spaces over dotted config fields, trial ids),
`sweep` (`run_sweep`: each trial is one `train_and_evaluate` run in its own workdir; resumable
results table and plot), `diagnose` (learning-curve verdicts with evidence and recommended config
changes), `metrics_file` (a run's metrics.jsonl read and checked for them), `recipe`
(`run_tune`: rounds of sweeps, each planned from the diagnosis of the best trial so far;
resumable, with recipe.json), `regularizers` (the knobs it turns up when the best trial
overfits), `report` (report.md and tune.png from recipe.json) and `lr_range` (Smith's
learning-rate range test: the suggested learning rate of a config, from one short run).
"""
