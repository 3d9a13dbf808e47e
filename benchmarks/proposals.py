r"""External region proposals on a detection set: selective search (each strategy and upsampling
scale) against the dense windows of `fast_rcnn_small` / `rcnn_small`. Per setting: time per
image, proposals per image, and recall (share of ground-truth boxes with a proposal of IoU >= 0.5
and >= 0.7), the numbers that decide `data.proposals`.

  python -m benchmarks.proposals --num_images=500 --strategies=fast,quality --scales=1,2

Reads `shapes_multi` (generated offline on first use) or any tfds set with `objects/bbox`.
"""

from __future__ import annotations

import time

from absl import app, flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command's flags, defined only when it runs (importing the module defines none, so
    it clashes with no other command's `--dataset`)."""
    flags.DEFINE_string("dataset", "shapes_multi", "tfds dataset with objects/bbox.")
    flags.DEFINE_string("split", "test", "Split to read.")
    flags.DEFINE_string("data_dir", None, "tfds data_dir (None: tfds' default).")
    flags.DEFINE_integer("num_images", 500, "Images read from the split's start.", lower_bound=1)
    flags.DEFINE_list("strategies", ["fast", "quality"], "Selective search modes.")
    flags.DEFINE_list("scales", ["1", "2"], "Upsampling before segmenting.")


def _settings() -> list[tuple[str, float]]:
    """(strategy, scale) pairs of --strategies x --scales, each checked against what
    selective_search takes (a ValueError naming the flag), before any image is read."""
    from cnnjax.detection.selective_search import SCALE_RANGE, STRATEGIES
    from cnnjax.utils.validation import check_choice, check_number

    owner = "benchmarks.proposals"
    for flag in ("strategies", "scales"):
        if not FLAGS[flag].value:
            raise ValueError(f"{owner}: --{flag}='' is invalid; expected at least one value "
                             "(nothing to run)")
    strategies = [check_choice(owner, "--strategies", s, STRATEGIES) for s in FLAGS.strategies]
    low, high = SCALE_RANGE  # selective_search's, as strings (flags) rather than numbers
    scales = [check_number(owner, "--scales", s, f"expected numbers in [{low:g}, {high:g}] (the "
                           "upsampling applied before segmenting)", low=low, high=high)
              for s in FLAGS.scales]
    return [(strategy, scale) for strategy in strategies for scale in scales]


def _recall(proposals: list, truth: list, threshold: float) -> float:
    from cnnjax.detection.evaluation import box_iou_np

    hits = total = 0
    for boxes, gt in zip(proposals, truth, strict=True):
        total += len(gt)
        if len(boxes) and len(gt):
            hits += int((box_iou_np(gt, boxes).max(axis=1) >= threshold).sum())
    return hits / max(total, 1)


def _report(name: str, proposals: list, truth: list, seconds: float | None) -> None:
    """One line per proposal method; `seconds` None: not timed (shown as "-")."""
    import numpy as np

    counts = np.array([len(p) for p in proposals])
    rate = "-" if seconds is None else f"{1e3 * seconds / len(proposals):.1f}"
    print(f"{name:<32} {rate:>8} ms/img   proposals/img median "
          f"{np.median(counts):5.0f} mean {counts.mean():6.1f} max {counts.max():5d}   "
          f"recall@0.5 {_recall(proposals, truth, 0.5):.3f}  @0.7 "
          f"{_recall(proposals, truth, 0.7):.3f}")


def main(argv: list[str]) -> None:
    from cnnjax.utils.cli import one_line_errors, start_command

    start_command(argv)
    import numpy as np
    import tensorflow_datasets as tfds

    from cnnjax.data.sources import prepared_builder  # its module registers cnnjax's datasets
    from cnnjax.detection.selective_search import selective_search
    from cnnjax.models import create_model
    from cnnjax.models.rcnn import window_proposals
    from cnnjax.utils.files import check_output_dir

    with one_line_errors():  # a bad dataset or split: one line, before any image is read
        settings = _settings()
        if "[" in FLAGS.split:
            raise ValueError(f"benchmarks.proposals: --split={FLAGS.split!r} is invalid; expected "
                             "a split name without a slice (--num_images takes its first N)")
        split = f"{FLAGS.split}[:{FLAGS.num_images}]"
        if FLAGS.data_dir is not None:  # tfds would print its build banner, then fail inside it
            check_output_dir(FLAGS.data_dir, "--data_dir", writable=False)
        try:  # tfds's own error lists its whole catalogue (hundreds of lines)
            builder = tfds.builder(FLAGS.dataset, data_dir=FLAGS.data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            builder = None
        features = builder.info.features if builder is not None else {}
        if "objects" not in features or "bbox" not in features["objects"]:
            raise ValueError(f"benchmarks.proposals: --dataset={FLAGS.dataset!r} is invalid; "
                             "expected a detection dataset with objects/bbox boxes (e.g. "
                             "shapes_multi, voc/2007)")
        # what tfds.load does, but never downloading: cnnjax's offline sets build here
        builder = prepared_builder(
            builder, FLAGS.dataset, FLAGS.data_dir,
            what=f"benchmarks.proposals: --dataset={FLAGS.dataset!r}",
            data_dir_label="--data_dir", data_dir_setting="--data_dir")
        dataset = builder.as_dataset(split=split)
    images, truth = [], []
    for example in tfds.as_numpy(dataset):
        height, width = example["image"].shape[:2]
        images.append(example["image"])
        ymin, xmin, ymax, xmax = example["objects"]["bbox"].T
        truth.append(np.stack([xmin * width, ymin * height, xmax * width, ymax * height], 1))
    print(f"{FLAGS.dataset}[{split}]: {len(images)} images, {sum(map(len, truth))} objects, "
          f"image {images[0].shape}")
    for name in ("fast_rcnn_small", "rcnn_small"):
        model = create_model(name)
        windows = [window_proposals(im.shape[:2], model.proposal_sizes, model.proposal_stride)
                   for im in images]
        _report(f"dense windows ({name})", windows, truth, None)  # a grid: not timed
    for strategy, scale in settings:
        started = time.perf_counter()
        boxes = [selective_search(im, strategy=strategy, scale=scale) for im in images]
        _report(f"selective search {strategy} x{scale:g}", boxes, truth,
                time.perf_counter() - started)


if __name__ == "__main__":
    _define_flags()
    from cnnjax.utils.cli import parse_flags  # flag errors: one `error:` line, as elsewhere

    app.run(main, flags_parser=parse_flags)
