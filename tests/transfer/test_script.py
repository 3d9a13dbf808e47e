"""The `experiments.transfer` script as a user runs it: transfer configs are documented and
valid, a real (tiny) digits 0-4 -> 5-9 comparison runs end to end, and a rerun trains nothing."""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import subprocess
import sys

import pytest

from cnnjax.transfer import compare
from tests.commands import assert_exited, ctrl_c_after_checkpoint, run_commands
from tests.experiments.test_configs import _load
from tests.experiments.test_train import _env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRANSFERS = sorted(
    p for p in glob.glob(os.path.join(ROOT, "experiments", "transfers", "*.py"))
    if not p.endswith("__init__.py")
)
DIGITS = os.path.join(ROOT, "experiments", "transfers", "digits_0to4_to_5to9.py")
SHAPES = os.path.join(ROOT, "experiments", "transfers", "shapes_to_segmentation.py")


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """`plans(path)`: a transfer file's config and its `TransferPlan`, built once per module
    (building one checks every run's config: shapes_to_segmentation traces resnet18 and its
    FCN for each, ~10 s, and two tests read that plan). Tests must not change them."""
    built = {}

    def plan(path):
        if path not in built:
            c = _load(path).get_config()
            built[path] = c, compare.TransferPlan(
                c.source, c.target, str(tmp_path_factory.mktemp("transfer")), c.budget_field,
                c.budgets, c.arms, c.seeds, c.arm_overrides, c.metric)
        return built[path]

    return plan


@pytest.mark.parametrize("path", TRANSFERS, ids=os.path.basename)
def test_transfer_configs_document_their_command_and_are_valid(path, plans):
    module = _load(path)
    assert "python -m experiments.transfer" in module.__doc__
    assert "Expected" in module.__doc__ or "Measured" in module.__doc__
    c, plan = plans(path)
    assert len(plan.runs) == len(c.budgets) * len(c.arms) * len(c.seeds)


def test_a_file_with_an_arm_override_runs_with_other_arms(tmp_path):
    """--transfer.arms="('scratch',)" on a file that overrides finetune was refused, and the
    command line cannot empty its arm_overrides: the override now applies to no run."""
    c = _load(os.path.join(ROOT, "experiments", "transfers",
                           "digits_0to4_to_5to9_finetune_lr.py")).get_config()
    plan = compare.TransferPlan(c.source, c.target, str(tmp_path), c.budget_field, c.budgets,
                                ("scratch",), c.seeds, c.arm_overrides, c.metric)
    assert {run["arm"] for run in plan.runs} == {"scratch"}
    assert {run["config"].optimizer.learning_rate for run in plan.runs} == {
        c.target.optimizer.learning_rate}
    assert plan.describe()["arm_overrides"] == {"finetune": {"optimizer.learning_rate": 0.005}}


def test_segmentation_target_reports_its_classifier_source_by_top1(plans):
    """shapes_to_segmentation: a resnet18 classifier fills an FCN's trunk; the target runs are
    compared by mIoU, the source (which has no mIoU) is reported by its own top-1."""
    c, plan = plans(SHAPES)
    assert (c.source.model, c.target.model, c.target.init_from.submodule) == (
        "resnet18", "fcn8s_resnet18", "backbone")
    assert (plan.metric, plan.mode, plan.source_metric) == ("miou", "max", "top1")
    assert compare.describe_setup(c.source, c.target) == (
        "Source resnet18 on shapes; target fcn8s_resnet18 on shapes_segmentation, warm-started "
        "arms load the source into its `backbone`.")
    assert plan.check_data()["train_200-finetune-s0"] == 200


@pytest.mark.parametrize("fed_rgb,message", [
    ("source", "the source's input layer takes 3-channel (RGB) images and this run's have 1 "
               "channel (grey); set data.grey_to_rgb=True"),
    ("target", "the source's input layer takes 1-channel (grey) images and this run feeds its "
               "grey images as RGB (data.grey_to_rgb=True); set data.grey_to_rgb=False"),
])
def test_grey_and_rgb_input_layers_are_named_by_grey_to_rgb_before_the_source_trains(
        tmp_path, fed_rgb, message):
    """The check said to add the input layer to init_from.exclude (which the user never set);
    the engine names data.grey_to_rgb for the same mismatch, and so does the check now."""
    c = _load(DIGITS).get_config()
    c[fed_rgb].data.grey_to_rgb = True
    with pytest.raises(ValueError, match=r"^transfer: the source run's weights cannot "
                                         r"warm-start run .*" + re.escape(message)):
        compare.TransferPlan(c.source, c.target, str(tmp_path), c.budget_field, c.budgets,
                             c.arms, c.seeds, c.arm_overrides, c.metric)


def test_budgets_that_give_the_same_examples_are_refused(tmp_path):
    """Digits 5-9 hold ~143 train images per class: budgets 200 and 1000 both train on all 717,
    so every arm ran twice on identical data under two labels (a warning only)."""
    c = _load(DIGITS).get_config()
    plan = compare.TransferPlan(c.source, c.target, str(tmp_path), c.budget_field, (10, 200, 1000),
                                c.arms, c.seeds, c.arm_overrides, c.metric)
    with pytest.raises(ValueError, match=r"^transfer: budgets=\(10, 200, 1000\) is invalid; "
                                         r"data.train_examples_per_class values \[200, 1000\] "
                                         r"give the same 717 training examples"):
        plan.check_data()
    plan = compare.TransferPlan(c.source, c.target, str(tmp_path), c.budget_field, (10, 1000),
                                c.arms, c.seeds, c.arm_overrides, c.metric)
    assert plan.check_data()["1000-scratch-s0"] == 717


def test_digits_transfer_tasks_are_disjoint_halves():
    c = _load(DIGITS).get_config()
    assert set(c.source.data.classes) | set(c.target.data.classes) == set(range(10))
    assert not set(c.source.data.classes) & set(c.target.data.classes)


@pytest.mark.slow
def test_tiny_digits_transfer_end_to_end_and_rerun(tmp_path):
    out = tmp_path / "transfer"
    command = [sys.executable, "-m", "experiments.transfer", f"--transfer={DIGITS}",
               f"--transfer_dir={out}", "--transfer.source.num_train_steps=20",
               "--transfer.source.eval_every_steps=20", "--transfer.source.schedule.warmup_steps=2",
               "--transfer.target.num_train_steps=10", "--transfer.target.eval_every_steps=10",
               "--transfer.target.schedule.warmup_steps=2", "--transfer.budgets=(1, 3)",
               "--transfer.seeds=(0,)"]
    result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / compare.RESULTS_CSV) as f:
        rows = list(csv.DictReader(f))
    assert [(r["budget"], r["num_train"], r["arm"], r["status"]) for r in rows] == [
        (b, n, a, "completed") for b, n in (("1", "5"), ("3", "15"))
        for a in ("scratch", "finetune", "linear_probe")]
    results = json.loads((out / compare.RESULTS_JSON).read_text())
    assert results["source"]["num_train"] == 721  # digits 0-4 of the 1,438 train scans
    for row in rows:
        workdir = out / "trials" / row["trial_id"]
        summary = json.loads((workdir / "summary.json").read_text())
        assert summary["final_eval"]["num_examples"] == 179  # digits 5-9 of the 359 test scans
        assert ("init_from" in summary) == (row["arm"] != "scratch")
        if row["arm"] != "scratch":
            assert summary["init_from"]["step"] == 20
    assert (out / compare.PLOT_FILE).stat().st_size > 1000
    assert "| 3 | 15 |" in (out / compare.REPORT_FILE).read_text()

    rerun = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count("already completed, skipped") == 7  # the source and 6 runs


@pytest.mark.slow  # starts Python, JAX and TensorFlow in a subprocess
def test_bad_override_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.transfer", f"--transfer={DIGITS}",
         f"--transfer_dir={tmp_path / 't'}", "--transfer.arms=('scratch', 'probe')"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: transfer: arms=('scratch', 'probe') is invalid; expected a non-empty list of "
        "distinct arms from ['scratch', 'finetune', 'linear_probe'].")
    assert not os.path.exists(tmp_path / "t")


def test_a_transfer_config_without_metric_compares_by_the_targets_best_metric(tmp_path):
    """shapes_to_segmentation without `metric`: the segmentation target's best_metric (miou)
    is used by both run_transfer and the script, not a fixed 'top1' its task lacks; empty
    budgets then stop it before anything trains."""
    c = _load(os.path.join(ROOT, "experiments", "transfers",
                           "shapes_to_segmentation.py")).get_config()
    del c.metric
    assert c.target.best_metric == "miou"
    with pytest.raises(ValueError, match=r"transfer: budgets=\[\] is invalid"):
        compare.run_transfer(c.source, c.target, str(tmp_path / "t"),
                             budget_field=c.budget_field, budgets=[], arms=c.arms)
    assert not os.path.exists(tmp_path / "t")


@pytest.mark.slow  # starts Python, JAX and TensorFlow in a subprocess
def test_the_script_leaves_an_unset_metric_to_the_target(tmp_path):
    config = tmp_path / "no_metric.py"
    config.write_text(
        "from experiments.transfers.shapes_to_segmentation import get_config as _base\n\n\n"
        "def get_config():\n    c = _base()\n    del c.metric\n    c.budgets = []\n"
        "    return c\n")
    result = subprocess.run(
        [sys.executable, "-m", "experiments.transfer", f"--transfer={config}",
         f"--transfer_dir={tmp_path / 't'}"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: transfer: budgets=() is invalid"), result.stderr[-2000:]


@pytest.mark.slow
def test_ctrl_c_inside_a_run_is_one_line_naming_it_and_the_results(tmp_path):
    """Ctrl-C ended the comparison with a ~60-line KeyboardInterrupt traceback (the sweep and
    experiments.train say one line); it names the run, where it stopped and the results so far
    (which now list the interrupted source run too), and exits 130."""
    out = tmp_path / "transfer"
    command = [sys.executable, "-m", "experiments.transfer", f"--transfer={DIGITS}",
               f"--transfer_dir={out}", "--transfer.source.num_train_steps=4000",
               "--transfer.source.checkpoint_every_steps=10",
               "--transfer.source.eval_every_steps=1000",
               "--transfer.source.schedule.warmup_steps=2",
               "--transfer.source.progress_bar=False",
               # orbax logs its own traceback when Ctrl-C lands while it finishes an async save
               "--transfer.source.async_checkpoints=False",
               "--transfer.budgets=(1,)", "--transfer.seeds=(0,)"]
    workdir = out / "trials" / compare.SOURCE_ID
    stderr = ctrl_c_after_checkpoint(command, _env(), workdir / "checkpoints", 20)
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert stderr.strip().splitlines()[-1] == (
        f"interrupted: the source run ({workdir}): {summary['message']} "
        f"Results so far: {out / compare.RESULTS_CSV}")
    results = json.loads((out / compare.RESULTS_JSON).read_text())
    assert results["source"]["status"] == "interrupted"
    assert {r["status"] for r in results["runs"]} == {"pending"}


# experiments.transfer with `run_transfer` replaced: it prints what the command gives it and
# returns the rows given as the driver's first argument (`python -m tests.transfer.test_script
# <rows> experiments.transfer <flags>`, forked by run_commands)
_STAND_IN = ("import json, sys\n"
             "import cnnjax.transfer.compare as compare\n"
             "rows = json.loads(sys.argv.pop(1))\n"
             "def run_transfer(source, target, transfer_dir, **kwargs):\n"
             "    print(json.dumps({'source': list(source.data.classes),\n"
             "                      'target': list(target.data.classes), 'dir': transfer_dir,\n"
             "                      **{k: kwargs[k] for k in ('budgets', 'arms', 'seeds')}}),\n"
             "          flush=True)\n"
             "    return rows\n"
             "compare.run_transfer = run_transfer\n"
             "sys.argv = sys.argv[1:]\n"
             "import runpy; runpy.run_module('experiments.transfer', run_name='__main__')")
# the rows run_transfer returns: the command's exit status and last stderr line
_STAND_IN_CASES = {
    "completed": ([{"status": "completed", "trial_id": "1-scratch-s0"}], 0, None),
    "failed": ([{"status": "failed", "trial_id": "1-scratch-s0", "reason": "boom"}], 1,
               "error: 1 run(s) failed: 1-scratch-s0: boom (tracebacks in <run workdir>/"
               "error.log; rerun the command to retry them)"),
}


@pytest.fixture(scope="module")
def stand_in_runs(tmp_path_factory):
    """{case: (transfer_dir, CompletedProcess)} of experiments.transfer on the digits file under
    the stand-in `run_transfer`, one interpreter forking a child per case (~3 s)."""
    root = tmp_path_factory.mktemp("stand_in")
    commands = [["tests.transfer.test_script", json.dumps(rows), "experiments.transfer",
                 f"--transfer={DIGITS}", f"--transfer_dir={root / case}"]
                for case, (rows, *_) in _STAND_IN_CASES.items()]
    results = run_commands(commands, env=_env(),
                           preimport=["cnnjax.transfer.compare", "cnnjax.data.presets"])
    return {case: (root / case, result)
            for case, result in zip(_STAND_IN_CASES, results, strict=True)}


@pytest.mark.parametrize("case", _STAND_IN_CASES)
def test_the_command_forwards_the_file_and_exits_1_on_a_failed_run(stand_in_runs, case):
    """The file's source (classes 0-4) and target (5-9) reach run_transfer in that order, with
    its budgets, arms and seeds; a failed run must end the command with status 1 naming it."""
    transfer_dir, result = stand_in_runs[case]
    _, status, line = _STAND_IN_CASES[case]
    assert_exited(result, status, line)
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "source": [0, 1, 2, 3, 4], "target": [5, 6, 7, 8, 9], "dir": str(transfer_dir),
        "budgets": [1, 5, 50], "arms": ["scratch", "finetune", "linear_probe"], "seeds": [0, 1]}


if __name__ == "__main__":  # a stand-in driver, for `stand_in_runs`
    exec(_STAND_IN)  # noqa: S102
