"""Knowledge distillation (Hinton, Vinyals & Dean 2015): a student trained against a teacher run.

`config.distill.teacher_workdir` names a finished or checkpointed classification run. Its
variables are loaded once on the host (`trained.load_trained`: its best checkpoint, a requested
step, or its weight average) and handed to the jitted train step beside the state, never inside it:
they are not checkpointed, so a resume reads the teacher again and `check_teacher_record` refuses
one whose teacher changed (`distill.json` in the student's workdir records it). In the step the
teacher runs in eval mode (BatchNorm running statistics, no dropout) on the same augmented, mixed
batch, under `stop_gradient`, and the student minimizes

    (1 - alpha) * CE(student, targets) + alpha * T^2 * KL(p_T(teacher) || p_T(student)),

with p_T(z) = softmax(z / T), where the T^2 factor (the paper's section 2) keeps the soft term's
gradients the same size as T changes (they scale as 1/T^2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.traverse_util import flatten_dict

from cnnjax.utils.files import read_json, same_directory, write_json
from cnnjax.utils.validation import check_bool, check_known_fields, check_number, invalid

if TYPE_CHECKING:
    from cnnjax.data.pipeline import DatasetInfo

OWNER = "distill"
DISTILL_FILE = "distill.json"  # the teacher a distilled run trains against (kept across resumes)
# `config.distill` with distillation off (also what a config.json from before the block meant).
DISTILL_DEFAULTS = {"teacher_workdir": None, "teacher_step": None, "ema": False,
                    "temperature": 4.0, "alpha": 0.9}


def check_distillation(owner: str, temperature: Any, alpha: Any,
                       strings: bool = True) -> tuple[float, float]:
    """`(temperature, alpha)` as floats if T is a finite number > 0 and alpha is in [0, 1], else a
    ValueError naming `owner`, the field and its value (a numeric string counts unless
    `strings=False`: a config file's, which `distill_rule` converts, not a `Distillation`'s)."""
    temperature = check_number(owner, "temperature", temperature,
                               "expected a finite temperature T > 0 (e.g. 4; 1: plain softmax)",
                               low=0.0, high=math.inf, low_open=True, high_open=True,
                               strings=strings)
    alpha = check_number(owner, "alpha", alpha,
                         "expected the soft-target weight 0 <= alpha <= 1 (0: plain training)",
                         low=0.0, high=1.0, strings=strings)
    return temperature, alpha


@dataclasses.dataclass(frozen=True)
class Distillation:
    """The loss settings the train step needs (static): temperature T and soft-target weight."""

    temperature: float = 4.0
    alpha: float = 0.9

    def __post_init__(self) -> None:
        # Used as-is in the traced loss: a string ("4") would fail there, not here.
        check_distillation("Distillation", self.temperature, self.alpha, strings=False)


#: Largest centred logit gap (over T) at which `soft_target_loss` takes the centred form.
_CLOSE = 0.1


def soft_target_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                     temperature: float) -> jax.Array:
    """Per-example `T^2 * KL(softmax(teacher / T) || softmax(student / T))` (float32, [N]).

    Far apart distributions: in log space (`optax.kl_divergence_with_log_targets`), so a peaked
    teacher never takes log 0. Close ones (every centred gap `(t - s) / T` below 0.1, as at a
    large T): there the KL, O(gap^2), is far below the float32 rounding of the O(1)
    log-probabilities it is a difference of (at T = 1000 the log-space form was 22% off, at
    T = 10^4 negative), so it is computed from the gaps themselves: with d = (t - s) / T centred
    on its student mean, KL = E_t[d] - log1p(E_s[expm1(d)]), exact algebra, relative error
    ~ float32 epsilon x T."""
    scale = 1.0 / temperature
    student = student_logits.astype(jnp.float32) * scale
    teacher = teacher_logits.astype(jnp.float32) * scale
    log_student = jax.nn.log_softmax(student, axis=-1)
    log_teacher = jax.nn.log_softmax(teacher, axis=-1)
    far = optax.losses.kl_divergence_with_log_targets(log_student, log_teacher)
    p_student, p_teacher = jnp.exp(log_student), jnp.exp(log_teacher)
    gap = teacher - student
    gap = gap - jnp.sum(p_student * gap, axis=-1, keepdims=True)
    close = jnp.max(jnp.abs(gap), axis=-1) < _CLOSE
    gap = jnp.where(close[..., None], gap, 0.0)  # the unused branch stays finite (gradients)
    near = (jnp.sum(p_teacher * gap, axis=-1)
            - jnp.log1p(jnp.sum(p_student * jnp.expm1(gap), axis=-1)))
    return temperature**2 * jnp.where(close, near, far)


def distillation_metrics(per_example: dict, student_logits: jax.Array,
                         teacher_logits: jax.Array, rule: Distillation) -> dict:
    """`per_example` (holding the hard `loss`) plus `distill_loss` (T^2 KL) and `total_loss`,
    the objective `(1 - alpha) * loss + alpha * distill_loss`; `loss` stays the plain run's."""
    soft = soft_target_loss(student_logits, teacher_logits, rule.temperature)
    total = (1.0 - rule.alpha) * per_example["loss"] + rule.alpha * soft
    return {**per_example, "distill_loss": soft, "total_loss": total}


def distill_rule(config: Any) -> Distillation | None:
    """The distillation `config.distill` asks for (checked), or None when it has no
    `teacher_workdir` (or the config no `distill` block)."""
    settings = distill_settings(config)
    if settings is None:
        return None
    return Distillation(*check_distillation(OWNER, settings["temperature"], settings["alpha"]))


def distill_settings(config: Any) -> dict | None:
    """`config.distill` with defaults filled in, or None when distillation is off."""
    block = config.get("distill") if hasattr(config, "get") else None
    if block is None or block.get("teacher_workdir") is None:
        return None
    return {**DISTILL_DEFAULTS, **dict(block)}


def check_source_run(owner: str, workdir: tuple[str, Any], step: tuple[str, Any], ema: Any, *,
                     first_step: int, valid_workdir: str, valid_step: str, needs_workdir: str,
                     ema_source: str) -> None:
    """The fields naming a run to load weights from (`init_from`'s, `distill`'s), each a
    `(field, value)`: the workdir a non-empty string or None, the step an int >= `first_step` or
    None, a bool `ema`; a step or ema=True without the workdir is refused (nothing would read
    it). The messages are `owner`'s: `valid_*`, `needs_workdir` and, for ema, `ema_source`."""
    (workdir_field, workdir), (step_field, step) = workdir, step
    if workdir is not None and (not isinstance(workdir, str) or not workdir):
        raise invalid(owner, workdir_field, workdir, valid_workdir)
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, int) or step < first_step:
            raise invalid(owner, step_field, step, valid_step)
        if workdir is None:
            raise invalid(owner, step_field, step, needs_workdir)
    if check_bool(owner, "ema", ema) and workdir is None:
        raise invalid(owner, "ema", True, f"{needs_workdir} ({ema_source})")


def validate_distill(config: Any, task: str) -> None:
    """Types and ranges of `config.distill` (the teacher run itself is checked by
    `load_teacher`): a classification student, a workdir string, step >= 1, bool ema,
    T > 0, alpha in [0, 1]; a step, ema, T or alpha other than the defaults needs a
    teacher_workdir (without one nothing reads them)."""
    block = config.get("distill")
    if block is None:
        return
    check_known_fields(OWNER, block, DISTILL_DEFAULTS)
    settings = {**DISTILL_DEFAULTS, **dict(block)}
    check_distillation(OWNER, settings["temperature"], settings["alpha"])
    workdir = settings["teacher_workdir"]
    # A trained run's steps start at 1 (step 0 is only a converted-weights source's, init_from's).
    check_source_run(
        OWNER, ("teacher_workdir", workdir), ("teacher_step", settings["teacher_step"]),
        settings["ema"], first_step=1,
        valid_workdir="expected the --workdir of a trained classification run, or None (off)",
        valid_step="expected a checkpoint step >= 1, or None (the teacher's best)",
        needs_workdir="it needs distill.teacher_workdir",
        ema_source="the teacher whose weight average to use")
    if workdir in ("None", "none") and not os.path.isdir(workdir):  # e.g. a config file's "None"
        raise invalid(OWNER, "teacher_workdir", workdir,
                      "the string 'None' names no run; use None (not the string) to train "
                      "without a teacher")
    for name in ("temperature", "alpha"):  # range-checked above: numbers
        if workdir is None and float(settings[name]) != DISTILL_DEFAULTS[name]:
            raise invalid(OWNER, name, settings[name],
                          "it needs distill.teacher_workdir (without a teacher the run trains "
                          "without distillation and nothing reads it)")
    if workdir is not None and task != "classification":
        raise invalid(OWNER, "teacher_workdir", workdir,
                      f"distillation trains classifiers only (config.task='classification', not "
                      f"{task!r}); set distill.teacher_workdir=None")


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A loaded teacher: its flax module, its variables (host NumPy) and what was loaded."""

    model: Any
    variables: dict
    record: dict  # workdir, step, checkpoint, ema, model, dataset, fingerprint


def fingerprint(variables: dict) -> str:
    """SHA-256 of every leaf of `variables` (path, dtype, shape, bytes): the teacher's identity."""
    digest = hashlib.sha256()
    for path, leaf in sorted(flatten_dict(variables, sep="/").items()):
        leaf = np.ascontiguousarray(leaf)
        digest.update(f"{path}:{leaf.dtype}:{leaf.shape};".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()


def load_teacher(config: Any, student: DatasetInfo, student_workdir: str | None = None,
                 ) -> Teacher:
    """Reads `config.distill`'s teacher for a student whose data is `student` (the `DatasetInfo`
    of `config.data` that `check_config` already read: name, classes, image shape); a ValueError
    naming the `distill` field if the teacher run is missing, is the student's own
    `student_workdir`, has no checkpoint (or not the step), is not a classifier, or was trained
    on another dataset, class subset or input shape (the teacher sees the student's images,
    normalized as the student's dataset is, and its class i is read as the student's). Reads
    checkpoints and the teacher's dataset metadata only: nothing is compiled."""
    from cnnjax.train import config as config_lib
    from cnnjax.train.logging import CONFIG_FILE
    from cnnjax.train.trained import argument_prefix, load_trained

    settings = distill_settings(config)
    workdir = settings["teacher_workdir"]
    if student_workdir is not None and os.path.realpath(workdir) == os.path.realpath(
            student_workdir):
        raise invalid(OWNER, "teacher_workdir", workdir,
                      "it is this run's own --workdir; expected another, trained run")
    saved = read_json(os.path.join(workdir, CONFIG_FILE))
    if not isinstance(saved, dict) or "model" not in saved:
        raise invalid(OWNER, "teacher_workdir", workdir,
                      f"expected the --workdir of a finished or checkpointed training run (no "
                      f"readable {CONFIG_FILE} with a model in it)")
    teacher_task = config_lib.config_task(config_lib.with_legacy_defaults(saved))
    if teacher_task != "classification":
        raise invalid(OWNER, "teacher_workdir", workdir,
                      f"it is a {teacher_task} run; distillation needs a classification teacher")
    try:
        # One device suffices to build it (a multi-process job must name none).
        run = load_trained(workdir, settings["teacher_step"], ema=settings["ema"],
                           num_devices=1 if jax.process_count() == 1 else None)
    except ValueError as err:
        field = next((name for name in ("step", "ema") if str(err).startswith(
            argument_prefix(name))), "workdir")
        name, value = {"step": ("teacher_step", settings["teacher_step"]),
                       "ema": ("ema", settings["ema"])}.get(field, ("teacher_workdir", workdir))
        raise invalid(OWNER, name, value, f"the teacher run cannot be loaded ({err})") from None
    info = config_lib.data_pipeline(run.config).get_dataset_info(run.config.data)
    num_classes, image_shape = student.num_classes, tuple(student.image_shape)
    subsets = [_classes(c.data) for c in (run.config, config)]
    if info.name != student.name or subsets[0] != subsets[1]:
        raise invalid(OWNER, "teacher_workdir", workdir,
                      f"the teacher was trained on {info.name!r} classes {subsets[0] or 'all'} "
                      f"and the student trains on {student.name!r} classes "
                      f"{subsets[1] or 'all'}; "
                      "they must be the same dataset and classes (its class i is read as the "
                      "student's, and its input is normalized as the student's dataset is)")
    if info.num_classes != num_classes:
        raise invalid(OWNER, "teacher_workdir", workdir,
                      f"the teacher predicts {info.num_classes} classes ({info.name!r}) and the "
                      f"student's data has {num_classes}; they must be the same classes")
    if tuple(info.image_shape) != image_shape:
        raise invalid(OWNER, "teacher_workdir", workdir,
                      f"the teacher was trained on {tuple(info.image_shape)} images (height, "
                      f"width, channels) and the student's data gives {image_shape}; set "
                      "the student's data.image_size (and channels) to the teacher's")
    record = {"workdir": run.workdir, "step": run.step, "checkpoint": run.how, "ema": run.ema,
              "model": run.config.model, "dataset": info.name,
              "fingerprint": fingerprint(run.variables)}
    logging.info("Distillation teacher: %s%s checkpoint (step %d) of %s (model %r); T=%g, "
                 "alpha=%g.", "averaged " if run.ema else "", run.how, run.step, run.workdir,
                 run.config.model, settings["temperature"], settings["alpha"])
    return Teacher(run.model, run.variables, record)


def _classes(data_config: Any) -> tuple[int, ...] | None:
    """The class subset a data config keeps (`data.classes`), None for every class."""
    classes = data_config.get("classes")
    return None if classes is None else tuple(int(c) for c in classes)


def check_teacher_record(workdir: str, record: dict, resuming: bool, write: bool) -> None:
    """A resumed run must train against the teacher it started with (`distill.json` in its
    `workdir`): a teacher whose checkpoint or variables changed is refused. Then (if `write`)
    records `record`."""
    path = os.path.join(workdir, DISTILL_FILE)
    recorded = read_json(path) if resuming else None
    if isinstance(recorded, dict):
        keys = ("workdir", "step", "ema", "fingerprint")
        # The same directory reached by another path (a symlink, storage mounted elsewhere on
        # the node a requeued job lands on) is the same teacher, as the config check says.
        moved = (recorded.get("workdir") != record["workdir"]
                 and not same_directory(recorded.get("workdir"), record["workdir"]))
        if moved or any(recorded.get(k) != record[k] for k in keys[1:]):
            was = ", ".join(f"{k}={recorded.get(k)!r}" for k in keys[:3])
            now = f"workdir={record['workdir']!r}, " if moved else ""
            raise invalid(OWNER, "teacher_workdir", record["workdir"],
                          f"this run started with another teacher ({was}, fingerprint "
                          f"{str(recorded.get('fingerprint'))[:12]}; now {now}"
                          f"step={record['step']}, fingerprint {record['fingerprint'][:12]}) and "
                          "would not resume exactly; restore that teacher, pin "
                          "--config.distill.teacher_step, or use a new --workdir")
    if write:
        write_json(path, record)
