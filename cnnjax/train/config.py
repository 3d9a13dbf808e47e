"""The engine's config schema, its validation, and the workdir compatibility check.

`default_config()` lists every field `train_and_evaluate` reads, with defaults; experiment configs
start from it. `validate_config` rejects bad values with a `ValueError` naming the field, the value
and what is valid — in Python, before anything is traced or compiled.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from typing import Any

import ml_collections
from absl import logging
from ml_collections import config_dict

from cnnjax.layers.batch_norm_impl import BATCH_NORM_IMPLS
from cnnjax.layers.conv_impl import CONV_IMPLS
from cnnjax.models.registry import (
    ENGINE_FIELDS_DOC,
    ENGINE_KEYWORDS,
    ENGINE_MODEL_FIELDS,
    TASKS,
    field_list,
    missing_engine_fields,
)
from cnnjax.train import distill as distill_lib
from cnnjax.train import ema as ema_lib
from cnnjax.train import mixing as mixing_lib
from cnnjax.train.optim import MAX_STEPS, OPTIMIZERS, SCHEDULES, check_optimization
from cnnjax.train.parallel import MODES as PARALLEL_MODES
from cnnjax.train.state import check_freeze
from cnnjax.utils import callables
from cnnjax.utils.files import same_directory
from cnnjax.utils.validation import (
    check_bool,
    check_choice,
    check_known_fields,
    check_number,
    check_positive_float,
    check_positive_int,
    invalid,
)

COMPUTE_DTYPES = ("float32", "bfloat16")
# What `best_metric` may name, per task (the eval metrics the loop reports).
EVAL_METRICS = ("loss", "top1", "top5")
DETECTION_METRICS = ("map50", "map", "coco_map50", "coco_map75", "map50_voc07")
SEGMENTATION_METRICS = ("loss", "pixel_accuracy", "miou")
TASK_METRICS = {"classification": EVAL_METRICS, "detection": DETECTION_METRICS,
                "segmentation": SEGMENTATION_METRICS}
# The score each task's learning-curve plot shows beside the loss.
TASK_PLOT_METRIC = {"classification": "top1", "detection": "map50", "segmentation": "miou"}
# Fields added to the schema after workdirs were written: the value an older config.json (which
# lacks the field) implicitly had, so those workdirs still resume.
MIXING_DEFAULTS = dataclasses.asdict(mixing_lib.Mixing())  # mixing off
EMA_DEFAULTS = {"decay": None, "warmup": True}  # no weight average
LEGACY_DEFAULTS = {"task": "classification", "grad_accum_steps": 1,
                   "ema": EMA_DEFAULTS, "mixing": MIXING_DEFAULTS,
                   "data": {"randaugment_layers": 0, "randaugment_magnitude": 9.0,
                            "grey_to_rgb": False},
                   "distill": distill_lib.DISTILL_DEFAULTS}
# init_from.* fields added later, for `incompatible_fields` only (a config.json without an
# init_from block must not gain a partial one: `with_legacy_defaults` leaves init_from alone).
WARM_START_LEGACY_DEFAULTS = {"init_from.ema": False}
# Every field of `config.init_from` (`default_config` declares them); any other key is refused.
INIT_FROM_FIELDS = ("workdir", "step", "exclude", "submodule", "ema")
# Fields that may change between a run and its resumption. They do not alter what is trained,
# except that a different device count (num_devices, or the machine's when it is 0) changes the
# per-device details of the trajectory (dropout keys, the detectors' anchor/RoI sampling keys,
# mixing pairs, accumulation micro-batches, float summation order): allowed (a requeued job may
# land on another machine), and warned about on resume (`_Run.warn_if_devices_changed`,
# summary.json's `device_counts`). `batch_norm_impl` changes float summation order only: workdirs
# saved before it existed ran flax's BatchNorm, and those saved with "auto" in session 20 did too
# (flax's was "auto" then); they resume under today's "auto" (the matmul sums on CPU).
RUNTIME_FIELDS = frozenset(
    {
        "restart",
        "log_every_steps",
        "eval_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "progress_bar",
        "parallel",
        "num_devices",
        "async_checkpoints",
        "tensorboard",
        "eval_batch_size",
        "data.data_dir",
        "data.cache",
        "distributed",
        "max_loss",
        "batch_norm_impl",
    }
)


def default_config() -> ml_collections.ConfigDict:
    """Every field the engine reads, with defaults (a data config is filled in by experiments)."""
    c = ml_collections.ConfigDict()
    # "classification" (logits, cross-entropy, top-1/top-5), "detection" (the model's own
    # `loss` and `detect` methods on `cnnjax.data.detection` batches, mAP; best_metric "map50")
    # or "segmentation" (per-pixel logits, cross-entropy, pixel accuracy and mean IoU on
    # `cnnjax.data.segmentation` batches; best_metric "miou").
    c.task = "classification"
    c.model = "lenet5"
    # Keyword arguments for the model factory; None entries mean "the model's default" and are not
    # passed. Config files declare the model's fields with `model_kwargs_config(config.model)` so
    # that `--config.model_kwargs.<field>=<value>` works on the command line.
    c.model_kwargs = ml_collections.ConfigDict()
    c.num_classes = ml_collections.FieldReference(None, field_type=int)  # None: the dataset's
    c.data = ml_collections.ConfigDict({"name": "digits"})
    c.seed = 0
    c.global_batch_size = 128
    c.eval_batch_size = ml_collections.FieldReference(None, field_type=int)  # None: global batch
    c.num_train_steps = 1000
    # Gradient accumulation: each device's batch runs as this many equal micro-batches in
    # sequence and their mean gradient makes one optimizer step (less activation memory, same
    # global batch; BatchNorm sees micro-batches). 1: off.
    c.grad_accum_steps = 1
    # Weight averaging (cnnjax.train.ema): decay None is off; e.g. 0.999 keeps an exponential
    # moving average of params and BatchNorm statistics that every eval also scores (ema_top1,
    # ema_loss, ...: best_metric may name them). warmup: decay min(decay, (1+t)/(10+t)).
    c.ema = ml_collections.ConfigDict(
        {"decay": ml_collections.FieldReference(None, field_type=float), "warmup": True})
    # mixup (Zhang et al. 2018) / CutMix (Yun et al. 2019) of each device's train batch with its
    # reverse (cnnjax.train.mixing), classification only: lam ~ Beta(alpha, alpha); an alpha of 0
    # turns that method off; with both on, CutMix with probability switch_prob; a batch is mixed
    # with probability prob. E.g. mixup_alpha=0.2 (ImageNet) or cutmix_alpha=1.0.
    c.mixing = ml_collections.ConfigDict(MIXING_DEFAULTS)
    # Knowledge distillation (cnnjax.train.distill; Hinton et al. 2015), classification only:
    # teacher_workdir names a trained classification run (None: off); teacher_step None is its
    # best checkpoint (as load_trained picks it), ema its weight average. The loss is
    # (1 - alpha) * CE + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)).
    c.distill = ml_collections.ConfigDict({
        "teacher_workdir": ml_collections.FieldReference(None, field_type=str),
        "teacher_step": ml_collections.FieldReference(None, field_type=int),
        "ema": False, "temperature": 4.0, "alpha": 0.9})
    c.label_smoothing = 0.0
    c.aux_loss_weight = 0.3  # weight of auxiliary classifiers' loss (GoogLeNet aux_logits=True)
    # Divergence: a NaN/inf training loss, or one above max_loss (cross-entropy starts near
    # ln(num_classes) <= 7; 1000 nats means the run has blown up even if tanh/saturation keeps it
    # finite). None: only NaN/inf count.
    c.max_loss = ml_collections.FieldReference(1000.0, field_type=float)
    c.compute_dtype = "float32"  # 'bfloat16': mixed precision (params/optimizer stay float32)
    c.parallel = "pmap"  # or 'shard_map'
    # How nn.Conv layers are lowered (cnnjax.layers.conv_impl): 'auto' = patches+matmul for
    # convolutions with tiny output maps on CPU (4x faster ResNet-18 at 32x32) and XLA's own with
    # a stored input for the rest (1.1-1.35x faster ResNets); XLA's own off CPU.
    c.conv_impl = "auto"
    # How training-mode BatchNorms are lowered (cnnjax.layers.batch_norm_impl): 'auto' = channel
    # sums as matrix-vector products on CPU (up to 1.4x faster CIFAR ResNet-18 step, and closer
    # to float64 than flax's under cnnjax's CPU flags), flax's own elsewhere.
    c.batch_norm_impl = "auto"
    c.num_devices = 0  # 0: every local device
    c.optimizer = ml_collections.ConfigDict(
        {
            "name": "sgd",
            "learning_rate": 0.1,
            "momentum": 0.9,
            "nesterov": False,
            "weight_decay": 0.0,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "decay": 0.9,
            "grad_clip_norm": ml_collections.FieldReference(None, field_type=float),
        }
    )
    c.schedule = ml_collections.ConfigDict(
        {
            "name": "cosine",
            "boundaries": (),
            "decay_factor": 0.1,
            "transition_steps": 1000,
            "decay_rate": 0.1,
            "staircase": False,
            "alpha": 0.0,
            "warmup_steps": 0,
            "init_value": 0.0,
            "end_value": 0.0,
            "pct_start": 0.3,
            "div_factor": 25.0,
            "final_div_factor": 1e4,
        }
    )
    c.log_every_steps = 10
    c.eval_every_steps = 100
    c.checkpoint_every_steps = 100
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.best_metric = "top1"
    c.best_mode = "max"
    c.progress_bar = True
    c.tensorboard = True
    # True: a workdir holding checkpoints of an incompatible config is emptied and the run
    # starts fresh (instead of being refused). A run of this same config always resumes, so a
    # requeued job keeps its progress; delete the workdir to repeat a run from scratch.
    c.restart = False
    # True: jax.distributed.initialize() before anything else (as experiments.train's
    # --distributed flag; automatic in a task of an srun step with more than one task).
    c.distributed = False
    # Warm start / fine-tuning: a NEW run whose parameters and BatchNorm statistics come from
    # another run's checkpoint (optimizer state and step do not: they start fresh). Ignored when
    # this run's own workdir already has a checkpoint: resuming always wins, so a killed
    # fine-tune rerun with the same command continues exactly.
    c.init_from = ml_collections.ConfigDict(
        {
            # The source run's --workdir (its checkpoints/ and config.json); None: no warm start.
            "workdir": ml_collections.FieldReference(None, field_type=str),
            # Which of its checkpoints; None: its best one by the source run's best_metric among
            # the kept checkpoints that were evaluated (metrics.jsonl), else its latest.
            "step": ml_collections.FieldReference(None, field_type=int),
            # Module names (top-level or nested) whose params/batch_stats are NOT loaded (kept
            # freshly initialized): the classifier `head` by default, so a different num_classes
            # works; nested `head`s included (GoogLeNet's aux1/head, aux2/head).
            "exclude": ("head",),
            # None: the source's variables at the same paths. A top-level module name, e.g.
            # 'backbone': the source's variables go into that module of the new model (an FCN's
            # ResNet trunk from a resnet18 classifier run or converted torchvision weights;
            # the source's own head is ignored and every other module starts fresh). Unused
            # without a workdir, so a config can set it and still train from scratch.
            "submodule": ml_collections.FieldReference(None, field_type=str),
            # True: load the source run's weight average (its config.ema) instead of its
            # weights, from the checkpoint chosen as above.
            "ema": False,
        }
    )
    # None: train every parameter. 'backbone': train only the head (the top-level modules in
    # cnnjax.models.heads.HEAD_MODULES, i.e. `head`; FCN's score/upsampling layers; and nested
    # `head`s: GoogLeNet's auxiliary classifiers' aux1/head, aux2/head), i.e. a
    # linear probe: every other parameter, BatchNorm scale/bias included, gets an exactly zero
    # update (-0.0, via heads.freeze_backbone, so it stays bitwise equal). Backbone BatchNorm
    # *running statistics* are not frozen: the train step runs the model in train mode, so BatchNorm
    # normalizes with batch statistics and keeps updating its running averages (as PyTorch does
    # with requires_grad=False but model.train()); eval uses those running averages.
    # 'backbone_eval': the same head-only training with every BatchNorm, Dropout and DropPath
    # outside the head in eval mode (heads.backbone_eval_mode): running statistics used and left
    # unchanged, no dropout, i.e. the linear-evaluation protocol (MoCo's main_lincls.py).
    c.freeze = ml_collections.FieldReference(None, field_type=str)
    return c


_FIELD_TYPES = {"bool": bool, "int": int, "float": float, "str": str, "tuple": tuple}


def _field_type(value: Any, annotation: Any) -> type | None:
    """The command-line type of a model field: its default's type, else its annotation's."""
    if type(value) in _FIELD_TYPES.values():
        return type(value)
    if value is None:  # e.g. `pool_size: int | None = None`
        match = re.match(r"\s*(bool|int|float|str|tuple)\b", str(annotation))
        return _FIELD_TYPES[match.group(1)] if match else None
    return None  # callables, classes, dtypes: settable only from Python


def model_kwargs_config(model: str) -> ml_collections.ConfigDict:
    """Declares `model`'s hyperparameters for `config.model_kwargs`, each `None` (= its default).

    `python -m experiments.train` locks the config (typos in `--config.x=y` fail), so
    `--config.model_kwargs.<field>=<value>` needs the field to exist. This returns a placeholder
    for every field of `models.settable_fields(model)` whose type the command line can express
    (bool, int, float, str, tuple), e.g. `activation` for lenet5 or `widths`/`shortcut` for
    resnet20_cifar (not `depth`, which that factory fixes, nor the engine's `num_classes`,
    `dtype`, `axis_name`).
    """
    from cnnjax.models import settable_fields  # deferred: imports every architecture

    fields = {name: config_dict.placeholder(kind)
              for name, field in settable_fields(model).items()
              if (kind := _field_type(field.default, field.annotation)) is not None}
    return ml_collections.ConfigDict(fields)


def model_kwargs(config: Any) -> dict[str, Any]:
    """The keyword arguments `config.model_kwargs` passes to the model factory (None dropped);
    a field the engine sets itself (`num_classes`, `dtype`, `axis_name`) is a named error, and
    so is a function or class that config.json could not name by import path (a lambda, a
    local function): the run could not be resumed or reloaded."""
    declared = config.get("model_kwargs") or {}
    kwargs = {key: value for key, value in declared.items() if value is not None}
    for key in sorted(set(kwargs) & ENGINE_MODEL_FIELDS):
        raise invalid("config", f"model_kwargs.{key}", kwargs[key],
                      "the engine sets it (num_classes: config.num_classes or the dataset's; "
                      "dtype: config.compute_dtype; axis_name: the data-parallel axis)")
    for key, value in kwargs.items():
        if callables.is_callable_value(value) and callables.callable_path(value) is None:
            raise invalid("config", f"model_kwargs.{key}", value,
                          "expected a module-level function or class (config.json saves it by "
                          "import path, e.g. jax.nn.gelu, so the run can resume and be "
                          "reloaded); define it at the top level of a module")
    return kwargs


def _field(config: Any, name: str, default: Any = None) -> Any:
    return config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)


def config_task(config: Any) -> str:
    """`config.task`, checked against `TASKS`; a config without one (written before the field
    existed) is a classification config."""
    return check_choice("config", "task", _field(config, "task", LEGACY_DEFAULTS["task"]), TASKS)


def init_from_workdir(config: Any) -> str | None:
    """`config.init_from.workdir`, or None when unset (or the config has no `init_from`)."""
    init_from = _field(config, "init_from")
    return init_from.get("workdir") if init_from is not None else None


def ema_rule(config: Any) -> ema_lib.ExponentialMovingAverage | None:
    """The weight average `config.ema` asks for, or None when `ema.decay` is None (`ema.warmup`
    and unknown keys are checked either way: a typo such as `ema.decy` would else leave decay
    unset and silently turn the average off)."""
    ema = _field(config, "ema")
    if ema is None:
        return None
    check_known_fields("ema", ema, EMA_DEFAULTS)
    warmup = check_bool("ema", "warmup", ema.get("warmup", True))
    if ema.get("decay") is None:
        return None
    ema_lib.check_ema(ema.decay, warmup, owner="ema")
    return ema_lib.ExponentialMovingAverage(ema.decay, warmup)


def eval_metrics(config: Any) -> tuple[str, ...]:
    """The eval metrics runs of `config` report: its task's (`TASK_METRICS`) and, when it keeps
    a weight average (`config.ema`), the same again with the `ema_` prefix."""
    metrics = tuple(TASK_METRICS[config_task(config)])
    if ema_rule(config) is None:
        return metrics
    return metrics + tuple(ema_lib.METRIC_PREFIX + name for name in metrics)


def lower_is_better(metric: str) -> bool:
    """True for a loss (`loss`, `ema_loss`); every other eval metric is an accuracy or mAP."""
    return metric.removeprefix(ema_lib.METRIC_PREFIX) == "loss"


def mixing_rule(config: Any) -> mixing_lib.Mixing | None:
    """The mixup/CutMix `config.mixing` asks for (checked; owner 'mixing'), or None when it never
    mixes (both alphas 0, or prob 0) or the config has no `mixing`."""
    mixing = _field(config, "mixing")
    if mixing is None:
        return None
    check_known_fields("mixing", mixing, [field.name for field in dataclasses.fields(
        mixing_lib.Mixing)])
    settings = {**MIXING_DEFAULTS, **mixing}
    mixing_lib.check_mixing("mixing", **settings)
    rule = mixing_lib.Mixing(**settings)
    return rule if rule.enabled else None


#: Fields every config has had (`LEGACY_DEFAULTS` fills in those added since): the engine reads
#: them as they are, so a config lacking one is refused by `check_required_fields` first.
REQUIRED_FIELDS = ("model", "data", "optimizer", "schedule", "global_batch_size",
                   "num_train_steps", "seed", "log_every_steps", "eval_every_steps",
                   "checkpoint_every_steps", "keep_checkpoints", "parallel", "compute_dtype",
                   "conv_impl", "best_metric", "best_mode", "label_smoothing", "aux_loss_weight",
                   "num_devices")
_MISSING = object()


def missing_required_fields(config: Any) -> list[str]:
    """The `REQUIRED_FIELDS` `config` lacks, in their order."""
    return [name for name in REQUIRED_FIELDS if _field(config, name, _MISSING) is _MISSING]


def check_required_fields(config: Any) -> None:
    """Refuses a config lacking any of `REQUIRED_FIELDS` (one written from scratch, e.g.
    `ConfigDict(dict(model="lenet5"))`) with a ValueError naming them all, where the first read
    of one raised a bare AttributeError."""
    missing = missing_required_fields(config)
    if missing:
        raise ValueError(
            f"config: fields {missing} are missing; a config file starts from "
            "cnnjax.train.config.default_config(), which declares every field with its "
            "default (config = default_config(); config.model = ...; return config)")


def validate_config(config: Any) -> None:
    """Raises a ValueError for any invalid engine field (names, rates, sizes, intervals)."""
    check_required_fields(config)
    task = config_task(config)
    if not isinstance(_field(config, "model"), str) or not config.model:
        raise invalid(
            "config", "model", _field(config, "model"), "expected a registered model name"
        )
    _check_task_of_known_model(config, task)
    check_choice("optimizer", "name", config.optimizer.name, OPTIMIZERS)
    check_choice("schedule", "name", config.schedule.name, SCHEDULES)
    check_positive_float("optimizer", "learning_rate", config.optimizer.learning_rate)
    check_positive_int("config", "global_batch_size", config.global_batch_size)
    if config.get("eval_batch_size") is not None:
        check_positive_int("config", "eval_batch_size", config.eval_batch_size)
    if check_positive_int("config", "num_train_steps", config.num_train_steps) > MAX_STEPS:
        raise invalid("config", "num_train_steps", config.num_train_steps,
                      f"expected a positive integer <= {MAX_STEPS} (2**31 - 1: the step counter "
                      "is int32)")
    seed = config.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise invalid("config", "seed", seed, "expected an integer 0 <= seed < 2**63")
    for name in (
        "log_every_steps",
        "eval_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
    ):
        check_positive_int("config", name, config[name])
    check_choice("config", "parallel", config.parallel, PARALLEL_MODES)
    check_choice("config", "compute_dtype", config.compute_dtype, COMPUTE_DTYPES)
    check_choice("config", "conv_impl", config.conv_impl, CONV_IMPLS)
    check_choice("config", "batch_norm_impl", config.get("batch_norm_impl", "auto"),
                 BATCH_NORM_IMPLS)
    check_positive_int("config", "grad_accum_steps", config.get("grad_accum_steps", 1))
    if mixing_rule(config) is not None and task != "classification":
        raise invalid("mixing", "mixup_alpha/cutmix_alpha",
                      (config.mixing.mixup_alpha, config.mixing.cutmix_alpha),
                      f"mixing needs class labels (config.task='classification', not {task!r}); "
                      "set both alphas to 0")
    distill_lib.validate_distill(config, task)
    if (isinstance(config.best_metric, str) and ema_rule(config) is None
            and config.best_metric.startswith(ema_lib.METRIC_PREFIX)):
        raise invalid("config", "best_metric", config.best_metric,
                      f"{ema_lib.METRIC_PREFIX}* metrics score a weight average, which this run "
                      "does not keep: set --config.ema.decay (e.g. 0.999) or pick one of "
                      f"{list(eval_metrics(config))}")
    check_choice("config", "best_metric", config.best_metric, eval_metrics(config))
    check_choice("config", "best_mode", config.best_mode, ("max", "min"))
    expected_mode = "min" if lower_is_better(config.best_metric) else "max"
    if config.best_mode != expected_mode:  # else "best" would be the worst checkpoint
        raise invalid("config", "best_mode", config.best_mode,
                      f"expected {expected_mode!r} for best_metric={config.best_metric!r} (lower "
                      f"is better only for a loss); set --config.best_mode={expected_mode}")
    smoothing = check_number("config", "label_smoothing", config.label_smoothing,
                             "expected 0 <= label_smoothing < 1 (0: off)", low=0.0, high=1.0,
                             high_open=True)
    if smoothing and task != "classification":  # the detection/segmentation losses ignore it
        raise invalid("config", "label_smoothing", config.label_smoothing,
                      f"label smoothing needs class labels (config.task='classification', not "
                      f"{task!r}); set label_smoothing=0")
    check_number("config", "aux_loss_weight", config.aux_loss_weight,
                 "expected a finite number >= 0", low=0.0, high=math.inf, high_open=True,
                 strings=False)  # make_steps reads it as-is: no numeric string
    if (
        isinstance(config.num_devices, bool)
        or not isinstance(config.num_devices, int)
        or (config.num_devices < 0)
    ):
        raise invalid(
            "config",
            "num_devices",
            config.num_devices,
            "expected 0 (all local devices) or a positive device count",
        )
    if config.get("max_loss") is not None:
        check_positive_float("config", "max_loss", config.max_loss)
    if config.get("num_classes") is not None:
        check_positive_int("config", "num_classes", config.num_classes)
    _validate_init_from(config)
    check_optimization(config)  # every optimizer and schedule field (ranges, NaN, boundaries)


def _validate_init_from(config: Any) -> None:
    """`init_from.*` and `freeze` (types only; the source run is checked by the loop). A key
    of `init_from` that is not in `INIT_FROM_FIELDS` is refused: a typo such as `use_ema=True`
    would else load the source's raw weights instead of its average, silently."""
    check_freeze("config", config.get("freeze"))
    init_from = config.get("init_from")
    if init_from is None:
        return
    check_known_fields("init_from", init_from, INIT_FROM_FIELDS)
    # Step 0 is a converted-weights source's one checkpoint (cnnjax.models.torchvision_weights).
    distill_lib.check_source_run(
        "init_from", ("workdir", init_from.get("workdir")), ("step", init_from.get("step")),
        init_from.get("ema", False), first_step=0,
        valid_workdir="expected the source run's --workdir",
        valid_step="expected a checkpoint step >= 0 or None",
        needs_workdir="it needs init_from.workdir to be set",
        ema_source="the run whose weight average to load")
    submodule = init_from.get("submodule")
    if submodule is not None and (not isinstance(submodule, str) or not submodule
                                  or "/" in submodule):
        raise invalid("init_from", "submodule", submodule,
                      "expected None or a top-level module name of the model, e.g. 'backbone'")
    exclude = init_from.get("exclude")
    if not isinstance(exclude, tuple | list) or not all(
        isinstance(name, str) and name and "," not in name for name in exclude
    ):
        raise invalid(
            "init_from",
            "exclude",
            exclude,
            "expected a tuple of module names, e.g. ('head',); on the command line give it as "
            "a Python literal, --config.init_from.exclude=\"('head', 'aux1')\" (head,aux1 "
            "would be one name)",
        )


def check_batch_divisible(config: Any, num_devices: int, for_training: bool = True,
                          local_devices: int | None = None) -> None:
    """Global (and eval) batch must split evenly over all devices of all processes, and each
    device's train batch into `grad_accum_steps` micro-batches. Not `for_training` (a finished
    run evaluated), only an explicit eval batch: without one `eval_batch` rounds the training
    batch up to the devices, which it need not divide. `local_devices` (a single process's, which
    `num_devices` picks from) makes the refusal name the `num_devices` that would split it: a
    runtime field, the way out for a run resumed on a machine with another device count."""
    problem = _batch_split_problem(config, num_devices, for_training)
    if problem is None:
        return
    name, value, valid = problem
    usable = [n for n in range(1, (local_devices or 0) + 1)
              if _batch_split_problem(config, n, for_training) is None]
    if usable:
        counts = ", ".join(map(str, usable[:-1])) + (" or " if len(usable) > 1 else "")
        lead = (f"; num_devices=0 took every local device ({num_devices}): set"
                if not config.get("num_devices") else "; or set")
        valid += (f"{lead} --config.num_devices={counts}{usable[-1]} to split it (a runtime "
                  "field: a resumed run may change it)")
    raise invalid("config", name, value, valid)


def _batch_split_problem(config: Any, num_devices: int,
                         for_training: bool) -> tuple[str, int, str] | None:
    """`(field, value, what would be valid)` of the first batch field that does not split over
    `num_devices` as `check_batch_divisible` requires, or None."""
    for name in ("global_batch_size", "eval_batch_size") if for_training else ("eval_batch_size",):
        value = config.get(name)
        if value is not None and value % num_devices:
            return (name, value, f"expected a multiple of the device count {num_devices} "
                                 f"(per-device batch = {name} / {num_devices})")
    accum_steps = config.get("grad_accum_steps", 1)
    per_device = config.global_batch_size // num_devices
    if for_training and per_device % accum_steps:
        return ("grad_accum_steps", accum_steps,
                f"expected a divisor of the per-device batch {per_device} (global_batch_size "
                f"{config.global_batch_size} / {num_devices} devices), so that micro-batches "
                "are equal")
    return None


def eval_batch(config: Any, num_devices: int) -> int:
    """The eval batch over `num_devices`: `eval_batch_size`, else the global batch rounded up to
    a multiple of them (a no-op in training, where it divides them; eval pads and masks, so a
    finished run evaluates on a machine whose device count its training batch does not
    divide)."""
    rounded_up = -(-config.global_batch_size // num_devices) * num_devices
    return config.get("eval_batch_size") or rounded_up


@dataclasses.dataclass(frozen=True)
class CheckedConfig:
    """What `check_config` built to check a config; `train_and_evaluate` trains with the same."""

    task: str
    pipeline: Any  # cnnjax.data.pipeline, or cnnjax.data.detection for detection
    data_info: Any  # the pipeline's DatasetInfo (classes, output image shape, split sizes)
    devices: list | None  # config.num_devices local devices; None: all of them
    model: Any  # the flax module, built with the engine's axis name and compute dtype
    schedule: Any  # optax schedule
    tx: Any  # optax optimizer, frozen backbone applied when config.freeze is set
    variable_shapes: Any  # jax.eval_shape of the variables; only for init_from / freeze


def data_pipeline(config: Any) -> Any:
    """The input module of `config`'s task: `cnnjax.data.pipeline`, `cnnjax.data.detection` or
    `cnnjax.data.segmentation` (the same API: get_dataset_info, train_batches, eval_batches,
    eval_split_name)."""
    if config_task(config) == "segmentation":
        from cnnjax.data import segmentation

        return segmentation
    if config_task(config) == "detection":
        from cnnjax.data import detection

        return detection
    from cnnjax.data import pipeline

    return pipeline


def check_data_fields(config: Any) -> None:
    """`config.data` as its task's input module checks it (`spec.resolve_for_task`: the
    dataset name, sizes, augmentations, the task's own fields), but before `data_pipeline`
    imports TensorFlow (~6-9 s), so a bad data field is refused at once."""
    from cnnjax.data.spec import resolve_for_task

    resolve_for_task(_field(config, "data"), config_task(config))


def check_config(config: Any, schedule: Any = None, *, for_training: bool = True,
                 ) -> CheckedConfig:
    """Runs every check `train_and_evaluate` runs before compiling; raises the same ValueErrors.

    Fields and values (`validate_config`), model name and task, dataset and `num_classes`,
    `num_devices` and batch divisibility over this host's devices (over several processes, that
    each one's shard of the train split holds its batch), `model_kwargs`, the input
    resolution and the model's outputs (logits over the dataset's classes, per pixel for
    segmentation: one abstract trace, no compilation), a detector's own checks of its training
    images (Faster R-CNN's anchors), the learning-rate schedule and optimizer, and
    `freeze` (the model must have a `head`). Reads the dataset's metadata (cnnjax's offline
    datasets are generated on first use, as the run would) but builds no input pipeline,
    initializes no parameter and touches no workdir. Not checked: `init_from.workdir`'s and
    `distill.teacher_workdir`'s checkpoints (the source or teacher run may not exist yet;
    `train_and_evaluate` checks them before compiling).
    `schedule` (an optax schedule) replaces `config.schedule`'s in the optimizer it builds, e.g.
    the learning-rate ramp of `cnnjax.tune.lr_range`; None: the config's own.
    `for_training=False` skips the check that the global batch fits in the train split: for
    loading a finished run's model, or for a caller that checks it with its own hint
    (`cnnjax.transfer`'s label budgets).
    """
    validate_config(config)
    task = config_task(config)
    info = _task_model_info(config, task)
    if for_training:
        _warn_if_not_reloadable(config.model)
    check_data_fields(config)
    pipeline = data_pipeline(config)  # heavy (TensorFlow): imported once the config is sane
    data_info = pipeline.get_dataset_info(config.data)
    _check_classes(config, task, data_info, for_training)
    if for_training and config.global_batch_size > data_info.num_train:  # full batches only
        raise ValueError(
            f"config: global_batch_size={config.global_batch_size!r} is invalid; expected at "
            f"most the {data_info.num_train} examples of the train split of {data_info.name!r} "
            "(an epoch would have no step)."
        )
    devices = _checked_devices(config, pipeline, for_training)
    _check_eval_batch_fits(config, data_info, devices)
    image_shape = tuple(data_info.image_shape)
    model = _checked_model(config, task, info, image_shape, data_info)
    if for_training and task != "detection":  # detectors train through `loss`, masked
        _check_batch_statistics(config, model, image_shape, _total_devices(devices))
    schedule, tx, variable_shapes = _checked_optimizer(config, schedule, model, image_shape)
    return CheckedConfig(task, pipeline, data_info, devices, model, schedule, tx, variable_shapes)


def _total_devices(devices: list | None) -> int:
    """Devices of every process the run's batches split over: `devices` (None: every local
    device) on each process."""
    import jax

    return len(devices or jax.local_devices()) * jax.process_count()


def _check_eval_batch_fits(config: Any, data_info: Any, devices: list | None) -> None:
    """An explicit `eval_batch_size` past the eval split (rounded up to whole device batches)
    holds only padding; a huge one trained for hours and then died at the first eval, out of
    memory."""
    num_devices = _total_devices(devices)
    value = config.get("eval_batch_size")
    cap = -(-data_info.num_eval // num_devices) * num_devices
    if value is not None and value > cap:
        raise invalid("config", "eval_batch_size", value,
                      f"expected at most {cap}: the eval split of {data_info.name!r} has "
                      f"{data_info.num_eval} examples (rounded up to a multiple of the "
                      f"{num_devices} devices), and a larger batch holds only padding")


def _check_task_of_known_model(config: Any, task: str) -> None:
    """A registered model of another task is refused before the task's own fields: a classifier
    under --config.task=detection was told its best_metric='top1' was no detection metric, as if
    that were the fault. An unknown name is left to `check_config` (and its list of names)."""
    from cnnjax.models import UnknownModelError, model_info

    try:
        model_info(config.model)
    except UnknownModelError:
        return
    _task_model_info(config, task)


def _warn_if_not_reloadable(name: str) -> None:
    """Warns when the run's model, registered outside cnnjax, is named without its module: it
    trains, but a command reloading the run (evaluate, visualize, init_from) cannot find it."""
    from cnnjax.models.registry import model_info, reloadable_name

    qualified, module = reloadable_name(name), model_info(name).module
    if qualified == name:
        return
    if module == "__main__":
        logging.warning(
            "config.model=%r is registered by the script being run (__main__): commands that "
            "reload this run cannot import it; register it in a module of an importable package "
            "and name it config.model='<module>:%s' (docs/reusing.md, \"Your own model\").",
            name, name)
        return
    logging.warning(
        "config.model=%r is registered by %s, outside cnnjax: commands that reload this "
        "run import only cnnjax and will not find it; name it config.model=%r so that "
        "every lookup imports its module (docs/reusing.md, \"Your own model\").",
        name, module, qualified)


def _known_model_info(name: Any) -> Any:
    """The registry's `ModelInfo` of `name`; an unknown name is refused as the config field
    `model` (the registry's close matches and names), not as `create_model`'s argument."""
    from cnnjax.models import UnknownModelError, model_info

    try:
        return model_info(name)
    except UnknownModelError as err:
        raise invalid("config", "model", name, err.valid) from None


def _task_model_info(config: Any, task: str) -> Any:
    """The registry's `ModelInfo` of `config.model`, refused when the model is not one of
    `task`'s (a detector in a classification run)."""
    from cnnjax.models import list_models

    info = _known_model_info(config.model)
    if info.task != task:
        raise ValueError(
            f"config: model={config.model!r} is invalid; it is a {info.task} model and "
            f"config.task={task!r} (set config.task={info.task!r}, or pick one of "
            f"{list_models(task=task)})."
        )
    return info


def _check_classes(config: Any, task: str, data_info: Any, for_training: bool) -> None:
    """`num_classes` must be the dataset's, and a classifier to train needs two classes."""
    num_classes = config.get("num_classes")
    if num_classes is not None and num_classes != data_info.num_classes:
        raise ValueError(
            f"config: num_classes={num_classes!r} is invalid; dataset {data_info.name!r} has "
            f"{data_info.num_classes} classes (leave num_classes unset to use the dataset's)."
        )
    if for_training and task == "classification" and data_info.num_classes < 2:
        # One logit: log-softmax is 0, so the loss and its gradient are 0 for any weights
        # (label smoothing and mixing too); the run would train nothing and report top-1 1.0.
        classes = config.data.get("classes")
        owner, field, value = (("data", "classes", tuple(classes)) if classes is not None
                               else ("data", "name", data_info.name))
        raise invalid(owner, field, value,
                      f"a classifier needs at least 2 classes (softmax cross-entropy over one "
                      f"class is 0 whatever the weights, so nothing would train); this keeps "
                      f"{data_info.num_classes} class of {data_info.name!r}")


def _checked_devices(config: Any, pipeline: Any, for_training: bool) -> list | None:
    """The local devices `config.num_devices` picks (None: all), with the batches checked to
    split over every device of every process."""
    import jax

    devices = None
    available = jax.local_devices()
    if config.num_devices:
        if jax.process_count() > 1:
            raise ValueError(
                f"config: num_devices={config.num_devices!r} is invalid; a multi-process job "
                "trains on every local device of every process (leave num_devices=0), else "
                "the processes would train separate models."
            )
        if config.num_devices > len(available):
            raise ValueError(
                f"config: num_devices={config.num_devices!r} is invalid; only "
                f"{len(available)} local devices are available."
            )
        devices = available[: config.num_devices]
    check_batch_divisible(config, _total_devices(devices), for_training,
                          local_devices=len(available) if jax.process_count() == 1 else None)
    if for_training and jax.process_count() > 1:
        # Each process reads its own shard of the train split; a '+'-joined split's shards may
        # be uneven, and one without a process batch is refused here, not by `train_batches`
        # once the model is initialized (one process reads the whole split: checked above).
        pipeline.check_train_epoch(config.data, global_batch_size=config.global_batch_size,
                                   process_count=jax.process_count())
    return devices


def _check_batch_statistics(config: Any, model: Any, image_shape: tuple[int, ...],
                            devices: int) -> None:
    """Refuses, by the batch fields, a train step whose BatchNorm would see one value per
    channel: the layer's own error came in the first step, after the workdir was written, and
    under gradient accumulation advised a larger batch where fewer micro-batches were meant."""
    from cnnjax.train import checks

    accum = config.get("grad_accum_steps", 1)
    micro_batch = config.global_batch_size // devices // accum
    layer = checks.one_value_batch_norm(model, micro_batch, devices, image_shape)
    if layer is not None:
        raise ValueError(
            f"config: global_batch_size={config.global_batch_size!r} is invalid; with "
            f"grad_accum_steps={accum} on {devices} device each train micro-batch holds "
            f"{micro_batch} image, and {layer} then normalizes each channel over a single "
            "value (its output is its bias alone: no gradient reaches the layers before it); "
            "use a larger global_batch_size, fewer grad_accum_steps or a larger "
            "data.image_size.")


def _checked_model(config: Any, task: str, info: Any, image_shape: tuple[int, ...],
                   data_info: Any) -> Any:
    """The flax module the run trains, built from `model_kwargs` and traced abstractly on
    `image_shape` images, so a bad keyword, a too-small input or outputs that are not the task's
    logits over the dataset's classes (`data_info`) are refused before compiling."""
    from cnnjax.models.registry import min_input_size
    from cnnjax.train import checks

    model = _create_model(config, task, data_info.num_classes)
    outputs = checks.check_input_size(model, config.model, image_shape,
                                      min_input_size(config.model, model))
    problem = checks.logits_problem(outputs, task, image_shape, data_info.num_classes)
    if problem is not None:
        raise invalid("config", "model", config.model,
                      f"{problem} (num_classes={data_info.num_classes}: "
                      f"{_classes_source(config, data_info)}; docs/conventions.md, \"Models\")")
    if task == "detection":
        from cnnjax.data.spec import proposal_spec

        checks.check_external_proposals(model, config.model,
                                        proposal_spec(config.data.get("proposals")))
        checks.check_training_size(model, image_shape)
    return model


def _classes_source(config: Any, data_info: Any) -> str:
    """Where the run's class count comes from, for an error: the dataset (and `data.classes`,
    when it keeps a subset)."""
    classes = _field(_field(config, "data"), "classes")
    kept = f", data.classes={tuple(classes)!r}" if classes is not None else ""
    return f"the classes of dataset {data_info.name!r}{kept}"


def check_model_fields(config: Any) -> None:
    """Refuses an unknown `config.model` or `model_kwargs` it does not take, as `check_config`
    does at start, without the dataset (the registry's class count stands in for the dataset's)
    and without tracing: for a launcher to check before queueing a job."""
    num_classes = config.get("num_classes") or _known_model_info(config.model).num_classes
    _create_model(config, config_task(config), num_classes)


def _create_model(config: Any, task: str, num_classes: int) -> Any:
    """`create_model` with the engine's axis name and compute dtype; a keyword the model does
    not take, or a backbone-only model (no outputs to train on), is a ValueError."""
    import jax.numpy as jnp

    from cnnjax.models import ModelArgumentError, create_model
    from cnnjax.train.parallel import AXIS_NAME

    dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
    kwargs = model_kwargs(config)
    try:
        model = create_model(
            config.model, num_classes=num_classes, axis_name=AXIS_NAME, dtype=dtype, **kwargs,
        )
    except ModelArgumentError as err:  # a keyword the model does not have, or fixes
        if err.keyword in ENGINE_KEYWORDS:  # not the user's model_kwargs: the model's fields
            raise _engine_field_error(config.model, err.keyword) from None
        raise ValueError(
            f"config: model_kwargs={kwargs!r} is invalid; model {config.model!r} does not "
            f"accept them ({err.keyword!r} is unknown, or fixed by the model's name); its "
            f"settable fields are {sorted(model_kwargs_config(config.model))}."
        ) from None
    if getattr(model, "features_only", False):  # ResNet's backbone switch: no head, no logits
        raise invalid("config", "model_kwargs.features_only", True,
                      f"expected False ({config.model} with features_only=True is a backbone "
                      f"that returns a dict of feature maps, not the outputs a {task} run "
                      "trains on; it failed in the first train step)")
    return model


def _engine_field_error(model: str, keyword: str) -> ValueError:
    """The error for a model that refuses `keyword`, one of the fields the engine sets on every
    model (`ENGINE_KEYWORDS`): the model lacks the field (or its name fixes it), which no
    `model_kwargs` can mend, so the error names the model, not the user's (maybe empty)
    `model_kwargs`."""
    missing = missing_engine_fields(model)
    lacks = (f"its class lacks the {field_list(missing)}" if missing else
             f"it does not take {keyword!r} (its name fixes it)")
    return invalid("config", "model", model,
                   f"{lacks}, which the engine sets on every model; every cnnjax model declares "
                   f"the fields {ENGINE_FIELDS_DOC}")


def _check_freeze_head(config: Any, params: Any) -> None:
    """`config.freeze` trains only the head modules (`heads.HEAD_MODULES`: the classifier
    `head`, FCN's score layers); a model without one is refused naming `freeze` and the model's
    top-level parameters, where `heads.trainable_mask`'s error named neither."""
    from cnnjax.models.heads import HEAD_MODULES  # deferred: imports the model registry

    if not any(name in params for name in HEAD_MODULES):
        raise invalid(
            "config", "freeze", config.freeze,
            f"it trains only the classifier head, and model {config.model!r} has none: its "
            f"top-level parameters are {sorted(params)}; the final classifier must be a submodule "
            f"named 'head' (docs/conventions.md, \"Models\"; FCN's {list(HEAD_MODULES[1:])} "
            "count too), or set freeze=None")


def _checked_optimizer(config: Any, schedule: Any, model: Any, image_shape: tuple[int, ...],
                       ) -> tuple[Any, Any, Any]:
    """`(schedule, tx, variable_shapes)`: the schedule (`config.schedule`'s when None), the
    optimizer with `freeze` applied, and the variables' shapes, traced (not compiled) only for
    init_from / freeze."""
    import jax

    from cnnjax.train.optim import build_optimizer, build_schedule
    from cnnjax.train.state import freeze_optimizer, init_variables

    if schedule is None:
        schedule = build_schedule(config)
    tx = build_optimizer(config, schedule)
    variable_shapes = None
    if init_from_workdir(config) is not None or config.get("freeze") is not None:
        variable_shapes = jax.eval_shape(
            lambda r: init_variables(model, r, (1, *image_shape)), jax.random.PRNGKey(0)
        )
    if config.get("freeze") is not None:
        _check_freeze_head(config, variable_shapes["params"])
        tx = freeze_optimizer(tx, variable_shapes["params"], config.freeze)
    return schedule, tx, variable_shapes


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """`{'a.b': value}` view of a nested config/dict, with tuples as lists (JSON-comparable)."""
    items = config.items() if hasattr(config, "items") else []
    out: dict[str, Any] = {}
    for key, value in items:
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            out.update(flatten(value, name + "."))
        else:  # a function or class by import path, as config.json saves it (to_json)
            out[name] = json.loads(json.dumps(callables.encode(value), default=str))
    return out


def to_json(config: Any) -> str:
    """`config` as config.json holds it: ml_collections' best-effort JSON, with functions and
    classes written as "callable:<import path>" (`cnnjax.utils.callables`) so that a rerun
    compares equal and `load_trained` can import them back."""
    plain = callables.encode(config.to_dict() if hasattr(config, "to_dict") else dict(config))
    return ml_collections.ConfigDict(plain).to_json_best_effort(indent=2, sort_keys=True)


def with_legacy_defaults(saved: dict) -> dict:
    """A config.json's dict with every `LEGACY_DEFAULTS` field it lacks filled in, at any depth
    (a saved `data` block keeps its fields and gains `randaugment_*`)."""
    def merge(defaults: dict, values: dict) -> dict:
        merged = dict(values)
        for key, default in defaults.items():
            if isinstance(default, dict) and isinstance(values.get(key), dict):
                merged[key] = merge(default, values[key])
            elif key not in values:
                merged[key] = copy.deepcopy(default)
        return merged

    return merge(LEGACY_DEFAULTS, saved)


#: `data` fields whose unset value (None, or missing) stands for the value of the preset
#: `data.name` names: workdirs saved before they were placeholders hold that value itself.
PRESET_DATA_FIELDS = ("cache", "shuffle_buffer")


def _with_preset_values(flat: dict[str, Any]) -> dict[str, Any]:
    """A flattened config with its unset `PRESET_DATA_FIELDS` filled in from its preset (as
    `cnnjax.data.spec.resolve` fills them), so that a concrete preset value compares equal."""
    from cnnjax.data import presets

    name = flat.get("data.name")
    if name not in presets.list_datasets():  # no data config, or one `resolve` refuses
        return flat
    preset = presets.get_preset(name)
    return {**flat, **{f"data.{field}": getattr(preset, field) for field in PRESET_DATA_FIELDS
                       if flat.get(f"data.{field}") is None}}


#: Fields naming another run's directory: equal when both name the same existing directory,
#: however spelled (a symlink, shared storage mounted under another path), so that a run reached
#: by another path (a transfer comparison's arms name their source by absolute path) resumes.
DIRECTORY_FIELDS = frozenset({"init_from.workdir", "distill.teacher_workdir"})


def incompatible_fields(saved: dict, current: dict) -> list[str]:
    """Dotted names of trajectory-defining fields that differ between two flattened configs.

    A field missing on one side equals an unset (None) one, so declaring new optional fields
    (e.g. a model's `model_kwargs` placeholders) does not orphan existing workdirs. The other
    `init_from.*` fields only matter when `init_from.workdir` is set on either side (workdirs
    saved before `init_from` existed lack its `exclude` default). Fields in `LEGACY_DEFAULTS`
    (task, grad_accum_steps, ema.*, mixing.*, data.randaugment_*, data.grey_to_rgb, distill.*,
    init_from.ema)
    missing on one side take the value older workdirs implicitly had, and unset
    `PRESET_DATA_FIELDS` their preset's. `DIRECTORY_FIELDS` that name the same existing
    directory by different paths are equal, and so are two `model` names of one registry entry.
    """
    names = sorted(set(saved) | set(current))
    legacy = {**flatten(LEGACY_DEFAULTS), **WARM_START_LEGACY_DEFAULTS}
    saved = _with_preset_values({**legacy, **saved})
    current = _with_preset_values({**legacy, **current})
    warm = any(side.get("init_from.workdir") is not None for side in (saved, current))
    return [
        n
        for n in names
        if n not in RUNTIME_FIELDS
        and saved.get(n) != current.get(n)
        and (warm or not n.startswith("init_from."))
        and not (n in DIRECTORY_FIELDS and same_directory(saved.get(n), current.get(n)))
        and not (n == "model" and _same_model(saved.get(n), current.get(n)))
    ]


def _same_model(first: Any, second: Any) -> bool:
    """Whether two `model` names are one registry entry: "mynet" and "mypkg.models:mynet", so
    a run trained under the plain name resumes under the name that reloads it."""
    from cnnjax.models.registry import model_info

    if not (isinstance(first, str) and isinstance(second, str)):
        return False
    try:
        return model_info(first) is model_info(second)
    except ValueError:  # unknown here: only equal names are the same model
        return False
