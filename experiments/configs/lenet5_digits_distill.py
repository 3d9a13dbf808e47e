"""LeNet-5 on 10 labelled `digits` scans per class, distilled from `make train`'s LeNet-5.

Knowledge distillation (Hinton, Vinyals & Dean 2015; `cnnjax.train.distill`): the student trains
on (1 - alpha) * cross-entropy + alpha * T^2 * KL(teacher's || student's softmax at temperature
T), T = 4, alpha = 0.9, the teacher in eval mode on the same augmented batches. Commands:
    python -m experiments.train --config=experiments/configs/lenet5_digits.py \\
        --workdir=workdirs/lenet5_digits                       # the teacher (`make train`)
    python -m experiments.train --config=experiments/configs/lenet5_digits_distill.py \\
        --workdir=workdirs/lenet5_digits_distill
    python -m experiments.train --config=experiments/configs/lenet5_digits_distill.py:plain \\
        --workdir=workdirs/lenet5_digits_10pc                  # the same student, no teacher
`--config.distill.teacher_workdir=<run>` picks another teacher, `--config.seed=N` another seed.

Measured (2 CPU cores, JAX 0.10.2; the same 100 labelled scans, the first 10 of each class, for
every seed; 600 steps as `make train`; test top-1 on the 359 held-out scans):
    teacher (all 1,438 train scans):         98.05%
    student alone, seeds 0-4:               91.64 91.36 91.92 92.48 92.20  mean 91.92%
    student distilled (T=4), seeds 0-4:     93.87 94.43 94.15 94.71 95.26  mean 94.48%
    T=1 (no softening), seeds 0-2:          91.36 91.64 92.76  mean 91.92% (alone: 91.64%)
    T=8, seeds 0-2:                         95.26 94.15 94.43  mean 94.61%
Distillation gains 2.2 to 3.1 points on every seed (mean test loss 0.28 -> 0.17); at T=1 the
teacher's near one-hot outputs add little beyond the labels, which is why the paper softens them.
Runtime ~20 s per 600-step student run; the teacher's forward pass costs ~20% of the train
throughput (4,562 against 5,745 images/s, seed 0, back to back).
"""

from cnnjax.utils.validation import check_choice
from experiments.configs.lenet5_digits import get_config as teacher_config

ARMS = ("distill", "plain")


def get_config(arm: str | None = None):
    arm = check_choice("config", "argument", arm or "distill", ARMS)
    config = teacher_config()
    config.data.train_examples_per_class = 10
    if arm == "distill":
        config.distill.teacher_workdir = "workdirs/lenet5_digits"
    return config
