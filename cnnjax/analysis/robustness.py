"""Top-1 of a trained classifier under common corruptions (Hendrycks & Dietterich, ICLR 2019):
the library behind `python -m experiments.robustness` (see that script for the outputs).

`run_robustness(workdir, ...)` loads the run's best checkpoint (`load_trained`), reads its eval
split through the run's own eval transform up to the pixels before normalization
(`Transforms.eval_pixels`, 32x32 or 224x224, in [0, 255]), corrupts them
(`cnnjax.analysis.corruptions`: CIFAR-10-C's table at 32, ImageNet-C's at 224),
stores the result as CIFAR-10-C does (uint8, truncated), then normalizes it as the run's eval
does (`Transforms.normalize`), and measures top-1 per corruption x severity into
`<workdir>/robustness/robustness.json`, atomically after every cell (an interrupted command
resumes; a finished one is reprinted, its headline written back for the cells requested).
With source='tfds' each cell reads tfds's corrupted copy of the run's eval split instead:
`cifar10_corrupted/<corruption>_<severity>`'s test split for runs trained on `cifar10`,
`imagenet2012_corrupted/<corruption>_<severity>`'s validation split for runs trained on
`imagenet2012` (`TFDS_CORRUPTED`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import TYPE_CHECKING, Any

from cnnjax.utils.files import distinct_name
from cnnjax.utils.validation import invalid

if TYPE_CHECKING:  # numpy, ml_collections and the data pipeline load lazily, when used
    from collections.abc import Callable, Iterable, Iterator

    import ml_collections
    import numpy as np

    from cnnjax.data.spec import Spec
    from cnnjax.data.transforms import Transforms
    from cnnjax.train.trained import TrainedRun

_OWNER = "robustness"
SOURCES = ("on_the_fly", "tfds")
#: Images corrupted and classified at a time by `run_robustness` (per cell).
_CHUNK = 1024


@dataclasses.dataclass(frozen=True)
class CorruptedSet:
    """tfds's corrupted copy of one dataset's eval split, one config per corruption x severity.

    `split` is the only split it holds (clean top-1 must come from the same images). `size` is
    the image side of the corruption table its images were made with (`corruptions.TABLES`).
    `stored_as_eval_crop`: its images are stored as the eval view already (ImageNet-C's 224x224
    centre crops, the region `resize_center_crop` keeps: 224/256 of the shorter side), so they
    are read as stored, without the run's resize and crop (which would crop them again); the
    run's model must then see images of that size.
    """

    tfds_name: str
    split: str
    size: int
    stored_as_eval_crop: bool
    holds: str  # what it is a corrupted copy of, for messages
    build: str  # how to prepare it, for the not-prepared hint


#: tfds's corrupted sets by the dataset (`data.name`) a run was trained on.
TFDS_CORRUPTED = {
    "cifar10": CorruptedSet(
        "cifar10_corrupted", "test", 32, False, "CIFAR-10's test split",
        "`tfds build cifar10_corrupted` prepares all 95"),
    "imagenet2012": CorruptedSet(
        "imagenet2012_corrupted", "validation", 224, True,
        "ImageNet's validation split",
        "`tfds build imagenet2012_corrupted` prepares all 95, from ImageNet's validation "
        "archive, which tfds needs downloaded by hand"),
}


def parse_corruptions(value: str, channels: int, on_the_fly: bool = True,
                      tfds_dataset: str | None = None) -> tuple[list[str], dict[str, str]]:
    """`--corruptions` as names for `channels`-channel images, and those `all` skips (why):
    with `on_the_fly`, also those this machine cannot compute (OpenCV missing); with
    `tfds_dataset` (a tfds corrupted set), also those it holds no configs of. A named one that
    cannot be measured is refused."""
    from cnnjax.analysis import corruptions
    from cnnjax.utils.validation import invalid

    held = corruptions.TFDS_CONFIG_NAMES[tfds_dataset] if tfds_dataset else corruptions.CORRUPTIONS
    if value.strip() == "all":
        skipped = {n: f"defined for RGB images only; this run's images have {channels} channel"
                   for n in corruptions.CORRUPTIONS if n not in corruptions.available(channels)}
        skipped.update({n: f"tfds's {tfds_dataset} has no configs of it"
                        for n in corruptions.available(channels) if n not in held})
        if on_the_fly:
            skipped.update({n: why for n in corruptions.available(channels)
                            if (why := corruptions.missing_dependency(n))})
        return [n for n in corruptions.available(channels) if n not in skipped], skipped
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise invalid(_OWNER, "corruptions", value,
                      f"expected 'all' or some of {list(corruptions.CORRUPTIONS)}")
    for name in names:
        corruptions.check_corruption(name, 1, channels)
        if tfds_dataset:
            corruptions.tfds_config_name(name, tfds_dataset)
        if on_the_fly:
            corruptions.check_computable(name)
    return list(dict.fromkeys(names)), {}


def parse_severities(value: str) -> list[int]:
    """`--severities` as sorted distinct integers from 1 to 5."""
    from cnnjax.utils.validation import invalid

    try:
        levels = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        levels = []
    if not levels or any(s not in range(1, 6) for s in levels):
        raise invalid(_OWNER, "severities", value, "expected integers from 1 to 5, e.g. '1,3,5'")
    return levels


def eval_pipeline(config: ml_collections.ConfigDict) -> tuple:
    """`(spec, source, transforms)` of `config`'s eval split, as `pipeline.eval_batches` builds
    them."""
    from cnnjax.data import sources
    from cnnjax.data.spec import resolve
    from cnnjax.data.transforms import make_transforms

    spec = resolve(config.data)
    source = sources.open_source(spec)
    return spec, source, make_transforms(spec, source)


def eval_pixel_batches(config: ml_collections.ConfigDict, max_examples: int | None,
                       as_stored: bool = False, chunk: int = _CHUNK) -> tuple:
    """`(batches, transforms)`: `batches` iterates `(float32 [n, H, W, C] pixels in [0, 255],
    int labels [n])` chunks (n <= `chunk`) of the first `max_examples` (None: all) of `config`'s
    eval split in stored order, through the eval transform up to normalization (whole levels
    where it does not resize). `as_stored`: images already stored as the eval view
    (ImageNet-C's crops) are only resized to the model's size where they differ from it (never,
    as `run_robustness` requires), not cropped again."""
    import tensorflow as tf

    spec, source, transforms = eval_pipeline(config)
    if as_stored:
        transforms = dataclasses.replace(transforms, eval_transform="resize")
    ds = source.read(spec.eval_split, (0, 1))
    if max_examples is not None:
        ds = ds.take(max_examples)

    def pixels(ex: dict) -> dict:
        image = tf.clip_by_value(transforms.eval_pixels(source.decode(ex["image"])), 0.0, 1.0)
        return {"image": image * 255.0,
                "label": tf.cast(ex["label"], tf.int32)}

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        empty = True
        for batch in ds.map(pixels).batch(chunk).as_numpy_iterator():
            empty = False
            yield batch["image"], batch["label"]
        if empty:
            raise ValueError(f"{_OWNER}: split={spec.eval_split!r} is invalid; it holds no "
                             "examples.")

    return batches(), transforms


def eval_pixels(config: ml_collections.ConfigDict, max_examples: int | None,
                as_stored: bool = False) -> tuple:
    """`(float32 [N, H, W, C] pixels in [0, 255], int labels [N], transforms)`: all of
    `eval_pixel_batches` at once."""
    import numpy as np

    batches, transforms = eval_pixel_batches(config, max_examples, as_stored)
    images, labels = zip(*batches, strict=True)
    return np.concatenate(images), np.concatenate(labels), transforms


def make_classify(run: TrainedRun, transforms: Transforms,
                  batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """`classify(pixels [N, H, W, C] in [0, 255]) -> predicted classes [N]`: normalized as the run's
    eval does, in padded batches of `batch_size` (one compilation), under the run's conv
    lowering."""
    import numpy as np

    from cnnjax.train.trained import jit_inference

    infer = jit_inference(
        run, lambda variables, images: run.model.apply(variables, images, train=False).argmax(-1))

    def classify(pixels: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(pixels), batch_size):
            chunk = pixels[start:start + batch_size].astype(np.float32) / 255.0
            images = np.asarray(transforms.normalize(chunk))
            padded = np.zeros((batch_size, *images.shape[1:]), np.float32)
            padded[:len(images)] = images
            out.append(np.asarray(infer(run.variables, padded))[:len(images)])
        return np.concatenate(out)

    return classify


def corrupted_set(dataset: str) -> CorruptedSet:
    """tfds's corrupted copy of `dataset`'s eval split; a ValueError naming the datasets that
    have one for any other (`source='tfds'` is refused for their runs)."""
    from cnnjax.utils.validation import invalid

    if dataset not in TFDS_CORRUPTED:
        have = " and ".join(f"{d!r} ({c.tfds_name}: {c.holds})"
                            for d, c in TFDS_CORRUPTED.items())
        raise invalid(_OWNER, "source", "tfds", f"tfds has corrupted copies of {have} only, and "
                      f"this run was trained on {dataset!r}; use source='on_the_fly'")
    return TFDS_CORRUPTED[dataset]


def corrupted_config(config: ml_collections.ConfigDict, name: str,
                     severity: int) -> ml_collections.ConfigDict:
    """`config` (a run's, trained on a dataset of `TFDS_CORRUPTED`) reading its tfds corrupted
    set's `<name>_<severity>` config instead: `cifar10_corrupted`'s test split or
    `imagenet2012_corrupted`'s validation split (each set's only split, so also as the train
    split: the config stays a whole one the engine can evaluate; a per-class train limit is
    lifted, as it would be checked against this split). tfds's config names are
    `corruptions.tfds_config_name`'s (cifar10_corrupted renames two corruptions)."""
    import ml_collections

    from cnnjax.analysis.corruptions import tfds_config_name

    tfds_set = corrupted_set(config.data.name)
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.tfds_name = (f"{tfds_set.tfds_name}/{tfds_config_name(name, tfds_set.tfds_name)}"
                             f"_{severity}")
    config.data.eval_split = config.data.train_split = tfds_set.split
    # A low-data run's per-class limit would be checked against the train split, now this one
    # (a class with fewer images would be refused); the eval split is never cut by it.
    config.data.train_examples_per_class = None
    return config


def summarize(record: dict) -> dict:
    """`record` with the means over the requested grid (`record["requested"]`: corruptions x
    severities; older records: every cell): mean corruption top-1, per corruption, and the
    relative drop from clean. Cells on file outside that grid (an earlier command's) are kept
    but not averaged, and while a requested cell is missing (an interrupted command) the
    headline is None and `complete` False: a partial mean would leave out the cells not yet
    measured, whichever they are. A corruption's mean is likewise left out until each of its
    requested severities is measured."""
    requested = record.get("requested")
    if requested is None:  # written before "requested" existed
        grid = [(n, s) for n, per in record["cells"].items() for s in per]
    else:
        grid = [(n, str(s)) for n in requested["corruptions"] for s in requested["severities"]]
    measured = [(n, s) for n, s in grid if s in record["cells"].get(n, {})]
    record["complete"] = len(measured) == len(grid)
    record["measured_cells"] = f"{len(measured)} of {len(grid)}"
    per_corruption: dict[str, list[float]] = {}
    for n, s in measured:
        per_corruption.setdefault(n, []).append(record["cells"][n][s])
    # A corruption's mean, like the headline, once each of its requested severities is measured
    wanted = {n: sum(1 for m, _ in grid if m == n) for n in per_corruption}
    record["per_corruption_mean_top1"] = {n: sum(v) / len(v) for n, v in per_corruption.items()
                                          if len(v) == wanted[n]}
    if not record["complete"] or not measured or "clean_top1" not in record:
        record["mean_corruption_top1"] = record["relative_drop"] = None
        return record
    mean = sum(record["cells"][n][s] for n, s in measured) / len(measured)
    clean = record["clean_top1"]
    record["mean_corruption_top1"] = mean
    record["relative_drop"] = (clean - mean) / clean if clean else None
    return record


#: Settings two records must share to be compared cell by cell: the same images, the same noise.
_COMPARED_SETTINGS = ("source", "split", "seed", "max_examples", "clean")
#: The record fields saying which images those were (a record without one is not checked on it).
_COMPARED_DATA = ("dataset", "num_examples")


def _check_comparable(record: dict, baseline: Any, given_as: str | None) -> None:
    """Raises unless `record` is complete and `baseline` can be compared with it
    (`check_baseline_covers`)."""
    if not record.get("complete"):
        raise invalid(_OWNER, "record", record.get("workdir", "?"),
                      f"it is incomplete ({record.get('measured_cells', '?')} requested cells "
                      "measured); rerun the same command to measure the rest before comparing "
                      "with a baseline")
    check_baseline_covers(record, baseline, given_as)


def check_baseline_covers(record: dict, baseline: Any, given_as: str | None = None) -> None:
    """Raises unless `baseline` is a robustness record of the same images and noise as `record`
    (settings, dataset, corruption parameters) holding each cell `record` requests; `given_as`
    (default: the baseline's workdir) names the baseline in the errors. Reads only what a
    record holds before its cells are measured, so `run_robustness` refuses a baseline first."""
    if not isinstance(baseline, dict):
        raise invalid(_OWNER, "baseline", type(baseline), "expected a robustness record (a dict)")
    if (lacking := [k for k in ("cells", "clean_top1") if k not in baseline]):
        raise invalid(_OWNER, "baseline", sorted(baseline, key=str), "expected a robustness "
                      f"record (with 'cells' and 'clean_top1'); it lacks "
                      f"{' and '.join(map(repr, lacking))}")
    where = given_as or baseline.get("workdir", "?")
    mine, theirs = record.get("settings") or {}, baseline.get("settings") or {}
    differ = [f"{k}: {mine.get(k)!r} here, {theirs.get(k)!r} there" for k in _COMPARED_SETTINGS
              if mine.get(k) != theirs.get(k)]
    # The same split name and seed on another dataset (or image size) are other images.
    differ += [f"{k}: {record.get(k)!r} here, {baseline.get(k)!r} there"
               for k in _COMPARED_DATA if k in baseline and record.get(k) != baseline.get(k)]
    severities = [str(s) for s in record["requested"]["severities"]]
    names = list(record["requested"]["corruptions"])
    mine_table, their_table = record.get("parameters") or {}, baseline.get("parameters") or {}
    differ += [f"{n}'s parameters: {mine_table[n]!r} here, {their_table[n]!r} there"
               for n in names if n in mine_table and n in their_table
               and mine_table[n] != their_table[n]]
    if differ:
        raise invalid(_OWNER, "baseline", where,
                      f"it was measured with other settings ({'; '.join(differ)}); measure both "
                      "runs on the same dataset and image size, with the same --split, "
                      "--max_examples, --seed and --source")
    missing = [f"{n} severity {s}" for n in names for s in severities
               if s not in baseline["cells"].get(n, {})]
    if missing:
        raise invalid(_OWNER, "baseline", where,
                      f"the baseline lacks cells {', '.join(missing)}; run experiments.robustness "
                      "on it with the same --corruptions and --severities")


def corruption_errors(record: dict, baseline: dict, given_as: str | None = None) -> dict:
    """Hendrycks & Dietterich's corruption errors of `record` against `baseline` (a record of
    another run, their AlexNet, on the same images): with E = 1 - top-1 summed over the requested
    severities s, CE_c = sum_s E_{s,c} / sum_s E^base_{s,c} and relative CE_c =
    sum_s (E_{s,c} - E_clean) / sum_s (E^base_{s,c} - E^base_clean); mCE and relative mCE are
    their means over the corruptions (None when a ratio is undefined: a zero denominator), and
    `benchmark_mce` / `benchmark_relative_mce` over the requested benchmark corruptions only
    (the paper's mCE leaves out its four validation ones; None when none was requested).
    `given_as`: how the baseline was named (a workdir or a record's JSON path), for errors;
    default its record's workdir."""
    _check_comparable(record, baseline, given_as)
    severities = [str(s) for s in record["requested"]["severities"]]
    names = list(record["requested"]["corruptions"])

    def misclassified(top1: float, of: dict) -> float:
        """The error `1 - top1` in images (exact: a top-1 is k / num_examples), so that equal
        errors cancel exactly in the relative CE's differences (in float rates, a residue of
        1e-17 left a ratio of 1e14 where it is undefined); a rate where the count is unknown."""
        count = of.get("num_examples")
        return round((1 - top1) * count) if count else 1 - top1

    def ratio(numerator: float, denominator: float) -> float | None:
        return numerator / denominator if denominator else None

    ce, relative = {}, {}
    clean, base_clean = misclassified(record["clean_top1"], record), misclassified(
        baseline["clean_top1"], baseline)
    # per-image error rates' ratio: the counts' ratio times the baseline's image count over
    # this record's (equal, the two being refused above otherwise, unless either lacks it)
    scale = (baseline.get("num_examples") or 1) / (record.get("num_examples") or 1)
    for name in names:
        errors = [misclassified(record["cells"][name][s], record) for s in severities]
        base = [misclassified(baseline["cells"][name][s], baseline) for s in severities]
        ce[name] = ratio(scale * sum(errors), sum(base))
        relative[name] = ratio(scale * sum(e - clean for e in errors),
                               sum(b - base_clean for b in base))

    def mean(values: dict, only: list[str] = names) -> float | None:
        chosen = [values[name] for name in only]
        return None if not chosen or None in chosen else sum(chosen) / len(chosen)

    from cnnjax.analysis.corruptions import VALIDATION_CORRUPTIONS
    benchmark = [name for name in names if name not in VALIDATION_CORRUPTIONS]
    return {"baseline": {"workdir": baseline.get("workdir", given_as or "?"),
                         "model": baseline.get("model"),
                         "step": (baseline.get("settings") or {}).get("step")},
            "corruption_error": ce, "mce": mean(ce),
            "relative_corruption_error": relative, "relative_mce": mean(relative),
            "benchmark_corruptions": benchmark, "benchmark_mce": mean(ce, benchmark),
            "benchmark_relative_mce": mean(relative, benchmark)}


def read_baseline(given: str, file_name: str) -> dict:
    """The baseline record `given` names: a robustness JSON file, or a run's workdir, whose
    `robustness/<file_name>` (the file of the same flags as this command's) is read."""
    path = given if os.path.isfile(given) else os.path.join(given, "robustness", file_name)
    if not os.path.isfile(path):
        raise invalid(_OWNER, "baseline", given,
                      f"it has no robustness/{file_name}: run experiments.robustness on the "
                      "baseline run first, with the same flags")
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as err:
        raise invalid(_OWNER, "baseline", given, f"{path!r} cannot be read ({err})") from None
    if not isinstance(record, dict) or "cells" not in record:
        raise invalid(_OWNER, "baseline", given, f"{path!r} is not a robustness record")
    return record


def table(record: dict) -> str:
    """The cells as a text table: one row per corruption, one column per severity, of the
    requested grid the means cover (cells an earlier command measured stay in the record only:
    shown beside a mean that leaves them out, they read as averaged)."""
    requested = record.get("requested")  # None: written before "requested" existed
    levels = record["severities"] if requested is None else requested["severities"]
    names = list(record["cells"]) if requested is None else requested["corruptions"]
    lines = [f"{'corruption':<18}" + "".join(f"{'s' + str(s):>8}" for s in levels) + f"{'mean':>8}"]
    for name in names:
        per = record["cells"].get(name, {})
        row = "".join(f"{per[str(s)]:>8.4f}" if str(s) in per else f"{'-':>8}" for s in levels)
        mean = record.get("per_corruption_mean_top1", {}).get(name)
        lines.append(f"{name:<18}{row}" + (f"{mean:>8.4f}" if mean is not None else f"{'-':>8}"))
    if record.get("mean_corruption_top1") is None:
        lines.append(f"clean top-1{_weights_note(record)} {record['clean_top1']:.4f}; incomplete: "
                     f"{record.get('measured_cells', '?')} requested cells measured (rerun the "
                     "same command to finish; no mean until then)")
    else:
        drop = record.get("relative_drop")  # None: undefined, the clean top-1 being 0
        lines.append(f"clean top-1{_weights_note(record)} {record['clean_top1']:.4f}; mean "
                     "corruption top-1 "
                     f"{record['mean_corruption_top1']:.4f}; relative drop "
                     + (f"{drop:.4f}" if drop is not None else "n/a (clean top-1 is 0)"))
    errors = record.get("baseline_errors")
    if errors:
        def shown(value: float | None, undefined_when: str) -> str:
            return f"n/a ({undefined_when})" if value is None else f"{value:.4f}"

        mce = shown(errors["mce"], "a corruption the baseline classifies without error")
        relative_mce = shown(errors["relative_mce"], "a corruption whose baseline errors average "
                                                     "its clean error")
        lines.append(f"mCE {mce}, relative mCE {relative_mce} "
                     f"against {errors['baseline']['model']} ({errors['baseline']['workdir']})")
        benchmark = errors.get("benchmark_corruptions")  # absent from records before session 50
        if benchmark is not None and len(benchmark) < len(errors["corruption_error"]):
            lines.append(
                f"over the {len(benchmark)} benchmark corruptions (the paper's mCE leaves out "
                "its validation ones): " + (
                    f"mCE {shown(errors['benchmark_mce'], 'see above')}, relative mCE "
                    f"{shown(errors['benchmark_relative_mce'], 'see above')}" if benchmark
                    else "none requested"))
    return "\n".join(lines)


def _weights_note(record: dict) -> str:
    """" (EMA weights)" for a record of the run's weight average, else ""."""
    return " (EMA weights)" if (record.get("settings") or {}).get("weights") == "ema" else ""


def plot(record: dict, path: str) -> str:
    """Top-1 vs severity, one line per corruption, clean top-1 dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cnnjax.utils.files import save_figure

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, per in record["cells"].items():
        levels = sorted(int(s) for s in per)
        ax.plot(levels, [per[str(s)] for s in levels], marker="o", label=name)
    ax.axhline(record["clean_top1"], color="black", linestyle="--", label="clean")
    source = record.get("tfds_dataset") or record["source"]
    ax.set(xlabel="severity", ylabel="top-1", xticks=record["severities"], ylim=(0, 1.02),
           title=f"{record['model']} step {record['step']}{_weights_note(record)} on "
                 f"{record['dataset']} {record['split']} ({source})")
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    return save_figure(fig, path)


def run_robustness(workdir: str, corruptions: str = "all", severities: str = "1,2,3,4,5",
                   split: str | None = None, max_examples: int | None = None, seed: int = 0,
                   source: str = "on_the_fly", step: int | None = None, batch_size: int = 256,
                   log: Callable[[str], None] = print, baseline: dict | None = None,
                   baseline_given_as: str | None = None, ema: bool = False) -> tuple[dict, str]:
    """Measures (or resumes, or reprints) the record of the flags above; returns it and its JSON
    path. With `ema` the run's weight average is measured (a run with `config.ema.decay` set),
    in its own file (`..._ema.json`). A `baseline` record (named `baseline_given_as` in errors)
    that `corruption_errors` would refuse (other settings, lacking a requested cell) is refused
    before anything is measured, where it was refused after every cell."""
    from cnnjax.analysis import corruptions as corruptions_lib
    from cnnjax.utils.lock import directory_lock

    levels, max_examples, batch_size, seed = _check_arguments(severities, max_examples,
                                                              batch_size, seed, source)
    run = _load_classifier(workdir, step, ema)
    tfds_set = corrupted_set(run.config.data.name) if source == "tfds" else None
    config, spec, transforms = _evaluated_config(run, split, tfds_set)
    _check_image_size(workdir, transforms.out_shape, tfds_set)
    # The table the cells use: a tfds set's images were made with the table of its size
    # (cifar10_corrupted: CIFAR-10-C's whatever the run's size); on the fly, the one for the
    # run's size.
    table = corruptions_lib.parameters(tfds_set.size if tfds_set else transforms.out_shape[0])
    names, skipped = parse_corruptions(corruptions, transforms.out_shape[2],
                                       on_the_fly=tfds_set is None,
                                       tfds_dataset=tfds_set.tfds_name if tfds_set else None)
    clean, labels, transforms = eval_pixels(config, max_examples)
    if tfds_set is None:
        # Stored once as every cell is (uint8, truncated), and corrupted from that: the clean
        # top-1 and the cells then start from the same images (for resized data, digits'
        # upsampled scans, the float pixels differ from the stored ones by a level in a third
        # of the pixels). A tfds set's cells are its own images, so its clean top-1 is the
        # run's evaluation as it is (truncating ImageNet's resized crops took half a level).
        clean = corruptions_lib.quantize(clean)
    settings = {"source": source, "split": spec.eval_split, "seed": seed,
                "max_examples": max_examples, "step": run.step,
                # older records: "uint8" (cells corrupted from the unquantized pixels), or none
                # (the clean top-1 unquantized too); tfds ones before session 48 truncated it
                "clean": "the run's evaluation" if tfds_set else "uint8, corrupted from it"}
    if ema:  # only then: the records of trained weights keep the settings they were written with
        settings["weights"] = "ema"
    if baseline is not None:  # before a cell is measured or an old record moved aside
        check_baseline_covers(_new_record(run, spec, tfds_set, settings, labels, skipped, table,
                                          {}, names, levels), baseline, baseline_given_as)
    out_dir, stem = _output_dir(workdir), _file_stem(source, split, seed, max_examples,
                                                     run.step if step is not None else None, ema)
    path = os.path.join(out_dir, stem + ".json")
    old = _previous_record(out_dir, stem, settings, log)
    record = _new_record(run, spec, tfds_set, settings, labels, skipped, table,
                         old.get("cells", {}), names, levels)
    todo = [(n, s) for n in names for s in levels if str(s) not in record["cells"][n]]
    if not todo and "clean_top1" in old:
        log(f"All {len(names) * len(levels)} cells already measured in {path}:")
        # written back with this request's headline (fewer cells than the file's request: their
        # mean), as a command measuring a new cell would, so the file holds what is printed
        kept = {"clean_top1": old["clean_top1"]}
        if "baseline_errors" in old and old.get("requested") == record["requested"]:
            kept["baseline_errors"] = old["baseline_errors"]  # of these very cells: not lost
        with directory_lock(out_dir, "workdir"):
            return _finish({**record, **kept}, path), path
    if tfds_set:  # every config still needed is named before anything is written
        _check_tfds_configs_prepared(config, todo, tfds_set)
    with directory_lock(out_dir, "workdir"):  # one robustness command per run at a time
        classify = make_classify(run, transforms, batch_size)
        _measure_clean(record, classify, clean, labels, tfds_set, log)
        _measure_cells(record, path, todo, classify, log,
                       lambda name, severity: _cell_chunks(config, clean, labels, name, severity,
                                                           seed, max_examples, tfds_set))
        return _finish(record, path), path


def _check_arguments(severities: str, max_examples: int | None, batch_size: int, seed: int,
                     source: str) -> tuple[list[int], int | None, int, int]:
    """`(severities, max_examples, batch_size, seed)` as Python ints (a NumPy integer too: the
    record's JSON holds them), once every argument checkable without the run is checked (before
    the run is loaded, so a typo costs no checkpoint read)."""
    from cnnjax.utils.validation import check_choice, check_non_negative_int, check_positive_int

    levels = parse_severities(severities)
    if max_examples is not None:
        max_examples = check_positive_int(_OWNER, "max_examples", max_examples)
    batch_size = check_positive_int(_OWNER, "batch_size", batch_size)
    seed = check_non_negative_int(_OWNER, "seed", seed)
    check_choice(_OWNER, "source", source, SOURCES)
    return levels, max_examples, batch_size, seed


def _load_classifier(workdir: str, step: int | None, ema: bool = False) -> TrainedRun:
    """The run at `workdir` (`load_trained`, its weight average with `ema`), refused unless it
    trained a classifier."""
    from cnnjax.train.config import config_task
    from cnnjax.train.trained import load_trained

    run = load_trained(workdir, step, ema=ema)
    task = config_task(run.config)
    if task != "classification":
        raise invalid(_OWNER, "workdir", workdir, f"expected a classifier's run, not a {task} "
                      "run (corruption top-1 is defined for classifiers)")
    return run


def _evaluated_config(run: TrainedRun, split: str | None,
                      tfds_set: CorruptedSet | None) -> tuple:
    """`(config, spec, transforms)` of the split the clean top-1 is measured on: `split` (None:
    the run's eval split), refused when tfds's corrupted set holds other images."""
    from cnnjax.train.trained import check_split, with_split

    if tfds_set is None:  # (a tfds set's split is checked against that set's, below)
        check_split(run, split, f"{_OWNER}: split")  # not tfds's raw error at the first read
    config = with_split(run.config, split)
    spec, _, transforms = eval_pipeline(config)
    if tfds_set and spec.eval_split != tfds_set.split:
        raise invalid(_OWNER, "split", spec.eval_split,
                      f"{tfds_set.tfds_name} holds {tfds_set.holds} only, so clean and "
                      "corrupted top-1 would come from different images; evaluate "
                      f"split={tfds_set.split!r}")
    return config, spec, transforms


def _check_image_size(workdir: str, out_shape: tuple, tfds_set: CorruptedSet | None) -> None:
    """Refuses a model whose images have no corruption table, or (a tfds set read as stored)
    differ in size from the set's."""
    from cnnjax.analysis.corruptions import IMAGE_SIZES

    size = out_shape[:2]
    if size[0] != size[1] or size[0] not in IMAGE_SIZES:
        raise invalid(_OWNER, "workdir", workdir,
                      f"its model sees {size[0]}x{size[1]} images; the corruption tables are for "
                      "32x32 (CIFAR-10-C's) and 224x224 (ImageNet-C's)")
    if tfds_set and tfds_set.stored_as_eval_crop and size[0] != tfds_set.size:
        raise invalid(_OWNER, "workdir", workdir,
                      f"its model sees {size[0]}x{size[1]} images, and {tfds_set.tfds_name} "
                      f"stores {tfds_set.size}x{tfds_set.size} centre crops, read as stored; "
                      "use source='on_the_fly'")


def _output_dir(workdir: str) -> str:
    """`<workdir>/robustness`, created; a file in its way is named as that folder, not as the
    workdir."""
    from cnnjax.utils.files import check_output_dir

    return check_output_dir(os.path.join(workdir, "robustness"), "--workdir's robustness folder")


def record_file_name(severities: str = "1,2,3,4,5", split: str | None = None,
                     max_examples: int | None = None, seed: int = 0, source: str = "on_the_fly",
                     step: int | None = None, batch_size: int = 256, ema: bool = False) -> str:
    """The JSON file name under `<workdir>/robustness/` that `run_robustness` with these
    arguments writes: known before any work, so a `--baseline` lacking it is refused first."""
    _, max_examples, _, seed = _check_arguments(severities, max_examples, batch_size, seed,
                                                source)
    return _file_stem(source, split, seed, max_examples, step, ema) + ".json"


def _file_stem(source: str, split: str | None, seed: int, max_examples: int | None,
               explicit_step: int | None, ema: bool = False) -> str:
    """robustness[_tfds][_<settings>]: one file per choice of split, seed, example cap, explicit
    step and weights (`_ema`), so a quick check never replaces a long measurement. A split with
    characters a file name leaves out (`test[:50%]`, `test[50%:]`) adds a hash, so slices stay
    apart."""
    chosen = [f"split-{distinct_name(split, '-')}" if split else "",
              f"seed{seed}" if seed else "", f"max{max_examples}" if max_examples else "",
              f"step{explicit_step}" if explicit_step is not None else "",
              "ema" if ema else ""]
    return "_".join(["robustness", *(["tfds"] if source == "tfds" else []),
                     *(part for part in chosen if part)])


def _previous_record(out_dir: str, stem: str, settings: dict, log: Callable[[str], None]) -> dict:
    """The record on file at `<out_dir>/<stem>.json` ({} if none); one of other settings (the
    run's best/latest step moved on, say) is kept beside it under a name no file has, with its
    plot, and {} returned."""
    from cnnjax.utils.files import read_json
    from cnnjax.utils.lock import directory_lock

    path = os.path.join(out_dir, stem + ".json")
    old = read_json(path) or {}
    if not old or old.get("settings") == settings:
        return old
    theirs = old.get("settings") or {}
    differ = "; ".join(f"{k}: {theirs.get(k)!r} there, {settings.get(k)!r} here"
                       for k in sorted({*theirs, *settings}) if theirs.get(k) != settings.get(k))
    png = os.path.splitext(path)[0] + ".png"
    with directory_lock(out_dir, "workdir"):
        kept_stem = base = os.path.join(out_dir, f"{stem}_step{old.get('step', 'old')}")
        copy = 2
        while os.path.exists(kept_stem + ".json"):  # never replace a record kept before
            kept_stem, copy = f"{base}_{copy}", copy + 1
        os.replace(path, kept_stem + ".json")
        if os.path.exists(png):
            os.replace(png, kept_stem + ".png")
    log(f"{path} was measured with other settings ({differ}); kept as {kept_stem}.json, "
        "measuring these afresh")
    return {}


def _new_record(run: TrainedRun, spec: Spec, tfds_set: CorruptedSet | None, settings: dict,
                labels: np.ndarray, skipped: dict, table: dict, done: dict, names: list[str],
                levels: list[int]) -> dict:
    """The record of this command before it measures: the cells `done` on file (this request's
    corruptions added, empty), the severities of both, and the table parameters of each."""
    return {"workdir": run.workdir, "model": run.config.model, "dataset": run.config.data.name,
            "split": spec.eval_split, "step": run.step, "checkpoint": run.how,
            "source": settings["source"],
            "tfds_dataset": tfds_set.tfds_name if tfds_set else None,
            "settings": settings, "num_examples": int(len(labels)),
            "severities": sorted({*levels, *(int(s) for per in done.values() for s in per)}),
            "skipped": skipped,
            "parameters": {n: [list(c) if isinstance(c, tuple) else c
                               for c in table[n]]
                           for n in {*done, *names}},
            "cells": {n: dict(done.get(n, {})) for n in [*done, *names]},
            "requested": {"corruptions": names, "severities": levels}}


def _check_tfds_configs_prepared(config: ml_collections.ConfigDict, todo: list[tuple[str, int]],
                                 tfds_set: CorruptedSet) -> None:
    """Names the first tfds config of `todo` not prepared, with how to prepare the set."""
    from cnnjax.data.sources import DatasetNotPreparedError

    for name, severity in todo:
        try:
            eval_pipeline(corrupted_config(config, name, severity))
        except DatasetNotPreparedError as e:
            raise DatasetNotPreparedError(
                f"{e} For source='tfds', prepare each `{tfds_set.tfds_name}/<corruption>_"
                f"<severity>` config you evaluate ({tfds_set.build}), or use "
                "source='on_the_fly'.") from None


def _measure_clean(record: dict, classify: Callable[[np.ndarray], np.ndarray],
                   clean: np.ndarray, labels: np.ndarray, tfds_set: CorruptedSet | None,
                   log: Callable[[str], None]) -> None:
    """Sets and logs the record's clean top-1 of `clean`, the stored images (uint8) every
    on-the-fly cell is corrupted from, so the drop measures the corruption alone."""
    import numpy as np

    started = time.time()
    record["clean_top1"] = float(np.mean(classify(clean) == labels))
    log(f"clean top-1 {record['clean_top1']:.4f} over {len(labels)} examples of "
        f"{record['split']!r} ({time.time() - started:.1f} s, compilation included)"
        + (f"; corrupted cells from tfds's {tfds_set.tfds_name}" if tfds_set else ""))


def _cell_chunks(config: ml_collections.ConfigDict, clean: np.ndarray, labels: np.ndarray,
                 name: str, severity: int, seed: int, max_examples: int | None,
                 tfds_set: CorruptedSet | None) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """The cell's `(pixels, labels)` a chunk at a time: a cell never holds more than one chunk's
    corrupted copy (a float64 one of all 50,000 ImageNet images would be 60 GB)."""
    from cnnjax.analysis.corruptions import corrupt, quantize

    if tfds_set:
        chunks, _ = eval_pixel_batches(corrupted_config(config, name, severity), max_examples,
                                       tfds_set.stored_as_eval_crop)
        return chunks
    # per-example noise (first_index): the same draws as one whole-split call
    return ((quantize(corrupt(clean[i:i + _CHUNK], name, severity, seed, first_index=i)),
             labels[i:i + _CHUNK]) for i in range(0, len(labels), _CHUNK))


def _measure_cells(record: dict, path: str, todo: list[tuple[str, int]],
                   classify: Callable[[np.ndarray], np.ndarray], log: Callable[[str], None],
                   cell_chunks: Callable[[str, int], Iterable[tuple[np.ndarray, np.ndarray]]],
                   ) -> None:
    """Measures the cells of `todo` into the record, each written to `path` atomically as it is
    measured (an interrupted command resumes at the first missing one)."""
    from cnnjax.utils.files import write_json

    for k, (name, severity) in enumerate(todo, 1):
        started = time.time()
        record["cells"][name][str(severity)] = _top1(classify, cell_chunks(name, severity))
        write_json(path, summarize(record))
        log(f"[{k}/{len(todo)}] {name} severity {severity}: top-1 "
            f"{record['cells'][name][str(severity)]:.4f} ({time.time() - started:.1f} s)")


def _top1(classify: Callable[[np.ndarray], np.ndarray],
          chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """The fraction of `chunks`' images `classify` gets right."""
    import numpy as np

    correct = total = 0
    for pixels, cell_labels in chunks:
        correct += int(np.sum(classify(pixels) == cell_labels))
        total += len(cell_labels)
    return correct / total


def _finish(record: dict, path: str) -> dict:
    """The measured record summarized, with its plot beside `path`, written to `path`."""
    from cnnjax.utils.files import write_json

    record = summarize(record)
    record["plot"] = plot(record, os.path.splitext(path)[0] + ".png")
    write_json(path, record)
    return record
