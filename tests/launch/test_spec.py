"""`cnnjax.launch.spec`: every field of a job spec is checked, with a message naming the field, the
value and what is valid; good specs come back normalized (absolute paths, defaults filled in)."""

import dataclasses
import os
import re
import shutil

import pytest

from cnnjax.launch.checks import count_trials
from cnnjax.launch.spec import (
    PATH_FIELDS,
    SCHEDULING_FIELDS,
    JobSpec,
    array_indices,
    time_limit_seconds,
    validate_spec,
    without_scheduling,
)
from tests.launch.conftest import CONFIG, RECIPE, ROOT, SWEEP, TRANSFER


def _train(**kw):
    return JobSpec(**{"entry": "train", "workdir": "workdirs/t", "config": CONFIG,
                      "submit_dir": str(ROOT), **kw})


def _sweep(**kw):
    return JobSpec(**{"entry": "sweep", "workdir": "workdirs/s", "config": CONFIG,
                      "sweep": SWEEP, "submit_dir": str(ROOT), **kw})


def test_a_good_train_spec_is_normalized():
    spec = validate_spec(_train(config="experiments/configs/lenet5_digits.py", nodes=2,
                                gpus_per_node=4))
    assert spec.workdir == str(ROOT / "workdirs" / "t")
    assert spec.config == CONFIG
    assert spec.venv == str(ROOT / ".venv")
    assert spec.tasks_per_node == 4  # one process per GPU
    assert spec.num_tasks == 8
    assert spec.job_name == "cnnjax-train-t"
    assert validate_spec(spec) == spec  # idempotent


@pytest.mark.parametrize("entry,files,tasks", [
    ("sweep", {"config": CONFIG, "sweep": SWEEP}, 1),
    ("tune", {"config": CONFIG, "recipe": RECIPE}, 1),
    ("transfer", {"transfer": TRANSFER}, 1),
])
def test_single_process_entry_points_get_one_task(entry, files, tasks):
    spec = validate_spec(JobSpec(entry=entry, workdir="w", gpus_per_node=4, submit_dir=str(ROOT),
                                 **files), num_trials=4 if entry == "sweep" else None)
    assert spec.tasks_per_node == tasks


@pytest.mark.parametrize("mem", ["64G", "64g", "512m", "4096", "0"])
def test_memory_takes_what_sbatch_takes(mem):
    """SLURM reads K/M/G/T in either case, and 0 as all of the node's memory."""
    assert validate_spec(_train(mem=mem)).mem == mem


@pytest.mark.parametrize("field,value", [
    ("partition", "gpu"), ("partition", "gpu,gpu-long"), ("partition", "a100_80gb.q"),
    ("account", "proj-123"), ("account", "Lab_A.1"), ("qos", "high"), ("qos", "normal,low"),
    ("constraint", "a100"), ("constraint", "a100&ib"), ("constraint", "[rack1|rack2]"),
    ("constraint", "(a100|h100)&ib*2"), ("constraint", "!knl,gpu:v100"),
])
def test_slurm_names_and_constraints_that_sbatch_takes(field, value):
    assert getattr(validate_spec(_train(**{field: value})), field) == value


def test_memory_with_non_ascii_digits_is_refused():
    with pytest.raises(ValueError, match="launch: mem='1\u0664G' is invalid"):
        validate_spec(_train(mem="1\u0664G"))  # '14G' with an Arabic-Indic 4


def test_cpu_only_train_runs_one_task_per_node():
    assert validate_spec(_train(gpus_per_node=0, nodes=2)).tasks_per_node == 1


@pytest.mark.parametrize("value,seconds", [
    ("30", 1800), ("30:15", 1815), ("04:00:00", 14400), ("1-00", 86400), ("2-12:30", 217800),
    ("1-02:03:04", 93784), ("100:00:00", 360000),
])
def test_slurm_time_formats(value, seconds):
    assert time_limit_seconds(value) == seconds


@pytest.mark.parametrize("value", ["", "0", "00:00:00", "4h", "1:60:00", "1:00:60", "1-24",
                                   "UNLIMITED", "-1", "1:2:3:4", 30])
def test_bad_time_limits_are_refused(value):
    with pytest.raises(ValueError, match=r"launch: time=.* is invalid; expected a SLURM time"):
        time_limit_seconds(value)


@pytest.mark.parametrize("value", [
    "\u0664", "\u0664\u0660\u0660", "1-\u0660\u0660", "\uff13\uff10"])
def test_time_limits_with_non_ascii_digits_are_refused(value):
    """Python's `\\d` and `int` take Arabic-Indic or fullwidth digits ('\u0664\u0660\u0660' = 400),
    sbatch does not: such a --time passed every check and was written and submitted."""
    with pytest.raises(ValueError, match=r"launch: time=.* is invalid; expected a SLURM time"):
        time_limit_seconds(value)


def test_array_indices_with_non_ascii_digits_are_refused():
    for bad in ("\u0660-\u0661", "\u0661", "0,\uff12"):  # '0-1', '1', '0,2' in other digits
        with pytest.raises(ValueError, match="launch: array="):
            array_indices(bad, 4)


def test_array_indices():
    assert array_indices("0-3", 4) == [0, 1, 2, 3]
    assert array_indices("0,2-3", 4) == [0, 2, 3]
    for bad in ("0-4", "4", "3-1", "a", "0,,1", "-1", "1,1"):
        with pytest.raises(ValueError, match="launch: array="):
            array_indices(bad, 4)


def test_array_indices_count_tasks_when_a_task_runs_several_trials():
    assert array_indices("0-2", 5, trials_per_task=2) == [0, 1, 2]  # tasks of 2, 2 and 1 trials
    with pytest.raises(ValueError, match=re.escape(
            "launch: array='3' is invalid; expected comma-separated indices or ranges a-b "
            "(a <= b) of the 3 array tasks running the sweep's 5 trials 2 to a task, 0-2")):
        array_indices("3", 5, trials_per_task=2)


def test_the_sweep_file_decides_the_array_size():
    assert count_trials(_sweep()) == 4
    with pytest.raises(ValueError, match=r"launch: array='0-4' is invalid; .*4 trials, 0-3"):
        validate_spec(_sweep(array="0-4"), num_trials=count_trials(_sweep()))


def test_a_missing_sweep_file_is_named():
    with pytest.raises(ValueError, match=r"^launch: sweep='nope.py' is invalid; no such file "
                                         r"\(.*/nope.py\)"):
        count_trials(_sweep(sweep="nope.py"))


def test_sweep_overrides_change_the_count(tmp_path):
    sweep = tmp_path / "random.py"
    sweep.write_text(
        "import ml_collections\nfrom cnnjax.tune.space import log_uniform\n\n\n"
        "def get_config():\n    c = ml_collections.ConfigDict()\n"
        "    c.kind, c.seed, c.num_trials, c.metric, c.mode = 'random', 0, 5, 'top1', 'max'\n"
        "    c.parameters = (log_uniform('optimizer.learning_rate', 1e-3, 1.0),)\n"
        "    return c\n")
    assert count_trials(_sweep(sweep=str(sweep))) == 5
    assert count_trials(_sweep(sweep=str(sweep), overrides=("--sweep.num_trials=9",))) == 9
    with pytest.raises(ValueError, match=r"overrides='--sweep.num_trial=9' .*num_trials"):
        count_trials(_sweep(sweep=str(sweep), overrides=("--sweep.num_trial=9",)))


BAD = [
    (dict(entry="predict"), r"entry='predict' is invalid; expected one of \['train', 'sweep'"),
    (dict(config=None), r"config=None is invalid; train needs --config=<file>"),
    (dict(config="experiments/configs/nope.py"), r"config='experiments/configs/nope.py' .*no "
                                                 "such file"),
    (dict(sweep=SWEEP), r"sweep=.* is invalid; train takes no --sweep; it takes --config"),
    (dict(workdir="work dir"), r"workdir='work dir' is invalid; expected a path without white"),
    (dict(workdir="runs/%j"), r"workdir='runs/%j' is invalid; .*'%'"),
    (dict(workdir="exp#3"), r"workdir='exp#3' is invalid; .*'#'"),  # a #SBATCH line ends there
    (dict(workdir=CONFIG), r"workdir=.* is invalid; expected a directory, found a file"),
    (dict(nodes=0), r"nodes=0 is invalid; expected a positive integer"),
    (dict(nodes=1.5), r"nodes=1.5 is invalid; expected a positive integer"),
    (dict(gpus_per_node=-1), r"gpus_per_node=-1 is invalid; expected an integer >= 0"),
    (dict(gpus_per_node=4, tasks_per_node=2), r"tasks_per_node=2 is invalid; expected one task "
                                              r"per GPU, 4 \(gpus_per_node\), or 1 on one node"),
    (dict(nodes=2, gpus_per_node=4, tasks_per_node=1), r"tasks_per_node=1 is invalid; expected "
     r"one task per GPU, 4 .*: this job's 2 node\(s\) x 1 task\(s\) would join 2 JAX processes"),
    (dict(tasks_per_node=0, gpus_per_node=0), r"tasks_per_node=0 is invalid; expected a positive"),
    (dict(cpus_per_task=0), r"cpus_per_task=0 is invalid; expected a positive integer"),
    (dict(mem="64 GB"), r"mem='64 GB' is invalid; expected a size in MB or with a K/M/G/T"),
    (dict(mem="64X"), r"mem='64X' is invalid"),
    (dict(mem="064G"), r"mem='064G' is invalid"),
    (dict(time="4h"), r"time='4h' is invalid; expected a SLURM time limit"),
    (dict(signal_seconds=0), r"signal_seconds=0 is invalid; expected a positive integer"),
    (dict(time="5", signal_seconds=300), r"signal_seconds=300 is invalid; expected 1..299: "
                                         r"seconds before the time limit \(5 = 300 s\)"),
    (dict(signal_seconds=70000, time="2-00"), r"signal_seconds=70000 is invalid; expected "
                                              r"1..65535"),
    (dict(max_requeues=-1), r"max_requeues=-1 is invalid; expected an integer >= 0"),
    (dict(partition="gpu a100"), r"partition='gpu a100' is invalid; expected SLURM partition "
                                 r"names .* without spaces"),
    (dict(account=""), r"account='' is invalid"),
    (dict(qos="high#1"), r"qos='high#1' is invalid"),
    (dict(constraint="a100'"), r"constraint=\"a100'\" is invalid"),
    # sbatch reads '%' as a file-name pattern only in --output/--error; no name holds one.
    (dict(partition="gpu%j"), r"partition='gpu%j' is invalid; expected SLURM partition names of "
                              r"letters, digits, '_', '.' and '-', comma-separated"),
    (dict(partition="gpu,"), r"partition='gpu,' is invalid"),  # an empty name in the list
    (dict(partition="gpu;rm"), r"partition='gpu;rm' is invalid"),
    (dict(account="proj%1"), r"account='proj%1' is invalid; expected a SLURM account name of "
                             r"letters, digits, '_', '.' and '-'"),
    (dict(account="a,b"), r"account='a,b' is invalid"),  # one account per job
    (dict(qos="high%"), r"qos='high%' is invalid; expected SLURM QOS names of letters, digits, "
                        r"'_', '.' and '-', comma-separated"),
    (dict(constraint="a100%"), r"constraint='a100%' is invalid; expected SLURM node features "
                               r"\(letters, digits, '_', '.', '-', ':'\) joined by its operators "
                               r"& \| , \* ! \[ \] \( \)"),
    (dict(constraint="a100$HOME"), r"constraint='a100\$HOME' is invalid"),
    (dict(job_name="my job"), r"job_name='my job' is invalid"),
    (dict(array="0-3"), r"array='0-3' is invalid; only a sweep is an array job"),
    (dict(max_parallel=2), r"max_parallel=2 is invalid; only a sweep is an array job"),
    (dict(trials_per_task=2), r"trials_per_task=2 is invalid; only a sweep is an array job"),
    (dict(venv="no_such_venv"), r"venv='no_such_venv' is invalid; no such directory"),
    (dict(venv="experiments"), r"venv='experiments' is invalid; expected a virtual environment"),
    (dict(python="my python"), r"python='my python' is invalid; expected a command without"),
    # As typed (--env=1X=a), not as the pair it was split into: env=('1X', 'a')
    (dict(env=(("1X", "a=b"),)), r"env='1X=a=b' is invalid; expected NAME=value with NAME of "
                                 r"letters, digits and '_' \(not starting with a digit\)\.$"),
    (dict(env=("A=1",)), r"env='A=1' is invalid; expected NAME=value"),  # not a pair
    (dict(setup=("module load a\nrm -rf x",)), r"setup=.* is invalid; expected one non-empty "
                                               "shell line"),
    (dict(overrides=["--config.a=1"]), r"overrides=\['--config.a=1'\] is invalid; expected a "
                                       "tuple"),
    (dict(overrides=("--config.optimizer.learning_rate 0.1",)),
     r"overrides=.* is invalid; train accepts --config.<field>=<value>, "
     r"--distributed_timeout=<value> \(note the '='\)"),
    (dict(overrides=("config.x=1",)), r"overrides='config.x=1' is invalid"),
    (dict(overrides=("--sweep.num_trials=2",)), r"overrides='--sweep.num_trials=2' is invalid"),
    (dict(overrides=("--workdir=/elsewhere",)),
     r".*--workdir is set by the launcher \(from --workdir\)"),
    (dict(overrides=("--config=other.py",)),
     r".*--config is set by the launcher \(from its own --config\)"),
    (dict(overrides=("--distributed_timeout.x=1",)), r"overrides='--distributed_timeout.x=1'"),
    # The job would start, queue time spent, and end with "timeout_s=0 is invalid" (multi-node).
    (dict(overrides=("--distributed_timeout=0",)),
     r"overrides='--distributed_timeout=0' is invalid; --distributed_timeout takes a positive, "
     r"finite number of seconds"),
    (dict(overrides=("--distributed_timeout=-5",)), r"overrides='--distributed_timeout=-5'"),
    (dict(overrides=("--distributed_timeout=nan",)), r"overrides='--distributed_timeout=nan'"),
    (dict(overrides=("--distributed_timeout=inf",)), r"overrides='--distributed_timeout=inf'"),
    (dict(overrides=("--distributed_timeout=ten",)), r"overrides='--distributed_timeout=ten'"),
    # train has no --trial_index: not "set by the launcher", just not a train flag
    (dict(overrides=("--trial_index=3",)),
     r"overrides='--trial_index=3' is invalid; train accepts --config.<field>=<value>, "
     r"--distributed_timeout=<value> \(note the '='\)\.$"),
    (dict(submit_dir="/no/such/dir"), r"submit_dir='/no/such/dir' is invalid; no such dir"),
    # launch.submit sets it to its checkout, which the message names as the thing to move
    (dict(submit_dir="/a clone/repo"), r"submit_dir='/a clone/repo' is invalid; expected a path "
                                       r"without whitespace.*\(SLURM directives cannot carry "
                                       r"them\); submit_dir is the repository the job runs in "
                                       r"\(launch\.submit's own checkout\): clone or move it"),
]


@pytest.mark.parametrize("changes,message", BAD, ids=[str(c) for c, _ in BAD])
def test_bad_train_specs_are_refused(changes, message):
    with pytest.raises(ValueError, match=r"^launch: " + message):
        validate_spec(_train(**changes))


@pytest.mark.parametrize("changes,message", [
    (dict(nodes=2), r"nodes=2 is invalid; expected 1: sweep runs one process"),
    (dict(tasks_per_node=2, gpus_per_node=2), r"tasks_per_node=2 is invalid; expected 1"),
    (dict(max_parallel=0), r"max_parallel=0 is invalid; expected a positive integer"),
    (dict(overrides=("--trial_index=3",)),
     r".*--trial_index is set by the launcher \(from the array task\)"),
    (dict(overrides=("--trial_count=3",)),
     r".*--trial_count is set by the launcher \(from --trials_per_task\)"),
    (dict(trials_per_task=0), r"trials_per_task=0 is invalid; expected a positive integer"),
    (dict(trials_per_task=2, array="0-2"), r"array='0-2' is invalid; .* of the 2 array tasks "
                                           r"running the sweep's 4 trials 2 to a task, 0-1"),
    (dict(overrides=("--recipe.max_rounds=3",)), r"overrides='--recipe.max_rounds=3'"),
    (dict(sweep=None), r"sweep=None is invalid; sweep needs --sweep=<file>"),
])
def test_bad_sweep_specs_are_refused(changes, message):
    with pytest.raises(ValueError, match=r"^launch: " + message):
        validate_spec(_sweep(**changes), num_trials=4)


def test_a_sweep_needs_its_trial_count():
    with pytest.raises(ValueError, match=r"num_trials \(of the sweep\)=None is invalid"):
        validate_spec(_sweep())


def test_spec_json_round_trip():
    spec = validate_spec(_train(env=(("A", "1"),), setup=("module load x",),
                                overrides=("--config.seed=1",)))
    assert JobSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match=r"launch: spec=\['colour'\] is invalid; unknown fields"):
        JobSpec.from_json({**spec.to_json(), "colour": "red"})


def test_relative_paths_start_at_the_submit_dir(tmp_path):
    repo = tmp_path / "repo"
    (repo / "cfg").mkdir(parents=True)
    (repo / "cfg" / "c.py").write_text("")
    spec = validate_spec(dataclasses.replace(_train(), config="cfg/c.py", workdir="w",
                                             venv=None, submit_dir=str(repo)))
    assert (spec.config, spec.workdir) == (str(repo / "cfg" / "c.py"), str(repo / "w"))
    assert os.getcwd() != str(repo)


@pytest.mark.parametrize("python,expected", [
    ("env/bin/python", "{repo}/env/bin/python"), ("./env/bin/python", "{repo}/env/bin/python"),
    ("/opt/py/bin/python3", "{tmp}/opt/py/bin/python3"), ("python3", "python3")])
def test_a_python_path_starts_at_the_submit_dir_and_a_command_name_stays(tmp_path, python,
                                                                        expected):
    """The job runs `cd <submit_dir>`, so a relative path to python means one there; a bare name
    is looked up in the job's PATH (after the venv's activation)."""
    repo = tmp_path / "repo"
    (repo / "cfg").mkdir(parents=True)
    (repo / "cfg" / "c.py").write_text("")
    if python.startswith("/"):
        python = str(tmp_path) + python
    if "/" in python:
        _executable(repo / python)
    spec = validate_spec(dataclasses.replace(_train(), config="cfg/c.py", workdir="w",
                                             venv=None, python=python, submit_dir=str(repo)))
    assert spec.python == expected.format(repo=repo, tmp=tmp_path)


def _executable(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)


@pytest.mark.parametrize("python,executable,message", [
    ("/nonexistent/python", False, "no such file (/nonexistent/python)"),
    ("env/bin/python", False, "no such file ({repo}/env/bin/python)"),
    ("env/bin/python", True, "expected an executable python ({repo}/env/bin/python is not "
                             "executable)"),
])
def test_a_python_path_that_is_missing_or_not_executable_is_refused(tmp_path, python,
                                                                    executable, message):
    """`--venv=/nonexistent` was refused while `--python=/nonexistent/python` was accepted,
    and the job failed on the cluster instead; both are paths on the shared filesystem."""
    repo = tmp_path / "repo"
    (repo / "cfg").mkdir(parents=True)
    (repo / "cfg" / "c.py").write_text("")
    if executable:  # there, but not executable
        (repo / "env" / "bin").mkdir(parents=True)
        (repo / "env" / "bin" / "python").write_text("")
    with pytest.raises(ValueError, match=re.escape(
            f"python={python!r} is invalid; {message.format(repo=repo)}")):
        validate_spec(dataclasses.replace(_train(), config="cfg/c.py", workdir="w", venv=None,
                                          python=python, submit_dir=str(repo)))


def test_scheduling_fields_are_fields_and_leave_what_decides_results():
    """A misspelt name would silently compare a field meant to be free; and the config, its
    overrides, the process layout, the hardware and the software must stay compared."""
    fields = {f.name for f in dataclasses.fields(JobSpec)}
    assert SCHEDULING_FIELDS.issubset(fields)
    assert {"array", "max_parallel", "time"} <= SCHEDULING_FIELDS
    assert not SCHEDULING_FIELDS & {"entry", "workdir", "config", "sweep", "recipe", "transfer",
                                    "overrides", "nodes", "gpus_per_node", "tasks_per_node",
                                    "cpus_per_task", "partition", "constraint", "venv", "python",
                                    "env", "setup", "submit_dir"}
    spec = _sweep(array="1,3", time="30", overrides=("--config.seed=1",))
    kept = without_scheduling({**spec.to_json(), "future_field": 1})
    assert set(kept) == fields - SCHEDULING_FIELDS | {"future_field"}
    assert kept["overrides"] == ["--config.seed=1"]


def test_a_config_argument_is_kept_and_its_file_checked():
    """`--config=<file>.py:<argument>` (ml_collections' config_flags, experiments/README.md:
    `rcnn_shapes.py:selective_search`) reaches the entry point: the file before the first colon
    must exist, the argument is kept. It was refused as 'no such file'."""
    spec = validate_spec(_train(config="experiments/configs/rcnn_shapes.py:selective_search"))
    assert spec.config == str(ROOT / "experiments" / "configs" / "rcnn_shapes.py") + \
        ":selective_search"
    assert validate_spec(spec) == spec
    with pytest.raises(ValueError, match=r"^launch: config='experiments/configs/nope.py:plain' is "
                                         r"invalid; no such file \(.*/nope.py\)"):
        validate_spec(_train(config="experiments/configs/nope.py:plain"))


def test_path_valued_overrides_are_made_absolute_against_the_repository():
    """The job `cd`s into submit_dir, so a relative `init_from.workdir` or `data.data_dir` is
    read from there; the spec says so (and launch.submit makes them absolute from the user's
    directory first). They were passed verbatim, so the login node's checks read another path."""
    home = os.path.expanduser("~")
    given = ("--config.init_from.workdir=runs/pre", "--config.data.data_dir=~/tfds",
             "--config.distill.teacher_workdir=/abs/../teacher", "--config.data.data_dir=None",
             "--config.data.data_dir=gs://bucket/tfds",
             "--config.data.train_split=train[:10%]", "--config.seed=1")
    spec = validate_spec(_train(overrides=given))
    assert spec.overrides == (f"--config.init_from.workdir={ROOT}/runs/pre",
                              f"--config.data.data_dir={home}/tfds",
                              "--config.distill.teacher_workdir=/abs/../teacher",  # as given
                              "--config.data.data_dir=None", *given[4:])  # a URL as given
    assert validate_spec(spec) == spec
    transfer = validate_spec(JobSpec(entry="transfer", workdir="w", transfer=TRANSFER,
                                     submit_dir=str(ROOT),
                                     overrides=("--transfer.source.data.data_dir=d",)))
    assert transfer.overrides == (f"--transfer.source.data.data_dir={ROOT}/d",)


def _leaf_names(config, prefix=""):
    for name, value in config.items():
        if hasattr(value, "items"):
            yield from _leaf_names(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_path_fields_name_every_path_like_field_of_the_configs():
    """`PATH_FIELDS` is spelled out in the launcher (which imports no engine code): a path-like
    field added to the engine's or a data config would reach the job relative to the repository
    rather than to where the user typed it."""
    from cnnjax.data import spec as data_spec
    from cnnjax.train.config import DIRECTORY_FIELDS, default_config

    names = set(_leaf_names(default_config()))
    for data_config in (data_spec.default_data_config(), data_spec.detection_data_config(),
                        data_spec.segmentation_data_config()):
        names |= {f"data.{name}" for name in _leaf_names(data_config)}
    path_like = {n for n in names if re.search(r"(dir|path|file|folder)s?$", n.split(".")[-1])}
    assert path_like == set(PATH_FIELDS)
    assert set(PATH_FIELDS) >= DIRECTORY_FIELDS


def test_one_train_task_on_one_node_uses_all_its_gpus():
    """A one-task step never joins jax.distributed (`should_initialize`): the one process uses
    every GPU of the node, as on one machine. It was refused as 'expected one task per GPU'."""
    from cnnjax.launch.checks import job_devices

    spec = validate_spec(_train(gpus_per_node=4, tasks_per_node=1))
    assert spec.tasks_per_node == 1 and spec.num_tasks == 1
    assert job_devices(spec, {}) == (4, "1 node(s) x 4 GPU(s)")
    several = validate_spec(_train(nodes=2, gpus_per_node=4))
    assert job_devices(several, {}) == (8, "2 node(s) x 4 GPU(s)")


def test_an_array_throttle_is_pointed_to_max_parallel():
    with pytest.raises(ValueError, match=re.escape(
            "launch: array='0-3%2' is invalid; expected comma-separated indices or ranges a-b "
            "(a <= b) of the sweep's 4 trials, 0-3, e.g. '0-3' or '0,3'; for sbatch's '%N' "
            "throttle (at most N tasks at once) pass --max_parallel=N")):
        array_indices("0-3%2", 4)


NEWLINE_ENDED = [
    ("time", "30\n"), ("time", "1-00:00\n"), ("array", "0-3\n"), ("array", "0,1\n"),
    ("mem", "64G\n"), ("partition", "gpu\n"), ("account", "proj\n"), ("qos", "high\n"),
    ("constraint", "a100\n"), ("job_name", "job\n"),
]


@pytest.mark.parametrize("field,value", NEWLINE_ENDED, ids=[f for f, _ in NEWLINE_ENDED])
def test_a_value_ending_in_a_newline_is_refused(field, value):
    """`$` matches before a trailing newline too: `--array=$'0-3\\n'` and `--time=$'30\\n'` passed
    every check, and the newline split the #SBATCH block (with --max_parallel, '%2' on a line of
    its own ended sbatch's reading, dropping --requeue and --signal)."""
    with pytest.raises(ValueError, match=f"^launch: {field}={re.escape(repr(value))} is invalid"):
        validate_spec(_sweep(**{field: value}), num_trials=4)


def test_an_env_name_ending_in_a_newline_is_refused():
    """It was written as `export FOO` then a line `='b'`."""
    with pytest.raises(ValueError, match=re.escape(r"launch: env='FOO\n=b' is invalid")):
        validate_spec(_train(env=(("FOO\n", "b"),)))


AWKWARD_DIR = "my configs 'q' \"dq\" $HOME `id` %j #1 back\\slash;&*"


def test_config_and_venv_paths_may_hold_what_directives_cannot(tmp_path):
    """Only workdir and submit_dir are written into #SBATCH lines; config files, the venv and a
    python path reach the script shell-quoted (test_slurm.py runs such a script). They were
    refused "(SLURM directives cannot carry them)"."""
    awkward = tmp_path / AWKWARD_DIR
    (awkward / "venv" / "bin").mkdir(parents=True)
    (awkward / "venv" / "bin" / "activate").write_text("")
    python = tmp_path / "py%#'\"\\$x;&"  # no whitespace: a python command may hold none
    python.write_text("")
    python.chmod(0o755)
    shutil.copy(CONFIG, awkward / "c.py")
    shutil.copy(SWEEP, awkward / "s.py")
    spec = validate_spec(_sweep(config=str(awkward / "c.py"), sweep=str(awkward / "s.py"),
                                venv=str(awkward / "venv"), python=str(python)), num_trials=4)
    assert (spec.config, spec.sweep, spec.venv, spec.python) == (
        str(awkward / "c.py"), str(awkward / "s.py"), str(awkward / "venv"), str(python))
    with pytest.raises(ValueError, match=r"^launch: config='/no such/c\.py' is invalid; no such "
                                         r"file \(/no such/c\.py\)\.$"):
        validate_spec(_train(config="/no such/c.py"))


@pytest.mark.parametrize("field", ["workdir", "submit_dir"])
def test_the_paths_in_sbatch_lines_are_refused_what_directives_cannot_carry(tmp_path, field):
    (tmp_path / "a b").mkdir()
    value = str(tmp_path / "a b")
    with pytest.raises(ValueError, match=f"^launch: {field}={re.escape(repr(value))} is invalid; "
                                         r"expected a path without whitespace.*\(SLURM "
                                         r"directives cannot carry them\)"):
        validate_spec(_train(**{field: value}))


def test_the_default_submit_dir_is_checked_as_the_directory_it_stands_for(tmp_path, monkeypatch):
    """submit_dir="." (the default) reaches `#SBATCH --chdir` as the current directory: one whose
    name holds a space or '%' is refused, naming submit_dir. The check ran on "." and let it by."""
    for name in ("repo", "my repo%x"):
        (tmp_path / name / ".venv" / "bin").mkdir(parents=True)
        (tmp_path / name / ".venv" / "bin" / "activate").write_text("")
        shutil.copy(CONFIG, tmp_path / name / "cfg.py")
    monkeypatch.chdir(tmp_path / "repo")
    spec = validate_spec(JobSpec(entry="train", workdir="runs/a", config="cfg.py"))
    assert (spec.submit_dir, spec.workdir) == (str(tmp_path / "repo"),
                                               str(tmp_path / "repo" / "runs" / "a"))
    monkeypatch.chdir(tmp_path / "my repo%x")
    cwd = str(tmp_path / "my repo%x")
    with pytest.raises(ValueError, match=r"^launch: submit_dir='\.' is invalid; expected a path "
                                         r"without whitespace.*\(SLURM directives cannot carry "
                                         r"them\); submit_dir is the repository .*; '\.' is "
                                         f"{re.escape(repr(cwd))}\\.$"):
        validate_spec(JobSpec(entry="train", workdir="runs/a", config="cfg.py"))


def test_a_workdir_under_home_is_checked_as_the_path_it_stands_for(tmp_path, monkeypatch):
    """`~` is expanded before `#SBATCH --chdir/--output` get the workdir: a home directory whose
    name holds a space is refused, naming workdir. The check ran on "~/x" and let it by."""
    (tmp_path / "home").mkdir()
    (tmp_path / "h me").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert validate_spec(_train(workdir="~/x")).workdir == str(tmp_path / "home" / "x")
    monkeypatch.setenv("HOME", str(tmp_path / "h me"))
    home_x = str(tmp_path / "h me" / "x")
    with pytest.raises(ValueError, match=r"^launch: workdir='~/x' is invalid; expected a path "
                                         r"without whitespace.*\(SLURM directives cannot carry "
                                         f"them\\); '~/x' is {re.escape(repr(home_x))}\\.$"):
        validate_spec(_train(workdir="~/x"))
