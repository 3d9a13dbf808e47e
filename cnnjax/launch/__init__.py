"""cnnjax.launch: cluster jobs for the experiment entry points, written rather than hand-edited.

Submodules: `spec` (`JobSpec`: entry point, config files, overrides, resources, preemption
settings; `validate_spec` checks every field), `checks` (`count_trials` sizes a sweep's array from
its sweep file; `check_configs` loads the config files with the overrides before queueing) and
`slurm` (`render`: the complete sbatch script, with requeue on preemption). `python -m
launch.submit` is the command line (launch/README.md).
"""
