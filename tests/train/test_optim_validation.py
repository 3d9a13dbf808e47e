"""optim.py's pre-compilation checks (exact messages) and warmup ahead of every schedule."""

import glob
import importlib.util
import math
import os

import ml_collections
import numpy as np
import optax
import pytest

from cnnjax.train.config import default_config
from cnnjax.train.optim import build_optimizer, build_schedule, check_optimization
from tests.train.test_optim import _config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = [c for c in sorted(glob.glob(os.path.join(ROOT, "experiments", "configs", "*.py")))
           if not os.path.basename(c).startswith("_")]
NAN, INF = math.nan, math.inf


def _load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _raises(config, message):
    with pytest.raises(ValueError) as err:
        build_optimizer(config)
    assert str(err.value) == message


UNIT_OPEN = "expected 0 <= {} < 1."
POSITIVE = "expected a positive finite number."
FINITE = "expected a finite number >= 0."


@pytest.mark.parametrize(
    "optimizer,fields,message",
    [
        ("sgd", {"momentum": -0.5}, "momentum=-0.5 is invalid; " + UNIT_OPEN.format("momentum")),
        ("sgd", {"momentum": 1.5}, "momentum=1.5 is invalid; " + UNIT_OPEN.format("momentum")),
        ("sgd", {"momentum": 1.0}, "momentum=1.0 is invalid; " + UNIT_OPEN.format("momentum")),
        ("sgd", {"momentum": NAN}, "momentum=nan is invalid; " + UNIT_OPEN.format("momentum")),
        ("rmsprop", {"momentum": 1.5},
         "momentum=1.5 is invalid; " + UNIT_OPEN.format("momentum")),
        ("adam", {"b1": 1.0}, "b1=1.0 is invalid; " + UNIT_OPEN.format("b1")),
        ("adam", {"b1": NAN}, "b1=nan is invalid; " + UNIT_OPEN.format("b1")),
        ("adam", {"b2": -0.1}, "b2=-0.1 is invalid; " + UNIT_OPEN.format("b2")),
        ("adamw", {"b2": 1.5}, "b2=1.5 is invalid; " + UNIT_OPEN.format("b2")),
        ("adamw", {"b1": -0.5}, "b1=-0.5 is invalid; " + UNIT_OPEN.format("b1")),
        ("adam", {"eps": 0.0}, "eps=0.0 is invalid; " + POSITIVE),
        ("adamw", {"eps": -1e-8}, "eps=-1e-08 is invalid; " + POSITIVE),
        ("adam", {"eps": INF}, "eps=inf is invalid; " + POSITIVE),
        ("rmsprop", {"eps": -1.0}, "eps=-1.0 is invalid; " + POSITIVE),
        ("rmsprop", {"decay": 1.5}, "decay=1.5 is invalid; " + UNIT_OPEN.format("decay")),
        ("rmsprop", {"decay": -0.1}, "decay=-0.1 is invalid; " + UNIT_OPEN.format("decay")),
        ("rmsprop", {"decay": 1.0}, "decay=1.0 is invalid; " + UNIT_OPEN.format("decay")),
        ("sgd", {"weight_decay": NAN}, "weight_decay=nan is invalid; " + FINITE),
        ("adamw", {"weight_decay": NAN}, "weight_decay=nan is invalid; " + FINITE),
        ("sgd", {"weight_decay": INF}, "weight_decay=inf is invalid; " + FINITE),
        ("adam", {"weight_decay": -0.1}, "weight_decay=-0.1 is invalid; " + FINITE),
        ("sgd", {"grad_clip_norm": NAN}, "grad_clip_norm=nan is invalid; " + POSITIVE),
        ("sgd", {"momentum": 0.0, "nesterov": True},
         "nesterov=True is invalid; Nesterov momentum needs momentum > 0 (momentum=0.0)."),
        ("rmsprop", {"momentum": 0.0, "nesterov": True},
         "nesterov=True is invalid; Nesterov momentum needs momentum > 0 (momentum=0.0)."),
        # the shipped SGD configs set nesterov=True: with adam it was dropped without a word
        ("adam", {"nesterov": True}, "nesterov=True is invalid; adam does not use it (only sgd "
         "and rmsprop read it); set --config.optimizer.nesterov=False."),
        ("adamw", {"nesterov": True}, "nesterov=True is invalid; adamw does not use it (only "
         "sgd and rmsprop read it); set --config.optimizer.nesterov=False."),
    ],
)
def test_bad_optimizer_fields(optimizer, fields, message):
    config = _config("constant", optimizer, **{f"optimizer__{k}": v for k, v in fields.items()})
    _raises(config, "optimizer: " + message)


@pytest.mark.parametrize(
    "schedule,fields,message",
    [
        ("cosine", {"alpha": -0.1}, "alpha=-0.1 is invalid; expected 0 <= alpha <= 1."),
        ("cosine", {"alpha": 1.5}, "alpha=1.5 is invalid; expected 0 <= alpha <= 1."),
        ("cosine", {"alpha": NAN}, "alpha=nan is invalid; expected 0 <= alpha <= 1."),
        ("one_cycle", {"pct_start": 0.0},
         "pct_start=0.0 is invalid; expected 0 < pct_start < 1."),
        ("one_cycle", {"pct_start": 1.0},
         "pct_start=1.0 is invalid; expected 0 < pct_start < 1."),
        ("one_cycle", {"pct_start": 1.5},
         "pct_start=1.5 is invalid; expected 0 < pct_start < 1."),
        ("one_cycle", {"div_factor": 0.0}, "div_factor=0.0 is invalid; " + POSITIVE),
        ("one_cycle", {"div_factor": -25.0}, "div_factor=-25.0 is invalid; " + POSITIVE),
        ("one_cycle", {"final_div_factor": 0.0},
         "final_div_factor=0.0 is invalid; " + POSITIVE),
        ("one_cycle", {"final_div_factor": INF},
         "final_div_factor=inf is invalid; " + POSITIVE),
        ("one_cycle", {"warmup_steps": 10},
         "warmup_steps=10 is invalid; expected 0 with schedule 'one_cycle', which warms up by "
         "itself over its first pct_start of the run."),
        ("warmup_cosine", {"warmup_steps": 10, "init_value": -0.1},
         "init_value=-0.1 is invalid; " + FINITE),
        ("warmup_cosine", {"warmup_steps": 10, "init_value": NAN},
         "init_value=nan is invalid; " + FINITE),
        ("cosine", {"warmup_steps": 10, "init_value": -0.1},
         "init_value=-0.1 is invalid; " + FINITE),
        ("warmup_cosine", {"end_value": -1e-3}, "end_value=-0.001 is invalid; " + FINITE),
        ("linear", {"end_value": INF}, "end_value=inf is invalid; " + FINITE),
        ("cosine", {"warmup_steps": 100}, "warmup_steps=100 is invalid; expected "
         "0 <= warmup_steps < num_train_steps=100."),
        ("linear", {"warmup_steps": -1}, "warmup_steps=-1 is invalid; expected "
         "0 <= warmup_steps < num_train_steps=100."),
        ("exponential", {"decay_rate": 0.0}, "decay_rate=0.0 is invalid; expected 0 < "
         "decay_rate <= 1 (above 1 the rate would grow exponentially)."),
        ("exponential", {"decay_rate": -0.5}, "decay_rate=-0.5 is invalid; expected 0 < "
         "decay_rate <= 1 (above 1 the rate would grow exponentially)."),
        ("exponential", {"decay_rate": 1.5}, "decay_rate=1.5 is invalid; expected 0 < "
         "decay_rate <= 1 (above 1 the rate would grow exponentially)."),
        ("exponential", {"decay_rate": NAN}, "decay_rate=nan is invalid; expected 0 < "
         "decay_rate <= 1 (above 1 the rate would grow exponentially)."),
        ("exponential", {"transition_steps": 0},
         "transition_steps=0 is invalid; expected a positive integer."),
        # "Practically no decay" as a huge period overflowed the int32 step arithmetic when the
        # first step compiled (an OverflowError naming no field).
        ("exponential", {"transition_steps": 3_000_000_000},
         "transition_steps=3000000000 is invalid; expected a positive integer <= 2147483647 "
         "(2**31 - 1: the schedule divides the int32 step counter by it)."),
        ("piecewise", {"boundaries": (30, 2**31)}, "boundaries=(30, 2147483648) is invalid; "
         "expected step numbers <= 2147483647 (2**31 - 1: the step counter is int32)."),
        ("piecewise", {"boundaries": (30,), "decay_factor": -1.0}, "decay_factor=-1.0 is "
         "invalid; expected 0 < decay_factor <= 1 (the rate is multiplied by it at each "
         "boundary)."),
        ("piecewise", {"boundaries": (30,), "decay_factor": 0.0}, "decay_factor=0.0 is "
         "invalid; expected 0 < decay_factor <= 1 (the rate is multiplied by it at each "
         "boundary)."),
        ("piecewise", {"boundaries": (30,), "decay_factor": NAN}, "decay_factor=nan is "
         "invalid; expected 0 < decay_factor <= 1 (the rate is multiplied by it at each "
         "boundary)."),
        ("piecewise", {"boundaries": (10, 10)}, "boundaries=(10, 10) is invalid; expected "
         "strictly increasing step numbers > 0 (each boundary decays the rate once)."),
        ("piecewise", {"boundaries": (60, 30)}, "boundaries=(60, 30) is invalid; expected "
         "strictly increasing step numbers > 0 (each boundary decays the rate once)."),
        ("piecewise", {"boundaries": (0, 30)}, "boundaries=(0, 30) is invalid; expected "
         "strictly increasing step numbers > 0 (each boundary decays the rate once)."),
        ("piecewise", {"boundaries": (30.5,)}, "boundaries=(30.5,) is invalid; expected a "
         "sequence of integer step numbers."),
        ("piecewise", {"warmup_steps": 10, "boundaries": (10, 60)}, "boundaries=(10, 60) is "
         "invalid; expected strictly increasing step numbers > warmup_steps=10 (each boundary "
         "decays the rate once)."),
    ],
)
def test_bad_schedule_fields(schedule, fields, message):
    config = _config(schedule, **{f"schedule__{k}": v for k, v in fields.items()})
    _raises(config, "schedule: " + message)
    with pytest.raises(ValueError, match="^schedule: "):
        check_optimization(config)


@pytest.mark.parametrize("schedule,fields,message", [
    ("cosine", {"end_value": 0.05}, "end_value=0.05 is invalid; schedule 'cosine' does not "
     "read it (the final rate of linear and warmup_cosine (cosine's floor is alpha)); it "
     "applies with schedule.name in ['linear', 'warmup_cosine'], so set it to 0."),
    ("warmup_cosine", {"alpha": 0.5, "warmup_steps": 5}, "alpha=0.5 is invalid; schedule "
     "'warmup_cosine' does not read it (the cosine floor as a fraction of the peak); it applies "
     "with schedule.name in ['cosine'], so set it to 0."),
    ("one_cycle", {"end_value": 1e-5}, "end_value=1e-05 is invalid; schedule 'one_cycle' does "
     "not read it (the final rate of linear and warmup_cosine (cosine's floor is alpha)); it "
     "applies with schedule.name in ['linear', 'warmup_cosine'], so set it to 0."),
    ("one_cycle", {"init_value": 0.01}, "init_value=0.01 is invalid; schedule 'one_cycle' does "
     "not read it (the rate a warmup starts from); it applies with schedule.name in "
     "['constant', 'piecewise', 'exponential', 'cosine', 'linear', 'warmup_cosine'], so set it "
     "to 0."),
    ("warmup_cosine", {"init_value": 0.01, "warmup_steps": 0}, "init_value=0.01 is invalid; "
     "schedule 'warmup_cosine' does not read it (the rate a warmup starts from); it applies "
     "with schedule.warmup_steps > 0 with 'warmup_cosine', so set it to 0."),  # optax: the peak
    ("cosine", {"boundaries": (30, 60)}, "boundaries=(30, 60) is invalid; schedule 'cosine' "
     "does not read it (the decay steps of 'piecewise'); set schedule.name='piecewise', or "
     "boundaries=()."),
    ("cosine", {"init_value": 0.01}, "init_value=0.01 is invalid; schedule 'cosine' does not "
     "read it (the rate a warmup starts from); it applies with schedule.warmup_steps > 0 with "
     "'cosine', so set it to 0."),
])
def test_a_schedule_field_the_schedule_would_ignore_is_refused(schedule, fields, message):
    """The schedule fields default to 0; a value the chosen schedule never reads used to be
    dropped silently (a cosine with end_value=0.05 still decayed to 0)."""
    config = _config(schedule, **{f"schedule__{k}": v for k, v in fields.items()})
    _raises(config, "schedule: " + message)


def test_a_numeric_string_endpoint_the_schedule_would_ignore_is_refused():
    """The readers' checks take "0.5" as 0.5, so an unread "0.5" (a config built without type
    safety; typed ConfigDict fields refuse strings) was skipped as a bad type and dropped."""
    config = ml_collections.ConfigDict(_config("linear").to_dict(), type_safe=False)
    config.schedule.alpha = "0.5"
    _raises(config, "schedule: alpha='0.5' is invalid; schedule 'linear' does not read it (the "
                    "cosine floor as a fraction of the peak); it applies with schedule.name in "
                    "['cosine'], so set it to 0.")
    config.schedule.alpha = "0"
    build_optimizer(config)


def test_endpoint_fields_the_schedule_reads_are_accepted():
    for schedule, fields in [("cosine", {"alpha": 0.1}), ("linear", {"end_value": 0.01}),
                             ("warmup_cosine", {"end_value": 0.01, "init_value": 0.01,
                                                "warmup_steps": 5}),
                             ("cosine", {"init_value": 0.01, "warmup_steps": 5}),
                             ("piecewise", {"boundaries": (30,)})]:
        build_optimizer(_config(schedule, **{f"schedule__{k}": v for k, v in fields.items()}))


def test_shipped_piecewise_boundaries_past_a_short_run_are_logged(caplog):
    """resnet20_cifar10's (32000, 48000) with --config.num_train_steps=1000 (a smoke run, a
    tuning round) never decay: said in the log, not refused."""
    config = _load(os.path.join(ROOT, "experiments", "configs", "resnet20_cifar10.py")).get_config()
    build_optimizer(config)  # its own 64k steps are fine
    assert "never decay" not in caplog.text
    config.num_train_steps = 1000
    build_optimizer(config)
    assert ("schedule.boundaries (32000, 48000): [32000, 48000] at or after "
            "num_train_steps=1000 never decay the rate in this run.") in caplog.text


@pytest.mark.parametrize("field,value", [("nesterov", 1), ("staircase", "yes")])
def test_flags_must_be_bools(field, value):
    """A config built from plain dicts has no type lock: a non-bool flag is refused, not
    truth-tested."""
    config = {"num_train_steps": 10,
              "optimizer": {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9},
              "schedule": {"name": "exponential", "transition_steps": 5}}
    config["optimizer" if field == "nesterov" else "schedule"][field] = value
    group = "optimizer" if field == "nesterov" else "schedule"

    with pytest.raises(ValueError) as err:
        build_optimizer(ml_collections.ConfigDict(config))
    assert str(err.value) == f"{group}: {field}={value!r} is invalid; expected True or False."


@pytest.mark.parametrize(
    "fields",
    [
        {"optimizer__momentum": 0.0},
        {"optimizer__name": "adam", "optimizer__b1": 0.0, "optimizer__b2": 0.0},
        {"optimizer__name": "rmsprop", "optimizer__decay": 0.0, "optimizer__momentum": 0.0},
        {"schedule__name": "cosine", "schedule__alpha": 1.0},
        {"schedule__name": "exponential", "schedule__decay_rate": 1.0},
        {"schedule__name": "piecewise", "schedule__boundaries": (), "schedule__decay_factor": 1.0},
        {"schedule__name": "piecewise", "schedule__boundaries": (1, 99)},
        {"schedule__name": "warmup_cosine", "schedule__warmup_steps": 99},
    ],
)
def test_edge_values_are_accepted(fields):
    build_optimizer(_config(**fields))


def test_duplicate_free_boundaries_decay_once_each():
    schedule = build_schedule(_config("piecewise", schedule__boundaries=(10, 11)))
    np.testing.assert_allclose([schedule(s) for s in (9, 10, 11)], [0.1, 0.01, 0.001], rtol=1e-6)


W_STEPS = (0, 1, 5, 9, 10, 11, 20, 29, 30, 31, 55, 99, 100)


@pytest.mark.parametrize(
    "name,fields,reference",
    [
        ("constant", {"warmup_steps": 10, "init_value": 0.01},
         optax.join_schedules([optax.linear_schedule(0.01, 0.1, 10),
                               optax.constant_schedule(0.1)], [10])),
        ("piecewise", {"warmup_steps": 10, "boundaries": (30, 60)},
         optax.join_schedules([optax.linear_schedule(0.0, 0.1, 10),
                               optax.piecewise_constant_schedule(0.1, {20: 0.1, 50: 0.1})],
                              [10])),
        ("exponential", {"warmup_steps": 10, "transition_steps": 10, "decay_rate": 0.5},
         optax.join_schedules([optax.linear_schedule(0.0, 0.1, 10),
                               optax.exponential_decay(0.1, 10, 0.5)], [10])),
        ("cosine", {"warmup_steps": 30, "alpha": 0.01},
         optax.join_schedules([optax.linear_schedule(0.0, 0.1, 30),
                               optax.cosine_decay_schedule(0.1, 70, alpha=0.01)], [30])),
        # the same cosine is optax's warmup_cosine with end_value = alpha * peak
        ("cosine", {"warmup_steps": 30, "alpha": 0.01},
         optax.warmup_cosine_decay_schedule(0.0, 0.1, 30, 100, end_value=0.001)),
        ("linear", {"warmup_steps": 20, "end_value": 0.01},
         optax.join_schedules([optax.linear_schedule(0.0, 0.1, 20),
                               optax.linear_schedule(0.1, 0.01, 80)], [20])),
    ],
)
def test_warmup_before_every_schedule_matches_optax(name, fields, reference):
    schedule = build_schedule(_config(name, **{f"schedule__{k}": v for k, v in fields.items()}))
    for step in W_STEPS:
        np.testing.assert_allclose(schedule(step), reference(step), rtol=1e-5, atol=1e-9)


def test_cosine_with_warmup_starts_low_not_at_the_peak():
    schedule = build_schedule(_config("cosine", schedule__warmup_steps=30))
    np.testing.assert_allclose([schedule(s) for s in (0, 15, 30)], [0.0, 0.05, 0.1], rtol=1e-6)


def test_piecewise_warmup_keeps_boundaries_absolute():
    schedule = build_schedule(_config("piecewise", schedule__warmup_steps=10,
                                      schedule__boundaries=(30, 60)))
    np.testing.assert_allclose([schedule(s) for s in (0, 5, 10, 29, 30, 59, 60, 99)],
                               [0.0, 0.05, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def test_exponential_period_is_transition_steps_not_num_train_steps():
    """As build_schedule's docstring says: default_config's transition_steps (1000), whatever
    num_train_steps is."""
    assert default_config().schedule.transition_steps == 1000
    reference = optax.exponential_decay(0.1, 1000, 0.1)
    for total in (100, 5000):
        config = _config("exponential")
        config.num_train_steps = total
        schedule = build_schedule(config)
        for step in (0, 50, 500, 1000, 2500):
            np.testing.assert_allclose(schedule(step), reference(step), rtol=1e-6)


def test_exponential_without_the_field_spans_the_run():
    config = {"num_train_steps": 200,
              "optimizer": {"name": "sgd", "learning_rate": 0.1},
              "schedule": {"name": "exponential", "decay_rate": 0.5}}

    schedule = build_schedule(ml_collections.ConfigDict(config))
    np.testing.assert_allclose([schedule(0), schedule(200)], [0.1, 0.05], rtol=1e-6)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_builds_its_optimizer(path):
    build_optimizer(_load(path).get_config())


@pytest.mark.parametrize("build", ["build_schedule", "build_optimizer"])
def test_a_plain_dict_config_is_refused_naming_the_builder_and_the_fix(build):
    """A dict failed with a bare `AttributeError: 'dict' object has no attribute 'schedule'`;
    the same content as a ConfigDict builds."""
    from cnnjax.train import optim

    content = {"schedule": {"name": "constant"}, "num_train_steps": 10,
               "optimizer": {"name": "sgd", "learning_rate": 0.1}}
    with pytest.raises(ValueError, match=rf"^{build}: config='<dict without schedule, optimizer, "
                                         r"num_train_steps>' is invalid; .* \(wrap a dict: "
                                         r"ml_collections\.ConfigDict\(d\)\)\.$"):
        getattr(optim, build)(content)
    built = getattr(optim, build)(ml_collections.ConfigDict(content))
    assert built is not None
