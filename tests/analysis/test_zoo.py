"""Model zoo analysis: `summary` on every registered model (parameter totals against
`jax.eval_shape` of init), `zoo_table` figures against hand counts, the docs/models.md generator
and its --check, and the summary CLI on VGG-16 at 224x224."""

import math
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from cnnjax.analysis import zoo
from cnnjax.analysis.summary import summary
from cnnjax.analysis.zoo import check_zoo_names, is_stale, render_markdown, zoo_table
from cnnjax.models import create_model, list_models, model_info
from tests.commands import run_commands

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENV = {**os.environ, "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=",
       "PYTHONPATH": str(ROOT)}
F32 = 4

# Deep models whose tracing alone takes 3-6 s on two CPU cores; the rest trace in < 2 s each.
SLOW_MODELS = {"densenet121", "densenet161", "densenet169", "densenet201", "resnet101", "resnet152",
               "resnet110_cifar", "plain110_cifar", "densenet100_k12_cifar",
               "densenet100_k24_cifar", "densenet_bc100_cifar", "densenet_bc190_cifar",
               "densenet_bc250_cifar", "preact_resnet110_cifar", "preact_resnet164_cifar",
               "preact_resnet1001_cifar"}
# Deeper (or batch-normalized) members of families whose other members the default suite sweeps
# (googlenet, resnet20_cifar, plain20/32_cifar, wrn16_4/16_8_cifar, vgg11_bn/vgg13_bn): the same
# layer types at more depth, ~30% of the sweep's time; breadth left to `-m slow`.
BREADTH_MODELS = {"googlenet_bn", "resnet32_cifar", "resnet44_cifar", "resnet56_cifar",
                  "plain44_cifar", "plain56_cifar", "wrn28_10_cifar", "wrn40_4_cifar",
                  "vgg16_bn", "vgg19_bn"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)


def _init_param_count(model, shape) -> int:
    """Exact parameter count from the shapes of `model.init` (nothing is computed)."""
    x = jax.ShapeDtypeStruct((1, *shape), "float32")
    key = jax.random.key(0)
    variables = jax.eval_shape(lambda x: model.init({"params": key, "dropout": key}, x), x)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"]))


def test_slow_models_are_registered():
    assert set(list_models()) >= SLOW_MODELS | BREADTH_MODELS


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_MODELS | BREADTH_MODELS else n
     for n in list_models()],
)
def test_summary_runs_on_every_model_at_its_smallest_input(name):
    info = model_info(name)
    shape = (info.min_input_size, info.min_input_size, info.input_shape[2])
    model = create_model(name)
    result = summary(model, shape)
    expected = _init_param_count(model, shape)
    assert result.total_params == expected
    assert sum(r.params for r in result.rows) == expected  # every parameter lands in one row
    dense_output = len(result.output_shapes[0]) == 4
    want = (1, *shape[:2], info.num_classes) if dense_output else (1, info.num_classes)
    assert result.output_shapes[0] == want
    assert result.totals["macs"] > 0 and result.totals["flops"] > 0
    assert result.receptive_field is not None and min(result.receptive_field.size) > 1
    assert str(result).splitlines()[0].startswith("Layer")


def _stack_field(layers):
    """Receptive-field size of a chain of (kernel, stride) windows: r += (k - 1) * jump."""
    r, j = 1, 1
    for k, s in layers:
        r, j = r + (k - 1) * j, j * s
    return r, j


@pytest.fixture(scope="module")
def small_rows():
    return {r["name"]: r for r in zoo_table(["lenet5", "alexnet", "fcn32s_vgg16"])}


def test_zoo_table_lenet5_matches_hand_counts(small_rows):
    r = small_rows["lenet5"]
    # C1 6@5x5 on 32x32 -> 28x28, S2 -> 14x14, C3 16@5x5 -> 10x10, S4 -> 5x5, C5 120, F6 84, 10.
    macs = 28 * 28 * 6 * 1 * 25 + 10 * 10 * 16 * 6 * 25 + 120 * 16 * 25 + 84 * 120 + 10 * 84
    params = 6 * 26 + 16 * (6 * 25 + 1) + 120 * (16 * 25 + 1) + 84 * 121 + 10 * 85
    assert (r["params"], r["macs"]) == (params, macs) == (61_706, 416_520)
    assert r["input_shape"] == (32, 32, 1) and r["output_shape"] == (1, 10)
    assert r["weight_bytes"] == F32 * params
    assert r["largest_activation_bytes"] == F32 * 28 * 28 * 6
    assert r["largest_activation_shape"] == (1, 28, 28, 6)
    # The last conv sees the whole 32x32 image: 5 + (2 - 1) * 1 ... = 32.
    assert r["rf_size"] == (32, 32)
    assert not r["rf_upper_bound"] and not r["rf_misaligned"] and r["notes"] == ()


def test_zoo_table_alexnet_matches_hand_counts(small_rows):
    r = small_rows["alexnet"]
    convs = [  # (output side, C_out, C_in, k) of torchvision's layout at 224x224
        (55, 64, 3, 11), (27, 192, 64, 5), (13, 384, 192, 3), (13, 256, 384, 3), (13, 256, 256, 3)]
    fcs = [(9216, 4096), (4096, 4096), (4096, 1000)]
    macs = sum(m * m * co * ci * k * k for m, co, ci, k in convs) + sum(a * b for a, b in fcs)
    assert r["macs"] == macs == 714_188_480
    assert r["params"] == 61_100_840
    assert r["fc_params"] == sum((a + 1) * b for a, b in fcs)
    assert r["fc_macs"] == sum(a * b for a, b in fcs)
    assert r["weight_layers"] == 8
    assert r["largest_activation_bytes"] == F32 * 55 * 55 * 64
    # conv1 11/4, pool 3/2, conv2 5/1, pool 3/2, conv3-5 3/1, pool 3/2; then fc6 sees all 6x6
    # pool5 positions: 5 more jumps.
    size, jump = _stack_field([(11, 4), (3, 2), (5, 1), (3, 2), (3, 1), (3, 1), (3, 1), (3, 2)])
    assert (size, jump) == (195, 32)
    assert r["rf_size"] == (size + 5 * jump,) * 2 and r["rf_jump"] == (jump, jump)
    assert r["flops"] > 2 * r["macs"] * 0.9  # 2 per real multiply-add, minus padding taps


def test_zoo_table_fcn_flags_transposed_convolutions(small_rows):
    r = small_rows["fcn32s_vgg16"]
    assert r["output_shape"] == (1, 224, 224, 21)
    assert r["rf_upper_bound"] and not r["rf_misaligned"]
    # Output pixel i is centred on input pixel i: VGG's 2x2 pools put stride-32 pixel i at
    # 32 i + 15.5, and the half-pixel 32x bilinear upsampling maps output u to (u + 0.5) / 32 - 0.5.
    assert r["rf_start"] == (0, 0) and r["rf_jump"] == (1, 1)
    assert any("transposed convolution" in n for n in r["notes"])
    # The fixed 32x bilinear upsampling of the 9x9x21 scores (the 7x7 map with its edge rows and
    # columns repeated once beyond it), as two 1-D passes of the separable 64-tap kernel: rows,
    # each of the 9x9x21 scores times 64 taps; columns, each of the rows pass's 288x9x21 outputs
    # times 64. FLOPs: per line the 9 * 64 taps less the 16 cropped at each end (padding 16).
    assert r["transposed_macs"] == 9 * 9 * 21 * 64 + 288 * 9 * 21 * 64
    assert r["transposed_flops"] == 2 * (9 * 64 - 2 * 16) * (9 + 288) * 21
    assert r["fc_params"] == 0  # fully convolutional


def test_render_markdown_tables_and_sections(small_rows):
    rows = [small_rows[n] for n in ("alexnet", "lenet5", "fcn32s_vgg16")]
    text = render_markdown(rows)
    assert text.startswith("# Model zoo\n")
    assert "python -m cnnjax.analysis.zoo --output=docs/models.md" in text
    assert "**MACs**" in text and "**FLOPs**" in text  # which figure is which
    lines = text.splitlines()
    lenet = next(ln for ln in lines if ln.startswith("| `lenet5` |"))
    assert "| 32×32×1 | 10 | 61,706 | 416.5 K | " in lenet and "| 32 |" in lenet
    alexnet = next(ln for ln in lines if ln.startswith("| `alexnet` |"))
    assert "| 61,100,840 | 714.2 M |" in alexnet and "| 355 |" in alexnet
    fcn = next(ln for ln in lines if ln.startswith("| `fcn32s_vgg16` |"))
    assert "| ≤ 436 | 0 |" in fcn  # RF upper bound; output aligned with the input (offset 0)
    # Groups in a fixed order, each table under its heading.
    heads = [ln for ln in lines if ln.startswith("## ")]
    assert heads[:3] == ["## ImageNet classifiers", "## Small-image classifiers",
                         "## Dense prediction (segmentation)"]
    assert "## The lecture's comparison" not in text  # needs all LECTURE_MODELS
    assert "## Transposed convolutions" in text and "## Receptive-field notes" in text
    # References: numbered in order of first appearance, cited by number.
    refs = [ln for ln in lines[lines.index("## References"):] if ln[:1].isdigit()]
    assert refs[0].startswith("1. Krizhevsky") and len(refs) == 3
    assert alexnet.rstrip(" |").split("| ")[-1].startswith("[1]")


def test_render_markdown_sorts_models_naturally():
    rows = [{**_fake("resnet101"), "input_shape": (224, 224, 3)},
            {**_fake("resnet18"), "input_shape": (224, 224, 3)}]
    lines = render_markdown(rows).splitlines()
    order = [ln.split("`")[1] for ln in lines if ln.startswith("| `")]
    assert order == ["resnet18", "resnet101"]


def test_render_markdown_marks_bounds_and_misaligned_merges():
    row = {**_fake("seg"), "output_shape": (1, 32, 32, 10), "rf_size": (91, 91),
           "rf_start": (-15.5, -15.5), "rf_upper_bound": True, "rf_misaligned": True,
           "notes": ("add: paths merged on spatial axis 0 are misaligned",)}
    text = render_markdown([row])
    assert "| `seg` | 32×32×3 | 10 | 1,000 | 1 M | 2 M | 4.0 KiB | ≤ 91 † | -15.5 † | [1] |" in text
    assert "`seg`:\n\n- add: paths merged on spatial axis 0 are misaligned" in text


def _fake(name: str) -> dict:
    """A zoo row with made-up numbers, for formatting-only tests."""
    return {
        "name": name, "input_shape": (32, 32, 3), "num_classes": 10, "output_shape": (1, 10),
        "params": 1000, "macs": 10**6, "flops": 2 * 10**6, "activation_bytes": 4096,
        "largest_activation_bytes": 1024, "largest_activation_shape": (1, 16, 16, 1),
        "weight_bytes": 4000, "weight_layers": 2, "fc_params": 100, "fc_macs": 100,
        "transposed_macs": 0, "transposed_flops": 0, "rf_size": (5, 5), "rf_jump": (2, 2),
        "rf_start": (0, 0), "rf_upper_bound": False, "rf_misaligned": False, "notes": (),
        "paper": "A. Author 2000, A Paper", "extra": {},
    }


def test_comparison_is_written_around_the_numbers_and_refuses_contradicting_ones():
    """The lecture's comparison quotes the zoo table's figures, and refuses rows that contradict
    its prose. One test for both: the eight ImageNet models' table is ~5-15 s (a module fixture
    ran once per xdist worker)."""
    lecture_rows = zoo_table(zoo.LECTURE_MODELS)
    _check_comparison_quotes_the_numbers(lecture_rows)
    _check_comparison_refuses_contradicting_numbers(lecture_rows)


def _check_comparison_quotes_the_numbers(lecture_rows):
    """The prose's figures are the rows' (MACs, ratios, the inception bottleneck's cost)."""
    text = render_markdown(lecture_rows)
    section = " ".join(text[text.index("## The lecture's comparison"):].split())  # unwrapped
    by = {r["name"]: r for r in lecture_rows}
    vgg16, alexnet, googlenet = by["vgg16"], by["alexnet"], by["googlenet"]
    assert f"AlexNet does {alexnet['macs'] / 1e9:.2f} GMACs" in section
    assert f"{vgg16['macs'] / alexnet['macs']:.0f}× fewer than VGG-16" in section
    assert "`vgg19` does 19.63 GMACs" in section
    assert f"{100 * alexnet['fc_params'] / alexnet['params']:.0f}% of them sit in" in section
    # Inception 3a's 5x5 branch: 192 -> 16 (1x1) -> 32 (5x5) on 28x28, against a direct 5x5.
    direct, bottleneck = 28 * 28 * 192 * 32 * 25, 28 * 28 * (192 * 16 + 16 * 32 * 25)
    assert f"costs {bottleneck / 1e6:.4g} M MACs" in section
    assert f"{direct / 1e6:.4g} M of a direct 5×5" in section
    assert googlenet["extra"]["b5_macs"] == bottleneck
    assert "| `googlenet` | 7.0 M | 1.583 G |" in section and "| 6.67% |" in section
    assert "3.57% top-5 error" in section


def _check_comparison_refuses_contradicting_numbers(lecture_rows):
    """A row that makes a sentence false (ResNet-152 above VGG-16's MACs) is refused."""
    rows = [dict(r) for r in lecture_rows]
    resnet152 = next(r for r in rows if r["name"] == "resnet152")
    resnet152["macs"] = 16 * 10**9  # more than VGG-16's 15.47 G, less than VGG-19's
    with pytest.raises(ValueError, match=r"^render_markdown: the comparison's prose no longer "
                       r"matches the numbers; false: ResNet-152 does fewer MACs than VGG-16\. "
                       r"Update the template in cnnjax/analysis/zoo\.py\.$"):
        render_markdown(rows)
    # Each other sentence, made false alone by changing one figure of one row.
    by = {r["name"]: r for r in lecture_rows}
    alexnet = by["alexnet"]
    largest = max(r["weight_bytes"] + r["activation_bytes"] for r in lecture_rows)
    cases = [  # (model, changed figures, the sentence now false)
        ("googlenet", {"macs": alexnet["macs"] - 1},
         "AlexNet does the fewest MACs of the ImageNet classifiers"),
        ("resnet18", {"params": 10 * alexnet["params"]},
         "AlexNet has the most parameters per MAC of the ImageNet classifiers"),
        ("alexnet", {"fc_params": alexnet["params"] // 2},
         "most of AlexNet's parameters are in its FC layers"),
        ("resnet50", {"macs": 2 * by["vgg19"]["macs"]},
         "a VGG does the most MACs of the ImageNet classifiers"),
        ("resnet50", {"activation_bytes": 10 * largest},
         "a VGG has the largest weights + activations footprint of the ImageNet classifiers"),
        ("googlenet", {"params": alexnet["params"] + 1},
         "GoogLeNet has fewer parameters than AlexNet and fewer MACs than VGG-16"),
    ]
    for name, changed, sentence in cases:
        rows = [{**r, **changed} if r["name"] == name else r for r in lecture_rows]
        with pytest.raises(ValueError) as err:
            render_markdown(rows)
        assert str(err.value) == (
            "render_markdown: the comparison's prose no longer matches the numbers; false: "
            f"{sentence}. Update the template in cnnjax/analysis/zoo.py."), (name, changed)


def test_weight_layers_count_the_layers_that_multiply_not_the_batch_norms():
    """ResNet-18: conv1, 8 blocks of two 3x3 convs, 3 projection shortcuts (1x1 convs) and the
    FC layer are 1 + 16 + 3 + 1 = 21 weight layers; its 20 batch norms have parameters but do
    no multiply-adds, and are not counted."""
    assert zoo.zoo_row("resnet18")["weight_layers"] == 21


def test_sizes_ratios_and_groups_switch_format_at_their_thresholds():
    """Sizes from 0.1 MiB up are in MiB (below it in KiB); ratios from 10x up are whole; inputs
    of side <= 64 are small images."""
    assert zoo._mib(0.5 * zoo.MIB) == "0.5 MiB"
    assert zoo._mib(0.1 * zoo.MIB) == "0.1 MiB"
    assert zoo._mib(0.05 * zoo.MIB) == "51.2 KiB"
    assert zoo._ratio(10, 1) == "10×" and zoo._ratio(99, 10) == "9.9×"
    assert zoo._group({"output_shape": (1, 10), "input_shape": (64, 64, 3)}) == (
        "Small-image classifiers")
    assert zoo._group({"output_shape": (1, 10), "input_shape": (65, 65, 3)}) == (
        "ImageNet classifiers")


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ("vgg16", r"zoo_table: names='vgg16' is invalid; expected a list of model names, "
                  r"e.g. \['vgg16'\]\."),
        ([], r"zoo_table: names=\[\] is invalid; expected at least one registered model name\."),
        # an unknown name was create_model's error, whose list held the detectors it refuses
        (["vgg61"], r"zoo_table: names=\['vgg61'\] is invalid; did you mean \[.*'vgg16'.*\]\? "
                    r"expected names from \['alexnet', "),
        # A detector was filed under "Dense prediction (segmentation)" by its output's rank.
        (["lenet5", "yolo_v1"], r"zoo_table: names=\['yolo_v1'\] is invalid; expected "
                                r"classification or segmentation models; the detectors are "
                                r"compared in docs/detection\.md"),
    ],
)
def test_zoo_table_errors(names, message):
    with pytest.raises(ValueError, match=message) as err:
        zoo_table(names)
    assert "yolo_v1'," not in str(err.value)  # never offered


def test_the_cli_names_its_models_flag():
    with pytest.raises(ValueError, match=r"^zoo: --models=\['nosuch'\] is invalid; expected "):
        check_zoo_names(["lenet5", "nosuch"], "zoo", "--models")


def test_a_selection_is_one_row_per_model_and_says_it_is_a_selection():
    """`--models=lenet5,lenet5` listed lenet5 twice, under "Every ... model registered"."""
    rows = zoo_table(["lenet5", "lenet5"])
    assert [r["name"] for r in rows] == ["lenet5"]
    text = render_markdown(rows)
    assert "A selection of the classification and segmentation models in `cnnjax.models` (1\n" \
        "models;" in text
    assert "Every classification" not in text


def test_render_markdown_needs_rows():
    with pytest.raises(ValueError, match=r"render_markdown: rows=\[\] is invalid; expected the "
                       r"rows of zoo_table\(\)\."):
        render_markdown([])


def test_is_stale(tmp_path):
    path = tmp_path / "models.md"
    text = render_markdown([_fake("net")])
    assert is_stale(path, text)  # missing
    path.write_text(text, encoding="utf-8")
    assert not is_stale(path, text)
    path.write_text(text.replace("1,000", "1,001"), encoding="utf-8")
    assert is_stale(path, text)


_BAD_ARGS = [("--models=bogus", "--output={tmp}/z.md"),
             ("--models=lenet5", "--output={tmp}/file/zoo.md"),
             ("--models=lenet5", "--output={tmp}"),  # a directory: refused only after tracing
             ("--models=lenet5", "--output={tmp}/z.md", "--check")]  # "stale", of no file


def _cli_runs(tmp):
    """The CLI runs the test below checks, in one interpreter forking a child per command
    (tests/commands.py; 5 interpreter starts took ~15 s), in folder `tmp`: each run by name."""
    (tmp / "file").write_text("")
    # a stale file for --check: what the generator writes for lenet5, one digit changed
    text = render_markdown(zoo_table(["lenet5"]))
    assert "61,706" in text
    (tmp / "stale.md").write_text(text.replace("61,706", "61,707"), encoding="utf-8")
    commands = {
        "write": ("cnnjax.analysis.zoo", "--models=lenet5", f"--output={tmp / 'models.md'}"),
        "check": ("cnnjax.analysis.zoo", "--models=lenet5", f"--output={tmp / 'stale.md'}",
                  "--check"),
        **{f"bad{i}": ("cnnjax.analysis.zoo", *(a.format(tmp=tmp) for a in args))
           for i, args in enumerate(_BAD_ARGS)},
        "vgg16": ("cnnjax.analysis.summary", "--model=vgg16", "--input_shape=224,224,3"),
    }
    return dict(zip(commands, run_commands(list(commands.values()), env=ENV), strict=True))


def test_cli_writes_checks_summarizes_and_refuses_bad_input(tmp_path):
    """The zoo CLI writes and --checks a page, the summary CLI prints VGG-16 at 224x224, and bad
    arguments are refused in one line. One test over one `run_commands` call (~5-25 s): as a
    module fixture of several tests it ran once per xdist worker."""
    runs = _cli_runs(tmp_path)
    _check_cli_writes_and_checks(tmp_path, runs)
    _check_summary_cli_prints_vgg16_at_224(runs["vgg16"])
    for index in range(len(_BAD_ARGS)):
        _check_cli_bad_input_is_one_line(tmp_path, runs, index)


def _check_cli_writes_and_checks(tmp, runs):
    """--models=lenet5 writes its row; --check of a stale file fails, naming the command."""
    out = tmp / "models.md"
    assert runs["write"].returncode == 0, runs["write"].stderr
    assert "| `lenet5` | 32×32×1 | 10 | 61,706 |" in out.read_text(encoding="utf-8")
    assert runs["check"].returncode == 1
    # the selection checked is the one regenerated (without --models: every model, still stale)
    assert (f"{tmp / 'stale.md'} is stale; regenerate it with `python -m cnnjax.analysis.zoo "
            f"--output={tmp / 'stale.md'} --models=lenet5`" in runs["check"].stdout)


def _check_summary_cli_prints_vgg16_at_224(proc):
    """VGG-16's per-layer table at 224x224: hand-counted parameters, MACs, layers and field."""
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "vgg16 on input (1, 224, 224, 3)"
    # 13 3x3 convs (channels 64,64 | 128,128 | 256x3 | 512x3 | 512x3 at 224/112/56/28/14) + 3 FC.
    stages = [(224, [3, 64, 64]), (112, [64, 128, 128]), (56, [128, 256, 256, 256]),
              (28, [256, 512, 512, 512]), (14, [512, 512, 512, 512])]
    convs = [(n, ci, co) for n, ch in stages for ci, co in zip(ch, ch[1:], strict=False)]
    fcs = [(7 * 7 * 512, 4096), (4096, 4096), (4096, 1000)]
    params = sum(9 * ci * co + co for _, ci, co in convs) + sum((a + 1) * b for a, b in fcs)
    macs = sum(n * n * 9 * ci * co for n, ci, co in convs) + sum(a * b for a, b in fcs)
    total = next(ln for ln in lines if ln.startswith("Total"))
    assert params == 138_357_544
    assert f"{params:,}" in total and f"{macs:,}" in total
    assert sum(1 for ln in lines if " Conv2D " in ln) == 13
    assert sum(1 for ln in lines if " Dense " in ln) == 3
    assert "receptive field of the output: ReceptiveField(size=(404, 404)" in proc.stdout


def _check_cli_bad_input_is_one_line(tmp_path, runs, index):
    """`_BAD_ARGS[index]` is refused with a one-line error and writes nothing."""
    args, proc = _BAD_ARGS[index], runs[f"bad{index}"]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ")
    if args[0] == "--models=bogus":
        assert "'bogus'" in line
    elif args[-1] == "--check":
        assert line == (f"error: --output={str(tmp_path / 'z.md')!r} is invalid; --check "
                        "compares an existing file, and there is none: write it with `python "
                        f"-m cnnjax.analysis.zoo --output={tmp_path / 'z.md'} --models=lenet5` "
                        "first")
    elif args[1] == "--output={tmp}":
        assert line == (f"error: --output={str(tmp_path)!r} is invalid; it is a directory, "
                        "expected a file name")
    else:
        assert line == (f"error: --output's folder={str(tmp_path / 'file')!r} is invalid; "
                        "expected a directory or a path to create, but a file is in the way.")
    assert not (tmp_path / "z.md").exists()


@pytest.mark.slow
def test_docs_models_md_is_up_to_date():
    """docs/models.md equals what the generator writes now (all models at native size)."""
    check = _run("cnnjax.analysis.zoo", "--check")
    assert check.returncode == 0, check.stdout + check.stderr[-2000:]
    assert "docs/models.md is up to date" in check.stdout
