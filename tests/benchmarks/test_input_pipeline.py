"""benchmarks.input_pipeline on a catalogue dataset under `--mock_examples`, offline.

The installed tensorflow-datasets ships without its `testing/metadata` folder, so a bare
`tfds.testing.mock_data` knows no split sizes and cifar10 looked unprepared: the README's
`--dataset=cifar10 --mock_examples=64` ended in DatasetNotPreparedError before timing anything.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


#: What JAX logs (JAX_LOG_COMPILES=1, set by `_run`) for each program it compiles: the reports
#: are printed whole at the end, so an empty stdout could not show that nothing compiled.
_COMPILED = "Finished XLA compilation"


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "benchmarks.input_pipeline", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_LOG_COMPILES": "1", **(env or {})})


@pytest.mark.slow
def test_mock_examples_times_a_catalogue_dataset_offline(tmp_path):
    """The whole script on mocked cifar10 (no tfds data dir holds it): the pipeline's batches
    have cifar10's shape and the three figures are reported."""
    out = tmp_path / "bench.json"
    empty = tmp_path / "tfds"  # where tfds would look for prepared data: nothing there
    empty.mkdir()
    result = _run("--dataset=cifar10", "--mock_examples=8", "--model=lenet5", "--batch_size=4",
                  "--steps=1", "--warmup=0", "--rounds=1", "--pipeline_batches=3",
                  f"--json_out={out}", env={"TFDS_DATA_DIR": str(empty)})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dataset"] == "cifar10" and report["mock_examples"] == 8
    assert report["image_shape"] == [32, 32, 3]
    for figure in ("pipeline_only", "synthetic", "with_pipeline"):
        assert report[figure]["images_per_s"] > 0, figure
    assert "pipeline alone:" in result.stdout and "step, pipeline batch:" in result.stdout
    assert os.listdir(empty) == []  # the mock's metadata went to a temporary folder


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--dataset=cifar10", "--mock_examples=8"],
     "error: --batch_size=16 is invalid; expected at most the 8 training examples of cifar10 "
     "(--mock_examples=8 mocks 8 per split: raise it, or lower --batch_size)"),
    (["--dataset=fake", "--fake_num_train=8"],
     "error: --batch_size=16 is invalid; expected at most the 8 training examples of fake "
     "(--fake_num_train=8: raise it, or lower --batch_size)"),
    (["--dataset=fake", "--mock_examples=8"],
     "error: --mock_examples=8 is invalid with --dataset=fake"),
    # It sized nothing beside a tfds dataset (the data config now refuses a changed fake_*).
    (["--dataset=cifar10", "--mock_examples=8", "--fake_num_train=8"],
     "error: --fake_num_train=8 is invalid with --dataset=cifar10: it sizes the in-memory "
     "`fake` set only; expected it unset, or --dataset=fake"),
])
def test_a_batch_larger_than_the_train_split_is_one_line_before_compiling(args, message):
    """README's `--dataset=cifar10 --mock_examples=64` at the default --batch_size=128 ended in
    a traceback from train_batches, after the step was built."""
    result = _run(*args, "--model=lenet5", "--batch_size=16", "--steps=1", "--warmup=0",
                  "--rounds=1")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]
    assert _COMPILED not in result.stderr


@pytest.mark.slow
def test_the_mock_writes_the_split_sizes_it_reads_and_never_over_a_prepared_dataset(tmp_path):
    """`sources.mock_tfds_dataset`, which --mock_examples enters: split sizes from the config's
    train and eval splits (slices read their named split), batches of the dataset's shape."""
    from cnnjax.data import pipeline, sources
    from cnnjax.data.spec import resolve

    config = pipeline.default_data_config("cifar10")
    config.data_dir = str(tmp_path)
    config.train_split, config.eval_split = "train[:50%]", "test+train[50%:]"
    assert sources.split_names(config.eval_split) == ["test", "train"]
    with sources.mock_tfds_dataset(resolve(config), 6):
        info = pipeline.get_dataset_info(config)
        batch = next(pipeline.train_batches(config, global_batch_size=3, num_devices=1, seed=0))
    assert info == pipeline.DatasetInfo("cifar10", 10, (32, 32, 3), 3, 9)
    assert batch["image"].shape == (1, 3, 32, 32, 3) and batch["label"].shape == (1, 3)
    # The folder now holds cifar10's metadata, as a prepared copy would: never overwritten.
    with pytest.raises(ValueError, match=r"^data: data_dir='.*' is invalid; it holds a prepared "
                                         r"'cifar10', which the mock's metadata would overwrite"):
        sources.mock_tfds_dataset(resolve(config), 6).__enter__()
    config.data_dir = None
    with pytest.raises(ValueError, match=r"^data: data_dir=None is invalid; expected a folder"):
        sources.mock_tfds_dataset(resolve(config), 6).__enter__()


def test_fed_batch_waits_and_copies_leave_the_warmup_out(monkeypatch):
    """The wait/copy medians took every fed batch, warm-up ones too. A fake clock: each warm-up
    batch waits 100 s and copies in 10 s, each timed one 1 s and 0.1 s; 3 warm-up and 2 timed
    steps a round, so the old medians were the warm-up's."""
    from benchmarks import input_pipeline
    from benchmarks.train_step import interleaved_rounds

    clock = [0.0]
    warm = [True]

    def host():
        while True:
            clock[0] += 100.0 if warm[0] else 1.0
            yield {}

    def shard(batch):
        clock[0] += 10.0 if warm[0] else 0.1
        return batch

    monkeypatch.setattr(input_pipeline.time, "perf_counter", lambda: clock[0])
    fed = input_pipeline.FedBatches(host(), shard)

    def runner(steps):
        warm[0] = steps == 3  # the warm-up's count
        for _ in range(steps):
            fed()
        return [(0.0, 0.0)] * steps

    interleaved_rounds(2, 2, 3, {"synthetic": lambda k: [(0.0, 0.0)] * k, "pipeline": runner},
                       on_timed=fed.keep_timed)
    assert fed.timed == [pytest.approx((1.0, 0.1))] * 4
