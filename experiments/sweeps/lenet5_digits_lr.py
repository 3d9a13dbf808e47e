"""Learning-rate grid for LeNet-5 on `digits`: 4 trials of 200 steps (a sketch of the curve).

Command:
    python -m experiments.sweep --config=experiments/configs/lenet5_digits.py \\
        --sweep=experiments/sweeps/lenet5_digits_lr.py \\
        --sweep_dir=workdirs/sweeps/lenet5_digits_lr \\
        --config.num_train_steps=200 --config.eval_every_steps=100

Expected (measured with this command, 2 CPU cores, JAX 0.10.2, 2026-11-29): 23 s wall for the
whole sweep (4-5 s per trial, compilation included; 33 s and 5-8 s per trial on 2026-12-06, a
2-core AMD EPYC Zen 4 at load 1.5: the machine's speed varies); test top-1 after 200 steps, ranked:
    lr=0.3: 0.9805   lr=0.03: 0.9749   lr=0.003: 0.9192   lr=3.0: 0.4958 (unstable)
lr=3.0 is chaotic: its loss climbs into the hundreds and where it lands at step 200 follows float
rounding, so only its last place is reproducible (rerun 2026-12-03 on a 2-core AMD EPYC: the
other three exactly as above, lr=3.0 0.1003, chance, in two runs).
Rerunning the command skips the 4 finished trials (~7 s, just the table); results.csv and
sweep.png (top-1 against the learning rate, log x) are in --sweep_dir. A grid runs one trial per
combination of its values (here 4), so it sets no `num_trials`; to run fewer, `--max_trials=2`
starts only the first 2 unfinished trials. For a random search set
`kind = "random"`, `num_trials`, `seed` and, e.g.,
`parameters = (log_uniform("optimizer.learning_rate", 1e-3, 1.0),)` (cnnjax.tune.space).
"""

import ml_collections

from cnnjax.tune.space import choice


def get_config():
    config = ml_collections.ConfigDict()
    config.kind = "grid"  # or "random" (then add num_trials; it and seed pick the points)
    config.seed = 0
    config.metric = "top1"  # an eval metric: loss, top1, top5 (unset: the best_metric, top1)
    config.mode = ml_collections.FieldReference(None, field_type=str)  # None: by metric
    config.parameters = (choice("optimizer.learning_rate", (0.003, 0.03, 0.3, 3.0)),)
    return config
