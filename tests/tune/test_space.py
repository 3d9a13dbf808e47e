"""Search spaces: grid order and size, seeded random draws within their bounds, stable trial
ids, dotted-field checks against a base config, and every ValueError message."""

import hashlib
import json
import math
import re

import ml_collections
import numpy as np
import pytest
from ml_collections import config_dict

from cnnjax.tune import space as sp


def _base():
    """A small stand-in for an engine config (same nesting, typed placeholders)."""
    config = ml_collections.ConfigDict()
    config.global_batch_size = 64
    config.optimizer = ml_collections.ConfigDict(
        {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9}
    )
    config.model_kwargs = ml_collections.ConfigDict({"activation": config_dict.placeholder(str)})
    config.lock()
    return config


def _raises(message, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=re.escape(message)):
        fn(*args, **kwargs)


# ----------------------------------------------------------------------------------- grid
def test_grid_is_the_cartesian_product_first_parameter_slowest():
    space = sp.grid(
        [
            sp.choice("optimizer.learning_rate", (0.01, 0.1, 1.0)),
            sp.choice("model_kwargs.activation", ("tanh", "relu")),
        ]
    )
    assert space.kind == "grid" and len(space.trials) == 6
    got = [tuple(t.overrides.values()) for t in space.trials]
    assert got == [
        (0.01, "tanh"), (0.01, "relu"), (0.1, "tanh"), (0.1, "relu"), (1.0, "tanh"), (1.0, "relu"),
    ]
    assert [t.index for t in space.trials] == list(range(6))
    assert all(list(t.overrides) == space.fields for t in space.trials)
    assert len({t.trial_id for t in space.trials}) == 6


def test_grid_mapping_shorthand_equals_choices():
    a = sp.grid({"optimizer.learning_rate": [0.1, 0.3], "global_batch_size": (32, 64)})
    b = sp.grid([sp.choice("optimizer.learning_rate", [0.1, 0.3]),
                 sp.choice("global_batch_size", (32, 64))])
    assert a.trials == b.trials
    assert a.describe()["parameters"][0] == {
        "field": "optimizer.learning_rate", "distribution": "choice", "values": [0.1, 0.3]
    }


# --------------------------------------------------------------------------------- random
def _params():
    return [
        sp.log_uniform("optimizer.learning_rate", 1e-4, 1.0),
        sp.uniform("optimizer.momentum", 0.5, 0.99),
        sp.int_uniform("global_batch_size", 16, 20),
        sp.choice("model_kwargs.activation", ("tanh", "relu", "sigmoid")),
    ]


def test_random_is_reproducible_from_the_seed():
    a, b = sp.random(_params(), 20, seed=3), sp.random(_params(), 20, seed=3)
    assert a.trials == b.trials and len(a.trials) == 20
    c = sp.random(_params(), 20, seed=4)
    assert [t.overrides for t in a.trials] != [t.overrides for t in c.trials]
    # The documented recipe: np.random.default_rng(seed), one draw per parameter in order.
    rng = np.random.default_rng(3)
    first = a.trials[0].overrides
    assert first["optimizer.learning_rate"] == pytest.approx(
        math.exp(rng.uniform(math.log(1e-4), math.log(1.0))), rel=1e-15)
    assert first["optimizer.momentum"] == pytest.approx(rng.uniform(0.5, 0.99), rel=1e-15)
    assert first["global_batch_size"] == int(rng.integers(16, 21))
    assert first["model_kwargs.activation"] == ("tanh", "relu", "sigmoid")[int(rng.integers(3))]
    assert a.describe() == {
        "kind": "random", "seed": 3, "num_trials": 20,
        "parameters": [p.describe() for p in _params()],
    }


def test_random_takes_numpy_integers_as_the_same_seed_and_count():
    """A NumPy seed/num_trials (np.random.default_rng takes one) draws the trials of the Python
    int; describe() (the sweep's JSON) holds Python ints."""
    a = sp.random(_params(), np.int64(5), seed=np.int64(3))
    assert a.trials == sp.random(_params(), 5, seed=3).trials
    assert json.loads(json.dumps(a.describe()))["seed"] == 3
    assert type(a.seed) is int and type(a.num_trials) is int


@pytest.mark.parametrize("kwargs, message", [
    (dict(seed=True), "sweep: seed=True is invalid; expected an integer >= 0."),
    (dict(seed=-1), "sweep: seed=-1 is invalid; expected an integer >= 0."),
    (dict(seed=1.0), "sweep: seed=1.0 is invalid; expected an integer >= 0."),
    (dict(num_trials=True), "sweep: num_trials=True is invalid; expected a positive integer."),
    (dict(num_trials=2.0), "sweep: num_trials=2.0 is invalid; expected a positive integer."),
    (dict(num_trials=np.int64(0)),
     "sweep: num_trials=np.int64(0) is invalid; expected a positive integer."),
])
def test_random_refuses_a_seed_or_count_that_is_no_integer_in_range(kwargs, message):
    _raises(message, sp.random, _params(), **{"num_trials": 2, **kwargs})


def test_random_samples_stay_in_bounds_and_are_python_scalars():
    trials = sp.random(_params(), 300, seed=0).trials
    lrs = [t.overrides["optimizer.learning_rate"] for t in trials]
    momenta = [t.overrides["optimizer.momentum"] for t in trials]
    sizes = [t.overrides["global_batch_size"] for t in trials]
    assert all(1e-4 <= v <= 1.0 and type(v) is float for v in lrs)
    assert all(0.5 <= v < 0.99 and type(v) is float for v in momenta)
    assert all(type(v) is int for v in sizes) and set(sizes) == {16, 17, 18, 19, 20}
    assert {t.overrides["model_kwargs.activation"] for t in trials} == {"tanh", "relu", "sigmoid"}
    assert len({t.trial_id for t in trials}) == 300  # distinct points


def test_log_uniform_spreads_over_decades():
    """Each of the 4 decades of [1e-4, 1] gets ~1/4 of the draws (a uniform draw would put
    90% into the top decade)."""
    trials = sp.random([sp.log_uniform("optimizer.learning_rate", 1e-4, 1.0)], 400, seed=1).trials
    decades = np.floor(np.log10([t.overrides["optimizer.learning_rate"] for t in trials]))
    counts = [int(np.sum(decades == d)) for d in (-4, -3, -2, -1)]
    assert sum(counts) == 400
    assert all(60 <= c <= 140 for c in counts), counts


def test_random_over_a_finite_space_draws_distinct_points():
    space = sp.random([sp.choice("model_kwargs.activation", ("tanh", "relu")),
                       sp.int_uniform("global_batch_size", 1, 2)], 4, seed=0)
    assert sorted(tuple(t.overrides.values()) for t in space.trials) == [
        ("relu", 1), ("relu", 2), ("tanh", 1), ("tanh", 2)]


# ------------------------------------------------------------------------------ trial ids
def test_trial_ids_are_stable_short_hashes_of_the_overrides():
    overrides = {"optimizer.learning_rate": 0.1}
    # Pinned: a changed scheme would orphan every existing sweep directory.
    assert sp.trial_id(overrides) == "d29b39e156"
    expected = hashlib.sha256(b'{"optimizer.learning_rate":0.1}').hexdigest()[:10]
    assert sp.trial_id(overrides) == expected
    two = {"optimizer.learning_rate": 0.1, "model_kwargs.activation": "relu"}
    assert sp.trial_id(two) == sp.trial_id(dict(reversed(list(two.items())))) == "2959832a1a"
    assert sp.trial_id({"optimizer.learning_rate": 0.3}) != sp.trial_id(overrides)
    # The same point gets the same id whichever space or position it comes from.
    grid = sp.grid({"optimizer.learning_rate": [0.3, 0.1]})
    assert grid.trials[1].trial_id == "d29b39e156" and grid.trials[1].index == 1
    assert sp.grid({"optimizer.learning_rate": [0.3, 0.1]}).trials == grid.trials


# ------------------------------------------------------------------ fields and overrides
def test_check_fields_accepts_existing_leaves():
    space = sp.grid({"optimizer.learning_rate": [0.1], "model_kwargs.activation": ["relu"],
                     "global_batch_size": [32]})
    sp.check_fields(_base(), space)  # no error


def test_misspelt_field_lists_close_matches():
    space = sp.grid({"optimizer.learnig_rate": [0.1]})
    _raises(
        "sweep: parameters['optimizer.learnig_rate'].field='optimizer.learnig_rate' is invalid; "
        "the base config has no such field (close matches: ['optimizer.learning_rate']).",
        sp.check_fields, _base(), space,
    )


def test_field_without_its_group_finds_the_full_path():
    _raises("the base config has no such field (close matches: ['optimizer.learning_rate']).",
            sp.check_fields, _base(), sp.grid({"learning_rate": [0.1]}))


def test_unknown_field_without_close_match_lists_its_group():
    _raises(
        "sweep: parameters['optimizer.zz'].field='optimizer.zz' is invalid; the base config has "
        "no such field (fields under 'optimizer': ['optimizer.learning_rate', "
        "'optimizer.momentum', 'optimizer.name']).",
        sp.check_fields, _base(), sp.grid({"optimizer.zz": [1]}),
    )
    _raises("the base config has no such field (no close match; top-level fields: "
            "['global_batch_size'])", sp.check_fields, _base(), sp.grid({"qqq": [1]}))


@pytest.mark.parametrize("field, hint", [
    # abbreviations: the group's prefix made 'optimizer.b2', 'optimizer.b1', 'optimizer.eps'
    # the "close matches" of 'optimizer.lr' and the real field was never named
    ("optimizer.lr", "fields under 'optimizer': ["),
    ("optimizer.wd", "fields under 'optimizer': ["),
    ("optimizer.learnig_rate", "close matches: ['optimizer.learning_rate']"),
    ("schedule.warmup", "close matches: ['schedule.warmup_steps']"),
    ("learning_rate", "close matches: ['optimizer.learning_rate']"),
    # a top-level field without a close match lists the top-level fields
    ("num_steps", "top-level fields: ["),
])
def test_an_unknown_field_of_the_real_config_names_the_fields_it_may_mean(field, hint):
    from experiments.configs import lenet5_digits

    base = lenet5_digits.get_config()
    with pytest.raises(ValueError) as err:
        sp.check_fields(base, sp.grid({field: [1]}))
    message = str(err.value)
    assert hint in message
    if hint.startswith("fields under"):
        assert "'optimizer.learning_rate'" in message and "'optimizer.weight_decay'" in message
        assert "close matches" not in message
    if hint.startswith("top-level"):
        assert "'num_train_steps'" in message and "'optimizer.learning_rate'" not in message


def test_a_sub_config_is_not_a_field():
    """It is named a group with its fields, not "no such field" with look-alike leaves."""
    _raises("sweep: parameters['optimizer'].field='optimizer' is invalid; the base config's "
            "'optimizer' is a group of settings, not one setting; sweep its fields by their "
            "dotted paths: ['optimizer.learning_rate', 'optimizer.momentum', 'optimizer.name'].",
            sp.check_fields, _base(), sp.grid({"optimizer": ["adam"]}))


@pytest.mark.parametrize("nested", [
    {"optimizer": {"learning_rate": (0.01, 0.1)}},
    ml_collections.ConfigDict({"optimizer": {"learning_rate": (0.01, 0.1)}}),  # a sweep file's
])
def test_a_nested_mapping_of_parameters_names_the_dotted_field(nested):
    """It was read as a choice over the group's keys (trials optimizer='learning_rate')."""
    _raises("sweep: parameters['optimizer'].values={'learning_rate': (0.01, 0.1)} is invalid; "
            "expected a list or tuple of values, not a mapping: a nested field is named by its "
            "dotted path, {'optimizer.learning_rate': (...)} in a dict or "
            "choice('optimizer.learning_rate', (...)) in a list", sp.grid, nested)


def test_a_mapping_key_other_than_its_params_field_is_refused():
    """{"x": choice("optimizer.learning_rate", ...)} swept the field and dropped the key."""
    _raises("sweep: parameters['x'].field='optimizer.learning_rate' is invalid; expected the "
            "field to be its key 'x'", sp.grid,
            ml_collections.ConfigDict({"seed": (0, 1),
                                       "x": sp.choice("optimizer.learning_rate", (0.1,))}))
    same = {"optimizer.learning_rate": sp.choice("optimizer.learning_rate", (0.1, 0.2))}
    assert sp.grid(same).trials == sp.grid({"optimizer.learning_rate": (0.1, 0.2)}).trials


def test_apply_overrides_copies_and_sets_typed_fields():
    base = _base()
    config = sp.apply_overrides(
        base, {"optimizer.learning_rate": 1, "model_kwargs.activation": "relu"}
    )
    assert config.optimizer.learning_rate == 1.0 and type(config.optimizer.learning_rate) is float
    assert config.model_kwargs.activation == "relu"
    assert base.optimizer.learning_rate == 0.1 and base.model_kwargs.activation is None


def test_apply_overrides_refuses_a_wrongly_typed_value():
    _raises("sweep: parameters['global_batch_size'] value='big' is invalid; the base config "
            "refuses it (", sp.apply_overrides, _base(), {"global_batch_size": "big"})


def test_from_config_reads_a_sweep_config():
    config = ml_collections.ConfigDict(
        {"kind": "random", "seed": 2, "num_trials": 3,
         "parameters": (sp.log_uniform("optimizer.learning_rate", 1e-3, 1.0),)})
    assert sp.from_config(config).trials == sp.random(
        [sp.log_uniform("optimizer.learning_rate", 1e-3, 1.0)], 3, seed=2).trials
    config.kind = "grid"
    config.num_trials = None  # a grid's size is its value lists' product (3 would be refused)
    config.seed = 0  # nor does it draw anything (seed 2 would be refused)
    config.parameters = ({"field": "global_batch_size", "distribution": "choice",
                          "values": (16, 32)},)
    assert [t.overrides["global_batch_size"] for t in sp.from_config(config).trials] == [16, 32]


def test_from_config_refuses_unknown_fields_naming_them_and_the_valid_ones():
    """A misspelt `sead`/`metirc` was dropped: seed 0 and the default metric used silently."""
    config = ml_collections.ConfigDict(
        {"kind": "random", "num_trials": 2, "sead": 5, "metirc": "loss",
         "parameters": (sp.log_uniform("optimizer.learning_rate", 1e-3, 1.0),)})
    _raises("sweep: fields=['metirc', 'sead'] is invalid; a sweep file has no such fields (did "
            "you mean 'metirc' -> 'metric', 'sead' -> 'seed'?); expected fields among ['kind', "
            "'parameters', 'num_trials', 'seed', 'metric', 'mode'].", sp.from_config, config)
    _raises("sweep: field='notes' is invalid; a sweep file has no such field; expected fields "
            "among", sp.from_config, {"kind": "grid", "notes": "x",
                                      "parameters": (sp.choice("a", (1, 2)),)})
    assert len(sp.from_config({"kind": "grid", "seed": 0, "metric": "top1", "mode": "max",
                               "parameters": (sp.choice("a", (1, 2)),)}).trials) == 2



def test_a_sweep_files_mapping_of_top_level_fields_is_a_mapping():
    """`config.parameters = {"seed": (0, 1)}` in a sweep file becomes a ConfigDict, which is
    iterable over its keys: it must still read as {field: values}, not as a list of specs."""
    config = ml_collections.ConfigDict({"kind": "grid", "parameters": {"seed": (0, 1, 2)}})
    space = sp.from_config(config)
    assert space.fields == ["seed"] and [t.overrides for t in space.trials] == [
        {"seed": 0}, {"seed": 1}, {"seed": 2}]

def _grid_config(num_trials="unset", **params):
    config = {"kind": "grid", "seed": 0, "metric": "top1", "mode": "max",
              "parameters": tuple(sp.choice(f, v) for f, v in params.items())}
    if num_trials != "unset":
        config["num_trials"] = num_trials
    return ml_collections.ConfigDict(config)


@pytest.mark.parametrize(("num_trials", "params", "message"), [
    (2, {"optimizer.learning_rate": (0.003, 0.03, 0.3, 3.0)},
     "sweep: num_trials=2 is invalid; a grid has exactly 4 trials, the product of its value "
     "lists (4), so expected 4 or unset; to run fewer pass --max_trials=N to experiments.sweep "
     "(--array=... to launch.submit), or sample num_trials points with a random sweep "
     "(--sweep.kind=random, or kind='random' in the file)."),
    (4, {"ema.decay": (None, 0.99), "seed": (0, 1, 2)},
     "sweep: num_trials=4 is invalid; a grid has exactly 6 trials, the product of its value "
     "lists (2 x 3 = 6), so expected 6 or unset;"),
    (8, {"optimizer.learning_rate": (0.1, 0.2)},
     "sweep: num_trials=8 is invalid; a grid has exactly 2 trials"),
    (True, {"optimizer.learning_rate": (0.1,)},
     "sweep: num_trials=True is invalid; a grid has exactly 1 trial, the product of its value "
     "lists (1), so expected 1 or unset;"),
    ("2", {"optimizer.learning_rate": (0.1, 0.2)},
     "sweep: num_trials='2' is invalid; a grid has exactly 2 trials"),
])
def test_a_grid_refuses_a_num_trials_other_than_its_size(num_trials, params, message):
    """`--sweep.num_trials=2` on a 4-value grid was ignored: all 4 trials ran, unannounced."""
    _raises(message, sp.from_config, _grid_config(num_trials, **params))


def test_a_grid_accepts_num_trials_unset_none_or_its_size_and_records_none():
    """Restating the size is harmless; the space records num_trials=None either way, so a sweep
    dir whose sweep.json was written with or without the field (or by an older cnnjax, which
    ignored it) still resumes."""
    lrs = {"optimizer.learning_rate": (0.003, 0.03, 0.3, 3.0)}
    spaces = [sp.from_config(_grid_config(n, **lrs)) for n in ("unset", None, 4)]
    assert [len(s.trials) for s in spaces] == [4, 4, 4]
    assert all(s.describe() == sp.grid(lrs).describe() for s in spaces)
    assert spaces[0].describe()["num_trials"] is None


def test_a_random_sweep_files_seed_none_is_seed_0():
    """declare_optional_fields documents None as the default 0 (a grid accepted it); a random
    file's `seed = None` was refused."""
    lrs = (sp.log_uniform("optimizer.learning_rate", 1e-3, 1.0),)
    config = sp.declare_optional_fields(ml_collections.ConfigDict(
        {"kind": "random", "num_trials": 3, "seed": None, "parameters": lrs}))
    space = sp.from_config(config)
    assert space.seed == 0 and space.trials == sp.random(lrs, 3, seed=0).trials


def test_a_grid_refuses_a_seed_it_would_ignore():
    """`--sweep.seed=5` on a grid changed nothing (no random draw); 0, the example files'
    explicit value, and unset stay accepted."""
    lrs = {"optimizer.learning_rate": (0.003, 0.03)}
    config = _grid_config(**lrs)
    config.seed = 5
    _raises("sweep: seed=5 is invalid; a grid draws nothing at random, so its seed would be "
            "ignored; expected 0 or unset (the trials' training seed is --config.seed; sweep it "
            "as a parameter to repeat each point).", sp.from_config, config)
    del config["seed"]
    assert len(sp.from_config(config).trials) == 2


# ------------------------------------------------------------------------- error messages
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: sp.Param("optimizer.learning_rate", "gaussian"),
         "sweep: parameters['optimizer.learning_rate'].distribution='gaussian' is invalid; "
         "expected one of ['choice', 'uniform', 'log_uniform', 'int_uniform']."),
        (lambda: sp.choice("model_kwargs.activation", []),
         "sweep: parameters['model_kwargs.activation'].values=() is invalid; expected at least "
         "one value to choose from."),
        (lambda: sp.choice("model_kwargs.activation", "relu"),
         "sweep: parameters['model_kwargs.activation'].values='relu' is invalid; expected a list "
         "or tuple of values to choose from."),
        # A set's order follows str hashing, which differs per process: a rerun would map
        # indices to other trials (or be refused as another space).
        (lambda: sp.choice("model_kwargs.activation", {"relu", "tanh"}),
         "sweep: parameters['model_kwargs.activation'].values={"),
        (lambda: sp.choice("model_kwargs.activation", frozenset({"relu"})),
         "sweep: parameters['model_kwargs.activation'].values=frozenset({'relu'}) is invalid; "
         "expected a list or tuple: a set's order changes from one process to the next"),
        (lambda: sp.Param("optimizer.learning_rate", "choice", values=(0.1, 0.2), low=0.5),
         "sweep: parameters['optimizer.learning_rate'].low=0.5 is invalid; expected no 'low' for "
         "distribution='choice' (choice takes values;"),
        (lambda: sp.parse_param({"field": "optimizer.momentum", "distribution": "uniform",
                                 "values": [0.5], "low": 0.0, "high": 1.0}),
         "sweep: parameters['optimizer.momentum'].values=[0.5] is invalid; expected no 'values' "
         "for distribution='uniform'"),
        (lambda: sp.choice("model_kwargs.act", [object]),
         "sweep: parameters['model_kwargs.act'].values=<class 'object'> is invalid; expected "
         "bool, int, finite float, str, None or tuples of them"),
        # a NaN or inf was refused as if a float were not allowed at all ("expected ... float")
        (lambda: sp.choice("optimizer.learning_rate", [0.1, math.nan]),
         "sweep: parameters['optimizer.learning_rate'].values=nan is invalid; expected bool, "
         "int, finite float, str, None or tuples of them"),
        (lambda: sp.choice("optimizer.weight_decay", [(0.1, -math.inf)]),
         "sweep: parameters['optimizer.weight_decay'].values=(0.1, -inf) is invalid; expected "
         "bool, int, finite float"),
        (lambda: sp.choice("optimizer.learning_rate", [0.1, 0.05, 0.1]),
         "sweep: parameters['optimizer.learning_rate'].values=(0.1, 0.05, 0.1) is invalid; "
         "expected distinct values (0.1 repeats an equal value: both would be the same trial)."),
        (lambda: sp.choice("model_kwargs.widths", [(1, 2), [1, 2]]),
         "sweep: parameters['model_kwargs.widths'].values=((1, 2), [1, 2]) is invalid; expected "
         "distinct values ([1, 2] repeats"),
        (lambda: sp.choice("optimizer.learning_rate", [1, 1.0]),
         "sweep: parameters['optimizer.learning_rate'].values=(1, 1.0) is invalid; expected "
         "distinct values (1.0 repeats"),
        (lambda: sp.uniform("optimizer.momentum", 0.9, 0.9),
         "sweep: parameters['optimizer.momentum'].low=0.9 is invalid; expected low < high "
         "(high=0.9)."),
        (lambda: sp.int_uniform("global_batch_size", 64, 16),
         "sweep: parameters['global_batch_size'].low=64 is invalid; expected low < high "
         "(high=16)."),
        (lambda: sp.log_uniform("optimizer.learning_rate", 0.0, 1.0),
         "sweep: parameters['optimizer.learning_rate'].low=0.0 is invalid; expected low > 0: "
         "log_uniform samples exp(uniform(log low, log high))."),
        (lambda: sp.log_uniform("optimizer.learning_rate", -1.0, 1.0),
         "sweep: parameters['optimizer.learning_rate'].low=-1.0 is invalid; expected low > 0"),
        (lambda: sp.uniform("optimizer.momentum", "a", 1.0),
         "sweep: parameters['optimizer.momentum'].low='a' is invalid; expected a finite number."),
        (lambda: sp.uniform("optimizer.momentum", 0.0, math.inf),
         "sweep: parameters['optimizer.momentum'].high=inf is invalid; expected a finite number."),
        (lambda: sp.int_uniform("global_batch_size", 16, 64.0),
         "sweep: parameters['global_batch_size'].high=64.0 is invalid; expected a finite "
         "integer."),
        (lambda: sp.choice("", [1]),
         "sweep: parameter field='' is invalid; expected a dotted config path"),
        (lambda: sp.random([sp.uniform("optimizer.momentum", 0.0, 1.0)], 0),
         "sweep: num_trials=0 is invalid; expected a positive integer."),
        (lambda: sp.random([sp.uniform("optimizer.momentum", 0.0, 1.0)], -3),
         "sweep: num_trials=-3 is invalid; expected a positive integer."),
        (lambda: sp.random([sp.uniform("optimizer.momentum", 0.0, 1.0)], 2, seed=-1),
         "sweep: seed=-1 is invalid; expected an integer >= 0."),
        (lambda: sp.random([sp.choice("model_kwargs.activation", ("tanh", "relu"))], 3),
         "sweep: num_trials=3 is invalid; expected at most 2, the number of distinct points in "
         "the space (or use kind='grid' to run them all)."),
        (lambda: sp.grid([sp.log_uniform("optimizer.learning_rate", 1e-3, 1.0)]),
         "sweep: parameters['optimizer.learning_rate'].distribution='log_uniform' is invalid; "
         "expected 'choice' in a grid (list the values, or use kind='random' for "
         "uniform/log_uniform/int_uniform)."),
        (lambda: sp.grid([]),
         "sweep: parameters=[] is invalid; expected at least one parameter to sweep."),
        (lambda: sp.grid([sp.choice("a", [1]), sp.choice("a", [2])]),
         "sweep: parameters=['a'] is invalid; expected each field swept only once."),
        (lambda: sp.grid("optimizer.learning_rate"),
         "sweep: parameters='optimizer.learning_rate' is invalid; expected a list of parameters"),
        (lambda: sp.grid([{"field": "a", "distribution": "choice", "vals": [1]}]),
         "sweep: parameter={'field': 'a', 'distribution': 'choice', 'vals': [1]} is invalid; "
         "expected keys 'field', 'distribution' and 'values' (choice)"),
        (lambda: sp.grid([3]),
         "sweep: parameter=3 is invalid; expected a Param"),
        (lambda: sp.from_config(ml_collections.ConfigDict({"kind": "bayes", "parameters": ()})),
         "sweep: kind='bayes' is invalid; expected one of ['grid', 'random']."),
    ],
)
def test_error_messages(make, message):
    _raises(message, make)


def test_metric_mode_and_seed_overrides_apply_where_the_sweep_file_leaves_them_out(tmp_path):
    """launch.submit loads a sweep file with the entry point's overrides as experiments.sweep
    does; `--sweep.metric=loss` was refused there too ("the config has no field 'metric'") for a
    file without a metric, and for a file setting it None (a NoneType field takes no override)."""
    from cnnjax.launch.checks import load_files

    for body, overrides, expected in (
        ("", ["--sweep.metric=loss", "--sweep.mode=min", "--sweep.seed=3"], ("loss", "min", 3)),
        ("", [], (None, None, 0)),  # the defaults from_config and run_sweep use
        ("    c.metric = None\n    c.seed = None\n", ["--sweep.metric=loss", "--sweep.seed=2"],
         ("loss", None, 2)),
        ("    c.metric = 'loss'\n    c.mode = 'min'\n", ["--sweep.metric=None",
                                                         "--sweep.mode=None"],
         (None, None, 0)),
    ):
        path = tmp_path / "sweep_file.py"
        path.write_text("import ml_collections\n\n\ndef get_config():\n"
                        "    c = ml_collections.ConfigDict()\n    c.kind = 'grid'\n"
                        f"{body}    c.parameters = {{'seed': (0, 1)}}\n    return c\n")
        sweep = load_files({"sweep": str(path)}, overrides)["sweep"]
        assert (sweep.metric, sweep.mode, sweep.seed) == expected, (body, overrides)
        assert sweep.is_locked
        with pytest.raises(AttributeError):
            sweep.metirc = "loss"  # misspelt fields are still refused (locked, as before)
    assert sp.declare_optional_fields({"kind": "grid"}) == {"kind": "grid"}  # a mapping: as is


def test_a_grid_file_switched_to_random_says_num_trials_must_be_set(tmp_path):
    """`--sweep.kind=random` on a grid file said only "num_trials=None is invalid; expected a
    positive integer", not that a random sweep needs its count set, nor where."""
    from cnnjax.launch.checks import load_files

    path = tmp_path / "grid.py"
    path.write_text("import ml_collections\n\n\ndef get_config():\n"
                    "    c = ml_collections.ConfigDict()\n    c.kind = 'grid'\n"
                    "    c.parameters = {'seed': (0, 1, 2)}\n"
                    "    return c\n")
    sweep = load_files({"sweep": str(path)}, ["--sweep.kind=random"])["sweep"]
    _raises("sweep: num_trials=None is invalid; expected a positive integer: a random sweep "
            "draws num_trials points; set num_trials = N in the sweep file or pass "
            "--sweep.num_trials=N.",
            lambda: sp.from_config(sweep))
    _raises("sweep: num_trials=None is invalid; expected a positive integer: a random sweep",
            sp.random, {"seed": (0, 1, 2)}, None)


def test_a_grid_files_num_trials_override_names_its_size_and_switched_to_random_draws(tmp_path):
    """A grid file without num_trials refused `--sweep.num_trials=N` as "the config has no field
    'num_trials'" (a file restating its size got the grid's size instead), and so refused
    `--sweep.kind=random --sweep.num_trials=N` too: the count of a random sweep of the grid's
    values could only be written into the file."""
    from cnnjax.launch.checks import load_files

    path = tmp_path / "grid.py"
    path.write_text("import ml_collections\nfrom cnnjax.tune.space import choice\n\n\n"
                    "def get_config():\n"
                    "    c = ml_collections.ConfigDict()\n    c.kind = 'grid'\n"
                    "    c.parameters = (choice('seed', (0, 1, 2)),\n"
                    "                    choice('global_batch_size', (16, 32)))\n"
                    "    return c\n")
    sweep = load_files({"sweep": str(path)}, ["--sweep.num_trials=4"])["sweep"]
    _raises("sweep: num_trials=4 is invalid; a grid has exactly 6 trials, the product of its "
            "value lists (3 x 2 = 6), so expected 6 or unset; to run fewer pass --max_trials=N to "
            "experiments.sweep (--array=... to launch.submit), or sample num_trials points with "
            "a random sweep (--sweep.kind=random, or kind='random' in the file).",
            lambda: sp.from_config(sweep))
    assert len(sp.from_config(load_files({"sweep": str(path)}, [])["sweep"]).trials) == 6
    sweep = load_files({"sweep": str(path)}, ["--sweep.kind=random", "--sweep.num_trials=4",
                                              "--sweep.seed=3"])["sweep"]
    assert sp.from_config(sweep) == sp.random(
        (sp.choice("seed", (0, 1, 2)), sp.choice("global_batch_size", (16, 32))), 4, seed=3)
