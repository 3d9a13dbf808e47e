"""benchmarks.backend_parity: its error measure, its case list and the command's refusals."""

import numpy as np
import pytest

from benchmarks.backend_parity import Case, Outcome, compare, layer_cases, select_cases
from tests.commands import run_commands


def test_compare_is_the_relative_two_norm_over_all_leaves():
    want = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([[4.0]], np.float32)}
    got = {"a": np.array([3.0, 0.5], np.float32), "b": np.array([[4.0]], np.float32)}
    assert compare(want, want) == (0.0, 0.0)
    rel, worst = compare(got, want)
    assert rel == pytest.approx(0.5 / 5.0) and worst == pytest.approx(0.5)


def test_compare_wants_integers_exact_and_refuses_non_finite_and_other_shapes():
    kept = np.array([4, 1, 7], np.int32)
    assert compare(kept, kept) == (0.0, 0.0)
    assert compare(np.array([4, 2, 7], np.int32), kept) == (float("inf"), 1.0)
    rel, _ = compare(np.array([np.nan], np.float32), np.array([1.0], np.float32))
    assert np.isnan(rel)
    with pytest.raises(ValueError, match=r"output shape \(2,\) against \(3,\)"):
        compare(np.zeros(2, np.float32), np.zeros(3, np.float32))


def test_an_outcome_passes_only_without_error_and_within_its_kinds_tolerance():
    assert Outcome("conv", "forward", 5e-5, 1e-6, 0.1).passed(1e-4, 1e-3)
    assert not Outcome("conv", "forward", 5e-4, 1e-6, 0.1).passed(1e-4, 1e-3)
    assert Outcome("conv", "grad", 5e-4, 1e-6, 0.1).passed(1e-4, 1e-3)
    assert not Outcome("conv", "grad", None, None, 0.1, "XlaRuntimeError: ...").passed(1, 1)
    assert not Outcome("conv", "grad", float("nan"), 0.0, 0.1).passed(1e-4, 1e-3)


def test_layer_cases_cover_every_layer_forward_and_backward():
    cases = layer_cases(batch=2)
    names = {c.name for c in cases}
    for layer in ("conv_reflect", "conv_replicate", "conv_circular", "conv_dilated",
                  "conv_grouped", "locally_connected", "tiled_conv", "conv_transpose_s2",
                  "local_response_norm", "max_pool_ceil", "spatial_pyramid_pool", "roi_pool",
                  "roi_align", "nms"):
        assert layer in names
    kinds = {(c.name, c.kind) for c in cases}
    assert ("tiled_conv", "grad") in kinds and ("nms", "grad") not in kinds


def test_skip_drops_a_case_or_one_kind_and_refuses_what_matches_nothing():
    cases = [Case("tiled_conv", kind, abs, ()) for kind in ("forward", "grad")]
    assert [c.kind for c in select_cases(cases, ["tiled_conv:grad"])] == ["forward"]
    with pytest.raises(ValueError, match=r"^--skip=tiled_conv leaves no case to compare$"):
        select_cases(cases, ["tiled_conv"])
    with pytest.raises(ValueError, match=r"--skip: \['tiled:grad'\] match no case"):
        select_cases(cases, ["tiled:grad"])


@pytest.mark.slow  # nine benchmark commands, ~30 s on 2 cores: with `make test-all`
def test_the_command_compares_and_refuses_in_one_line(tmp_path):
    ok, on_cpu, unknown, bad_skip, json_dir, nothing, at_once, one_image, cut = run_commands([
        ("benchmarks.backend_parity", "--allow_cpu", "--nolayers", "--models=lenet5",
         "--nomodel_grads"),
        ("benchmarks.backend_parity", "--nolayers", "--models=lenet5"),
        ("benchmarks.backend_parity", "--models=lenet6"),
        ("benchmarks.backend_parity", "--allow_cpu", "--nolayers", "--models=lenet5",
         "--skip=lenet6"),
        ("benchmarks.backend_parity", "--allow_cpu", "--nolayers", "--models=lenet5",
         f"--json_out={tmp_path}"),
        ("benchmarks.backend_parity", "--allow_cpu", "--nolayers", "--models="),
        ("benchmarks.backend_parity", "--allow_cpu", "--nolayers", "--models=lenet5",
         "--nomodel_grads", "--max_seconds=1e-9"),
        ("benchmarks.backend_parity", "--allow_cpu", "--nolayers", "--models=lenet5,resnet18",
         "--batch_size=1"),
        ("benchmarks.backend_parity", "--allow_cpu", "--nolayers", "--models=lenet5",
         "--max_seconds=1e-9"),
    ])
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "1 of 1 cases within tolerance" in ok.stdout
    assert on_cpu.returncode != 0
    assert "the default backend is the CPU, so there is nothing to compare" in on_cpu.stderr
    assert unknown.returncode != 0 and "--models: unknown ['lenet6']" in unknown.stderr
    assert bad_skip.returncode != 0 and "--skip: ['lenet6'] match no case" in bad_skip.stderr
    assert "Traceback" not in bad_skip.stderr and "lenet5 forward" not in bad_skip.stdout
    assert json_dir.returncode != 0 and "--json_out" in json_dir.stderr
    assert "Traceback" not in json_dir.stderr and "lenet5 forward" not in json_dir.stdout
    assert nothing.returncode != 0 and "Traceback" not in nothing.stderr  # it passed, 0 of 0
    assert "--models is empty and --layers=false: there is nothing to compare" in nothing.stderr
    # a limit reached before the first case still runs that one (it passed as 0 of 0)
    assert at_once.returncode == 0 and "1 of 1 cases within tolerance" in at_once.stdout
    # one image: resnet18's 1x1 last stage failed its grad case as a parity FAIL; lenet5 is fine
    assert one_image.returncode == 1 and "Traceback" not in one_image.stderr
    assert one_image.stderr.strip().splitlines()[-1] == (
        "error: --batch_size=1 is invalid with --model_grads for resnet18: in training mode its "
        "BatchNorm stage4_block1/bn1 would see one value per channel at --image_size=32; use "
        "--batch_size >= 2, a larger --image_size, or --nomodel_grads")
    # the time limit left lenet5's grad unrun: counted, listed, and not a success (it exited 0)
    assert cut.returncode == 3, cut.stderr[-2000:]
    assert "1 of 1 cases within tolerance" in cut.stdout
    assert cut.stdout.strip().splitlines()[-1] == (
        "1 of 2 cases not run (--max_seconds=1e-09): lenet5 grad")


def test_model_variables_are_made_when_the_case_runs_and_once_per_model():
    from benchmarks.backend_parity import model_cases

    forward, grad = model_cases(["lenet5"], batch=1, image_size=32, grads=True)
    assert callable(forward.args) and callable(grad.args)  # nothing initialized yet
    variables, x = forward.arguments()
    params, rest, x_again = grad.arguments()
    assert params is variables["params"] and x_again is x and x.shape == (1, 32, 32, 1)
