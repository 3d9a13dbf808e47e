"""A training run's workdir as a model to use: `load_trained(workdir)`, `evaluate_trained(...)`.

`load_trained` reads the run's `config.json`, builds its model as the engine did
(`config.check_config`) and loads the params and BatchNorm statistics of its best checkpoint (by
the run's `best_metric`; else the newest; or a requested step) through the read-only
`SourceCheckpoints` that `init_from` uses, so a run that is still training is not disturbed.
`evaluate_trained` runs the engine's own evaluation of it (all devices, padded batches masked;
top-1/top-5 or mAP) on the run's eval split or any other split of its dataset;
`plot_predictions` draws its confusion matrix or its detections; `classifier_logits` gives a
classifier's logits and labels over a split (confusion matrix, calibration).

    run = load_trained("workdirs/lenet5_digits")
    logits = run.apply(images)                        # classification: [N, num_classes]
    detections = run.apply(images, method="detect")   # a detector's fixed-size Detections
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ml_collections
import numpy as np

from cnnjax.train import config as config_lib
from cnnjax.train.checkpoint import SourceCheckpoints, read_error, where_the_runs_are
from cnnjax.train.init_from import holds_converted_weights
from cnnjax.train.loop import CONFIG_FILE, evaluate_variables
from cnnjax.train.state import WARM_START_COLLECTIONS
from cnnjax.train.step import proposal_kwargs
from cnnjax.utils import callables
from cnnjax.utils.files import read_json
from cnnjax.utils.validation import check_bool, check_positive_int, error_prefix, invalid

_OWNER = "load_trained"
#: How `check_temperature_split` and `calibrate_run` name their split for a Python caller.
_TEMPERATURE_SPLIT = "evaluate: temperature_split"
#: Images per forward pass of the prediction helpers (`predictions`, `eval_examples`,
#: `classifier_logits`, `calibrate_run`) when the caller names no batch size.
PREDICTION_BATCH = 64


def argument_prefix(argument: str) -> str:
    """How `load_trained`'s error about `argument` starts (`"load_trained: step="`): a command
    maps it to its flag with `cli.one_line_errors(flags_named=)`."""
    return error_prefix(_OWNER, argument)


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A run's model and the variables of one of its checkpoints."""

    workdir: str
    config: ml_collections.ConfigDict  # as saved in config.json
    model: Any  # the flax module, built as the engine builds it
    variables: dict  # {'params', 'batch_stats'} (NumPy)
    step: int
    how: str  # 'best', 'latest' or 'requested'
    ema: bool = False  # the variables are the run's weight average (config.ema), not its weights

    def apply(self, images: Any, method: str | None = None, **kwargs: Any) -> Any:
        """Inference: `model(images, train=False)` (BatchNorm running statistics, no dropout),
        or the inference method `method` of the model, e.g. a detector's 'detect'. A detector
        trained on external proposals (`data.proposals`) needs them here too (`proposals`,
        `proposal_valid`, e.g. from `cnnjax.detection.selective_search`): without them it would
        silently score its dense windows instead."""
        if method is None:
            return self.model.apply(self.variables, images, train=False, **kwargs)
        proposals = (self.config.data.get("proposals") or {}).get("method")
        if method == "detect" and proposals and "proposals" not in kwargs:
            raise invalid("TrainedRun.apply", "proposals", None,
                          f"this detector was trained on {proposals} proposals (data.proposals);"
                          " pass proposals= [N, P, 4] pixel boxes and proposal_valid= [N, P]")
        return self.model.apply(self.variables, images, method=method, **kwargs)


class NoWeightAverageError(ValueError):
    """`load_trained(ema=True)` of a run that kept no weight average (`config.ema.decay` None).
    Its text tells a Python caller to pass ema=False; `flag_message` words the same refusal for
    a command's flag (e.g. `--ema`), which the user drops instead."""

    def __init__(self, workdir: str):
        self.reason = (f"the run in {workdir!r} kept no weight average (its config.ema.decay "
                       "is None)")
        super().__init__(str(invalid(_OWNER, "ema", True,
                                     f"{self.reason}; load its weights with ema=False")))

    def flag_message(self, flag: str = "--ema") -> str:
        """The refusal as a command reports it: `<flag> is invalid; <why>; drop <flag>.`"""
        return f"{flag} is invalid; {self.reason}; drop {flag} to use its trained weights."


def load_trained(workdir: str, step: int | None = None,
                 num_devices: int | None = None, ema: bool = False) -> TrainedRun:
    """The model of the run in `workdir` with its best checkpoint's variables (or `step`'s);
    with `ema`, the checkpoint's weight average instead (a run with `config.ema.decay` set).
    "Best" is judged by the loaded weights' own eval metric (`ema_top1` for the average).

    The run's config is checked on this machine as the engine would for evaluation (its
    training batch need not divide this machine's device count: `config.eval_batch` rounds it
    up); `num_devices` (0: all) replaces the run's own, e.g. one this machine does not have.
    Raises a ValueError naming the problem if `workdir` is not a training run's, its config no
    longer checks, or it has no (such) checkpoint.
    """
    if step is not None:
        step = check_positive_int(_OWNER, "step", step)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise invalid(_OWNER, "workdir", workdir, "it is a file, not a training run's directory")
    saved = read_json(os.path.join(workdir, CONFIG_FILE))
    if not isinstance(saved, dict) or "model" not in saved:
        raise invalid(_OWNER, "workdir", workdir,
                      f"expected the --workdir of a training run (no readable {CONFIG_FILE} with "
                      f"a model in it){where_the_runs_are(os.path.abspath(workdir))}")
    if holds_converted_weights(workdir, saved):
        raise invalid(_OWNER, "workdir", workdir,
                      "it holds converted torchvision weights, not a training run: pass it as "
                      "--config.init_from.workdir of a run instead")
    try:  # functions and classes in model_kwargs are saved by import path
        saved["model_kwargs"] = callables.decode(saved.get("model_kwargs") or {})
    except ValueError as err:
        raise invalid(_OWNER, "workdir", workdir,
                      f"its {CONFIG_FILE} model_kwargs: {err}") from None
    config = ml_collections.ConfigDict(config_lib.with_legacy_defaults(saved))
    if num_devices is not None:
        config.num_devices = num_devices  # checked with the rest by check_config

    def incomplete(field: str) -> ValueError:
        return invalid(_OWNER, "workdir", workdir,
                       f"its {CONFIG_FILE} is not a complete training config (it lacks "
                       f"{field!r}); expected the --workdir of a training run")

    missing = config_lib.missing_required_fields(config)
    if missing:
        raise incomplete(missing[0])
    try:
        checked = config_lib.check_config(config, for_training=False)
    except (AttributeError, KeyError) as err:  # a nested ConfigDict's missing field
        raise incomplete((str(err).splitlines() or [""])[0].strip("\"' ")) from None
    check_bool(_OWNER, "ema", ema)
    if ema and config_lib.ema_rule(config) is None:
        raise NoWeightAverageError(workdir)
    source, chosen, how = None, step, "requested" if step else "best"
    try:
        source = SourceCheckpoints(workdir, owner=_OWNER)
        chosen, how = source.choose_step(step, config.get("best_metric"),
                                         config.get("best_mode", "max"), ema=ema)
        variables = source.restore_variables(chosen, source.variable_shapes(chosen, ema), ema)
    except Exception as err:  # orbax/tensorstore raise many kinds for a damaged checkpoint
        if isinstance(err, ValueError) and str(err).startswith(f"{_OWNER}: "):
            raise  # e.g. a step that does not exist: it already says which ones do
        raise invalid(_OWNER, "step", chosen,
                      f"the {how} checkpoint of {workdir!r} could not be read "
                      f"({read_error(err)}); pass another kept step "
                      "(--step=N) or check the files") from None
    finally:
        if source is not None:
            source.close()
    variables = {name: variables.get(name, {}) for name in WARM_START_COLLECTIONS}
    return TrainedRun(os.path.abspath(workdir), config, checked.model, variables, chosen, how, ema)


def with_split(config: Any, split: str | None) -> ml_collections.ConfigDict:
    """A copy of `config` whose eval split is `split` (None: unchanged)."""
    config = ml_collections.ConfigDict(config.to_dict())
    if split is not None:
        if not isinstance(split, str) or not split:
            raise invalid("evaluate", "split", split, "expected a tfds split such as 'test'")
        config.data.eval_split = split
    return config


def check_split(run: TrainedRun, split: str | None, name: str = "evaluate: split") -> None:
    """A ValueError `<name>=<split> is invalid; <the splits the run's dataset has>.` if `split`
    (a tfds split spec: a name, a slice such as 'test[:50%]', or a `+` join; None: the run's
    own eval split, not checked) is not one of the run's dataset or holds no examples. It reads
    only the dataset's split sizes (the data pipeline's own check, which parses slices and joins
    as tfds does), so a command calls it before it evaluates or compiles anything; otherwise the
    pipeline's error would name `data.eval_split`, a field the user never set, or tfds's raw
    error would name nothing. `name` is how the caller's user set the split, e.g. "--split"."""
    if split is None:
        return
    if not isinstance(split, str) or not split.strip():
        raise ValueError(f"{name}={split!r} is invalid; expected a tfds split such as 'test'.")
    pipeline = config_lib.data_pipeline(run.config)
    config = with_split(run.config, split)
    try:
        pipeline.get_dataset_info(config.data)
    except ValueError as err:  # "data: eval_split='x' is invalid; <valid>.": keep <valid>
        prefix = error_prefix("data", "eval_split")
        if not str(err).startswith(prefix):
            raise  # not the split's fault (e.g. a data_dir the dataset cannot be built in)
        valid = re.sub(rf"^{re.escape(prefix)}.*? is invalid; ", "", str(err)).rstrip(".")
        valid = re.sub(r" \[Unknown split .*\]$", "", " ".join(valid.split()))  # one line;
        # tfds's "Unknown split" repeats the splits named before it
        raise ValueError(f"{name}={split!r} is invalid; {valid}.") from None


def default_outputs(config: Any) -> Callable[[TrainedRun, dict], Any]:
    """What `predictions` computes by default: the logits of a classifier (`[N, C]`) or a dense
    predictor (`[N, H, W, C]`), or a detector's `Detections` (on the batch's external proposals
    if it has any)."""
    if config_lib.config_task(config) == "detection":
        return lambda run, batch: run.apply(batch["image"], method="detect",
                                            **proposal_kwargs(batch))
    return lambda run, batch: run.apply(batch["image"])


def predictions(run: TrainedRun, split: str | None = None, batch_size: int = PREDICTION_BATCH,
                outputs: Callable[[TrainedRun, dict], Any] | None = None,
                ) -> Iterator[tuple[dict, Any]]:
    """`(batch, output)` over `split` of the run's dataset (None: its eval split) in stored
    order, padding removed: the eval pipeline's batch (NumPy, one device) and, as NumPy,
    `outputs(run, batch)` (jitted, under the run's conv lowering; every leaf has the batch
    axis first); by default `default_outputs`."""
    import jax

    config = with_split(run.config, split)
    batch_size = check_positive_int("predictions", "batch_size", batch_size)
    if outputs is None:
        outputs = default_outputs(config)
    infer = jit_inference(run, lambda variables, batch: outputs(
        dataclasses.replace(run, variables=variables), batch))
    for batch in _padded_batches(config, batch_size):
        output = jax.device_get(infer(run.variables, batch))  # padded: one shape
        keep = batch["mask"] > 0
        yield ({k: v[keep] for k, v in batch.items()},
               jax.tree.map(lambda x, keep=keep: x[keep], output))


def jit_inference(run: TrainedRun, fn: Callable[[dict, Any], Any]) -> Callable[[dict, Any], Any]:
    """`jax.jit(fn)` for `fn(variables, inputs)`, traced under the run's convolution lowering
    (`config.conv_impl` on this backend), as the engine's own steps are."""
    import jax

    from cnnjax.layers.conv_impl import conv_impl

    @jax.jit
    def traced(variables: dict, inputs: Any) -> Any:
        with conv_impl(run.config.conv_impl):  # "auto" resolves per backend
            return fn(variables, inputs)

    return traced


def _padded_batches(config: Any, batch_size: int) -> Iterator[dict]:
    """`config`'s eval-pipeline batches for one device (NumPy), padded to `batch_size`, with
    their `mask`."""
    pipeline = config_lib.data_pipeline(config)
    for batch in pipeline.eval_batches(config.data, global_batch_size=batch_size, num_devices=1):
        yield {k: v[0] for k, v in batch.items()}  # one device


def eval_examples(run: TrainedRun, split: str | None = None,
                  batch_size: int = PREDICTION_BATCH) -> Iterator[dict]:
    """The batches of `predictions` without running the model: `split` of the run's dataset
    (None: its eval split) in stored order, as its evaluation preprocesses them, padding
    removed."""
    config = with_split(run.config, split)
    batch_size = check_positive_int("eval_examples", "batch_size", batch_size)
    for batch in _padded_batches(config, batch_size):
        keep = batch["mask"] > 0
        yield {k: v[keep] for k, v in batch.items()}


def evaluate_trained(workdir: str, step: int | None = None, split: str | None = None,
                     eval_batch_size: int | None = None, ema: bool = False) -> dict:
    """`evaluate_run(load_trained(workdir, step, ema=ema), split, eval_batch_size)`."""
    return evaluate_run(load_trained(workdir, step, ema=ema), split, eval_batch_size)


def evaluate_run(run: TrainedRun, split: str | None = None,
                 eval_batch_size: int | None = None) -> dict:
    """The engine's eval metrics of `run` on `split` of its dataset (None: the run's own eval
    split), plus which checkpoint and split they are of."""
    config = with_split(run.config, split)
    if eval_batch_size is not None:
        config.eval_batch_size = check_positive_int("evaluate", "eval_batch_size",
                                                    eval_batch_size)
    metrics = evaluate_variables(config, run.variables)  # checks the split exists first
    split = config_lib.data_pipeline(config).eval_split_name(config.data)
    dataset = config_lib.data_pipeline(config).get_dataset_info(config.data).name  # summary's
    return {"workdir": run.workdir, "model": config.model, "dataset": dataset,
            "split": split, "step": run.step, "checkpoint": run.how,
            "weights": "ema" if run.ema else "trained", **metrics}


def classifier_logits(run: TrainedRun, split: str | None = None,
                      batch_size: int = PREDICTION_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """A classifier's `(logits [N, C], labels [N])` over `split` (None: its eval split) in
    stored order, from one `predictions` pass: what the confusion matrix and the calibration
    scores of `experiments.evaluate` share."""
    if config_lib.config_task(run.config) != "classification":
        raise invalid("classifier_logits", "run", run.workdir,
                      f"expected a classifier's run, not a {config_lib.config_task(run.config)}"
                      " run")
    logits, labels = [], []
    for batch, output in predictions(run, split, batch_size):
        logits.append(output)
        labels.append(batch["label"])
    if not logits:
        raise invalid("classifier_logits", "split", split, "it holds no examples")
    return np.concatenate(logits), np.concatenate(labels)


def dataset_labels(run: TrainedRun, num_classes: int) -> list[int]:
    """The dataset label of each of the model's `num_classes` classes: `data.classes` for a run
    on a class subset (its model predicts 0..C-1 in that order), else the classes themselves."""
    return [int(c) for c in (run.config.data.get("classes") or range(num_classes))]


def plot_predictions(run: TrainedRun, path: str, split: str | None = None,
                     max_images: int = 16,
                     classified: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """The run's predictions on `split` as a PNG at `path`: a classifier's confusion matrix over
    every example (also returned as `per_class_top1`, None for a class without examples), a
    detector's boxes or a dense predictor's
    class maps on the first `max_images` images. Returns `{"plot": path, ...}`. A classifier's
    `classified` (`classifier_logits` of that split) saves running the model again."""
    title = f"{run.config.model} step {run.step}"
    if config_lib.config_task(run.config) == "segmentation":
        from cnnjax.analysis.confusion import plot_segmentation

        batch, logits = next(predictions(run, split, batch_size=max_images))
        plot_segmentation(batch["image"], batch["labels"], np.argmax(logits, axis=-1), path,
                          num_classes=int(logits.shape[-1]), max_images=max_images, title=title)
        return {"plot": path}
    if config_lib.config_task(run.config) == "detection":
        from cnnjax.detection.visualize import plot_detections

        batch, found = next(predictions(run, split, batch_size=max_images))
        plot_detections(batch["image"], found, batch["boxes"], batch["labels"],
                        batch["box_valid"], path, max_images=max_images, title=title)
        return {"plot": path}
    from cnnjax.analysis.confusion import plot_confusion_matrix

    confusion = classifier_confusion(run, split, classified)
    plot_confusion_matrix(np.asarray(confusion["confusion_matrix"]), path, title=title,
                          class_labels=[str(c) for c in confusion["classes"]])
    return {"plot": path, **confusion}


def classifier_confusion(run: TrainedRun, split: str | None = None,
                         classified: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """A classifier's `confusion_matrix` over every example of `split` (rows: true class),
    its `classes` (row i is dataset label classes[i]) and `per_class_top1` (None for a class
    without examples), as JSON-ready lists. `classified`: `classifier_logits` of that split."""
    from cnnjax.analysis.confusion import confusion_matrix, per_class_accuracy

    logits, labels = classifier_logits(run, split) if classified is None else classified
    matrix = confusion_matrix(labels, np.argmax(logits, axis=-1), int(logits.shape[-1]))
    return {"classes": dataset_labels(run, matrix.shape[0]),
            # None, not NaN, for a class the split lacks: NaN is not JSON (strict readers fail)
            "per_class_top1": [None if np.isnan(a) else float(a)
                               for a in per_class_accuracy(matrix)],
            "confusion_matrix": matrix.tolist()}


def _normalized(split: str) -> str:
    """A tfds split string without spaces, to compare two spellings of a split."""
    return "".join(split.split())


def _overlap(a: str, b: str, splits: Mapping[str, Any] | None = None) -> bool:
    """Whether tfds splits `a` and `b` share examples. With `splits` (the dataset's split infos
    by name: `num_examples`, `shard_lengths`) exactly, by tfds's own arithmetic: the example
    ranges the two select (percent, absolute or shard slices, negative indices, `+` joins) meet
    in some split. Without them, or for a spec tfds cannot place, conservatively for certain
    shares only: the same split, or a whole split and a slice of it."""
    a, b = _normalized(a), _normalized(b)
    if splits is not None:
        ranges_a, ranges_b = _example_ranges(a, splits), _example_ranges(b, splits)
        if ranges_a is not None and ranges_b is not None:
            return any(name_a == name_b and max(start_a, start_b) < min(stop_a, stop_b)
                       for name_a, start_a, stop_a in ranges_a
                       for name_b, start_b, stop_b in ranges_b)
    return a == b or (a.split("[")[0] == b.split("[")[0] and ("[" not in a or "[" not in b))


def _example_ranges(split: str, splits: Mapping[str, Any]) -> list[tuple[str, int, int]] | None:
    """The `(split name, start, stop)` example index ranges tfds reads for `split`
    (`ReadInstruction.to_absolute` over `splits`), or None where tfds cannot place it."""
    import tensorflow_datasets as tfds

    try:
        instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(splits)
    except (ValueError, KeyError, TypeError, IndexError, NotImplementedError):
        return None
    return [(i.splitname, i.from_ or 0,
             int(splits[i.splitname].num_examples) if i.to is None else i.to)
            for i in instructions]


def _split_infos(data_config: Any) -> Mapping[str, Any] | None:
    """The split infos (`num_examples`, `shard_lengths` by split name) of the tfds dataset
    `data_config` reads, so `_overlap` can place slices exactly; None for a dataset that is
    not tfds's (e.g. `fake`) or cannot be opened."""
    from cnnjax.data import sources
    from cnnjax.data.spec import resolve

    try:
        source = sources.open_source(resolve(data_config))
    except (ValueError, OSError):
        return None
    source = getattr(source, "inner", source)  # a class subset slices its inner splits
    builder = getattr(source, "builder", None)
    return None if builder is None else builder.info.splits


def _train_split(data_config: Any) -> str:
    """The split a classifier was trained on: `data.train_split`, else its dataset preset's
    ('' when the config resolves to no preset, e.g. a test's stand-in dataset)."""
    from cnnjax.data.spec import resolve

    try:
        return data_config.get("train_split") or resolve(data_config).train_split
    except ValueError:
        return ""


def check_temperature_split(run: TrainedRun, split: str | None, temperature_split: str | None,
                            allow_same_split: bool = False, name: str = _TEMPERATURE_SPLIT,
                            allow: str = "allow_same_split=True") -> tuple[bool, list[str]]:
    """Checks `temperature_split` (None: no temperature scaling) for `run` evaluated on `split`
    (None: its eval split) before anything compiles: a classifier's run, an existing non-empty
    split, and not one holding the evaluated examples unless `allow_same_split` (T fitted to the
    examples it is scored on gives an optimistic ECE). Returns whether it holds them, and
    warnings: that, or a split sharing examples with the run's training split, where the fitted
    T is biased low. Shared examples are found by tfds's own slice arithmetic over the dataset's
    split sizes (overlapping slices of one split, `+` joins); for a dataset without tfds split
    sizes, only the same split or a whole split and a slice of it count. `name` and `allow` are
    how the caller's user sets the split and allows it to be the evaluated one (a command's
    flags, e.g. "--temperature_split" and "--allow_same_split"): its errors and warnings say
    them."""
    if temperature_split is None:
        return False, []
    task = config_lib.config_task(run.config)
    if task != "classification":
        raise ValueError(f"{name}={temperature_split!r} is invalid; temperature scaling is for "
                         f"classifiers, and this is a {task} run.")
    if not isinstance(temperature_split, str) or not temperature_split.strip():
        raise ValueError(f"{name}={temperature_split!r} is invalid; expected a tfds split such "
                         "as 'train[90%:]'.")
    check_bool("evaluate", "allow_same_split", allow_same_split)
    pipeline = config_lib.data_pipeline(run.config)
    evaluated = pipeline.eval_split_name(with_split(run.config, split).data)
    check_split(run, temperature_split, name)
    splits = _split_infos(run.config.data)
    same_split = _overlap(temperature_split, evaluated, splits)
    warnings = []
    if same_split:
        if not allow_same_split:
            raise ValueError(f"{name}={temperature_split!r} is invalid; it holds the evaluated "
                             f"split {evaluated!r}, so T would be fitted to the very examples it "
                             "is scored on (an optimistic ECE); pass a held-out split (e.g. "
                             "'train[90%:]' of a run trained on 'train[:90%]'), or "
                             f"{allow} for that oracle on purpose.")
        warnings.append(f"T is fitted on examples of the evaluated split {evaluated!r}: its "
                        f"calibration after scaling is optimistic ({allow})")
    train = _normalized(_train_split(run.config.data))
    if train and _overlap(temperature_split, train, splits):
        warnings.append(f"{name}={temperature_split!r} shares examples with the "
                        f"run's training split {train!r}: a model is more confident on examples it "
                        "learned than on new ones, so the T fitted there is biased low; train "
                        "on a slice (--config.data.train_split='train[:90%]') and fit on the "
                        "rest")
    return same_split, warnings


def calibrate_run(run: TrainedRun, logits: np.ndarray, labels: np.ndarray, n_bins: int = 15,
                  temperature_split: str | None = None, batch_size: int = PREDICTION_BATCH,
                  same_split: bool = False, name: str = _TEMPERATURE_SPLIT) -> dict:
    """The `calibration` record of a classifier's `logits` and `labels` (`classifier_logits` of
    the evaluated split): ECE, MCE, NLL, Brier score and bins at T = 1, plus, with
    `temperature_split` (checked by `check_temperature_split`), `temperature_scaling`: T fitted
    on that split's logits (one more pass of the model) and the same scores at T. `name`: how
    the caller's user set the split, as its error for a split no temperature fits says it."""
    from cnnjax.analysis.calibration import calibration_metrics, temperature_scaling

    record = calibration_metrics(logits, labels, n_bins)
    if temperature_split is not None:
        fit_logits, fit_labels = classifier_logits(run, temperature_split, batch_size)
        try:
            scaled = temperature_scaling(fit_logits, fit_labels, logits, labels, n_bins)
        except ValueError as err:
            raise ValueError(f"{name}={temperature_split!r} is invalid; no temperature fits it: "
                             f"{str(err).rstrip('.')}.") from None
        record["temperature_scaling"] = {
            "split": temperature_split, "same_split": same_split,
            **{k: scaled[k] for k in ("temperature", "at_bound", "num_fit_examples",
                                      "fit_nll_before", "fit_nll_after")},
            **{k: v for k, v in scaled["after"].items() if k != "temperature"}}
    return record
