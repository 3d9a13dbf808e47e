"""cnnjax.train: the training engine (`train_and_evaluate`) and its parts.

Submodules: `state` (TrainState), `optim` (optax optimizers/schedules from config), `losses`,
`step` (per-device train/eval steps: classification, a detector's own `loss`/`detect` when
`config.task="detection"`, or per-pixel cross-entropy when `config.task="segmentation"`),
`parallel` (pmap / shard_map), `checkpoint` (orbax), `logging` (metrics.jsonl, TensorBoard,
plots, progress), `config` (schema and validation), `checks` (input-size check), `loop`
(train_and_evaluate); also `ema` (weight averaging), `mixing` (mixup/CutMix), `distill`
(knowledge distillation), `init_from` (warm start), `trained` (load_trained: use a finished
run), `preemption` (SIGTERM stops) and `distributed` (multi-host start).
"""

from cnnjax.train.config import default_config, validate_config
from cnnjax.train.loop import TrainingDivergedError, train_and_evaluate
from cnnjax.train.optim import build_optimizer, build_schedule, weight_decay_mask
from cnnjax.train.state import TrainState, create_train_state

__all__ = [
    "TrainState",
    "TrainingDivergedError",
    "build_optimizer",
    "build_schedule",
    "create_train_state",
    "default_config",
    "train_and_evaluate",
    "validate_config",
    "weight_decay_mask",
]
