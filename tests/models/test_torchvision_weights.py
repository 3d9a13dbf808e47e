"""torchvision -> cnnjax weight conversion against torchvision itself (needs torch + torchvision).

Each supported architecture is built in torchvision with random weights (BatchNorm affine
parameters and running statistics randomized too, so BN is not the identity), converted, and
both are run in eval mode on the same random input (NCHW for torch, NHWC for cnnjax) in float32.
Tolerance: max |logit difference| <= 1e-5 * max |torch logit| (float32 summation order; the
measured ratios are 3e-7 .. 3e-6). Inputs are small where the architecture allows:
ResNets, DenseNets and GoogLeNet have global pooling; VGG's and AlexNet's adaptive pools (7x7,
6x6) make any size valid, and AlexNet runs at 224 so its pool5 map is a real 6x6 map (fc6's
flatten order is exercised on distinct positions; VGG-16 at 224 is the slow native-size case).
GoogLeNet runs at 80x80, where every ceil-mode max pool has a partial last window (40 -> 20 ->
10 -> 5 -> 3). torchvision's `googlenet` converts to cnnjax's `googlenet_bn`
(`tvw.TORCHVISION_BUILDERS`); it is built with `init_weights=True` (torchvision warns without
it) and, unless a test says otherwise, without auxiliary heads.
Bad inputs and the workdir are tested without torch in test_torchvision_weights_inputs.py.
"""

import functools
import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: E402

from cnnjax.models import create_model  # noqa: E402
from cnnjax.models import torchvision_weights as tvw  # noqa: E402
from tests.models.test_torchvision_weights_inputs import resnet18_state_dict  # noqa: E402

NUM_CLASSES = 10

#: Keywords for torchvision builders beyond num_classes (googlenet's defaults are aux heads on
#: and a FutureWarning about init_weights).
BUILDER_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True}}


def _torchvision_model(name, num_classes=NUM_CLASSES, seed=0, **kwargs):
    """torchvision's model for the cnnjax model `name` (its builder `TORCHVISION_BUILDERS[name]`,
    with `BUILDER_KWARGS` updated by `kwargs`) with random weights and random BatchNorm state, in
    eval mode."""
    torch.manual_seed(seed)
    builder = tvw.TORCHVISION_BUILDERS.get(name, name)
    kwargs = {**BUILDER_KWARGS.get(builder, {}), **kwargs}
    model = getattr(torchvision.models, builder)(num_classes=num_classes, **kwargs)
    with torch.no_grad():
        # googlenet's own init (conv weights with std 0.01) shrinks the signal ~10x per layer
        # while the random BatchNorm shifts add constants: its logits would hardly depend on
        # the input, and no layout error could show. He-normal conv weights keep the signal.
        if builder == "googlenet":
            for module in model.modules():
                if isinstance(module, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        # Eval-mode BN with random statistics does not normalize, so every residual branch
        # would add about as much as the stream holds: ResNet-152's logits reach 1e10.
        # A small last-BN scale per branch keeps them O(1), as in trained nets.
        for module in model.modules():
            if isinstance(module, torchvision.models.resnet.BasicBlock):
                module.bn2.weight.mul_(0.2)
            if isinstance(module, torchvision.models.resnet.Bottleneck):
                module.bn3.weight.mul_(0.2)
    return model.eval()


def _numpy_state_dict(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=1)  # the latest only: AlexNet's variables alone are 244 MB
def _reference_run(name, torch_kwargs, height, width, batch):
    """`(x, torchvision's eval logits on x, its converted variables)` for the random torchvision
    model `_torchvision_model(name, **dict(torch_kwargs))` on one random NCHW batch. Cached: a
    test comparing two cnnjax settings against one reference builds, runs and converts it once."""
    reference = _torchvision_model(name, **dict(torch_kwargs))
    x = np.random.default_rng(0).normal(size=(batch, 3, height, width)).astype(np.float32)
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    return x, want, tvw.convert_state_dict(name, _numpy_state_dict(reference))


@functools.cache
def _jitted_eval_apply(name, model_kwargs):
    """cnnjax's `name` (NUM_CLASSES classes, `dict(model_kwargs)`) applied in eval mode under
    jit, one compiled function per setting (tests of the same model reuse its compilation)."""
    model = create_model(name, num_classes=NUM_CLASSES, **dict(model_kwargs))
    return jax.jit(lambda v, x: model.apply(v, x, train=False))


def max_logit_difference(name, height, width, batch=2, torch_kwargs=None, model_kwargs=None):
    """(max |cnnjax - torchvision| logit, max |torchvision logit|, max |difference between the
    torchvision logits of the first two inputs|) on one random batch; the torchvision builder
    and the cnnjax model get `torch_kwargs` / `model_kwargs`."""
    x, want, variables = _reference_run(name, tuple(sorted((torch_kwargs or {}).items())),
                                        height, width, batch)
    apply = _jitted_eval_apply(name, tuple(sorted((model_kwargs or {}).items())))
    got = apply(variables, x.transpose(0, 2, 3, 1))
    return (float(np.abs(np.asarray(got) - want).max()), float(np.abs(want).max()),
            float(np.abs(want[0] - want[1]).max()))


def _check(name, height, width, **kwargs):
    diff, scale, spread = max_logit_difference(name, height, width, **kwargs)
    assert 1e-2 < scale < 1e3  # logits neither vanish nor explode with these random weights
    assert spread > 1e-2 * scale  # they depend on the input (measured: 2.3% .. 25% of scale)
    assert diff <= 1e-5 * scale, f"{name}: max |diff| {diff} at logit scale {scale}"


# One of each layout in the default suite (basic and bottleneck ResNet, VGG with BN, AlexNet,
# GoogLeNet); DenseNet's table is exercised there by the published-key-names test, its logits
# are slow.
# VGG's conversion is -m slow (torch builds 133 M parameters: ~20 s of CI time); alexnet's
# checks the same classifier flatten order, resnet18's the BatchNorm mapping.
FAST = [("resnet18", 64, 64), ("resnet50", 64, 64), ("alexnet", 224, 224),
        ("googlenet_bn", 80, 80)]
SLOW = ([(f"resnet{d}", 64, 64) for d in (34, 101, 152)]
        + [(f"vgg{d}{bn}", 64, 96) for d in (11, 13, 16, 19) for bn in ("", "_bn")]
        + [(f"densenet{d}", 64, 64) for d in (121, 161, 169, 201)]
        + [("vgg16", 224, 224)])


def test_every_supported_model_is_compared():
    assert sorted({name for name, _, _ in FAST + SLOW}) == sorted(tvw.SUPPORTED_MODELS)
    assert sorted(tvw.TORCHVISION_BUILDERS) == sorted(tvw.SUPPORTED_MODELS)
    assert set(tvw.TORCHVISION_BUILDERS.values()) <= set(torchvision.models.list_models())
    assert {k: v for k, v in tvw.TORCHVISION_BUILDERS.items() if k != v} == {
        "googlenet_bn": "googlenet"}


@pytest.mark.parametrize("name, torch_kwargs, model_kwargs, count", [
    ("densenet161", {}, {}, 28_681_000),
    ("googlenet_bn", {"aux_logits": False, "init_weights": False}, {}, 6_624_904),
    ("googlenet_bn", {"aux_logits": True, "init_weights": False}, {"aux_logits": True},
     13_004_888),
])
def test_parameter_count_equals_torchvisions(name, torch_kwargs, model_kwargs, count):
    """At 1000 classes; googlenet_bn also with the auxiliary heads (both sides build them)."""
    reference = getattr(torchvision.models, tvw.TORCHVISION_BUILDERS[name])(**torch_kwargs)
    assert sum(p.numel() for p in reference.parameters()) == count
    model = create_model(name, **model_kwargs)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(shapes["params"])) == count


@pytest.mark.parametrize("name, height, width", FAST)
def test_logits_match_torchvision(name, height, width):
    _check(name, height, width)


@pytest.mark.slow
@pytest.mark.parametrize("name, height, width", SLOW)
def test_logits_match_torchvision_slow(name, height, width):
    _check(name, height, width)


def test_numpy_resnet18_fixture_has_torchvisions_keys_and_shapes():
    """The hand-written state_dict of the torch-free tests is exactly torchvision's layout."""
    want = {k: tuple(v.shape) for k, v in torchvision.models.resnet18(num_classes=7)
            .state_dict().items()}
    assert {k: v.shape for k, v in resnet18_state_dict(num_classes=7).items()} == want


def test_a_data_parallel_wrapped_models_state_dict_converts_the_same():
    model = _torchvision_model("resnet18")
    wrapped = _numpy_state_dict(torch.nn.DataParallel(model))
    assert all(k.startswith("module.") for k in wrapped)
    want = flatten_dict(tvw.convert_state_dict("resnet18", _numpy_state_dict(model)))
    got = flatten_dict(tvw.convert_state_dict("resnet18", wrapped))
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_published_densenet_key_names_convert_the_same():
    """torchvision's published DenseNet files name layers `norm.1` (pre-0.4 PyTorch)."""
    sd = _numpy_state_dict(_torchvision_model("densenet121"))
    old = {}
    for key, value in sd.items():
        for new, legacy in (("norm1.", "norm.1."), ("norm2.", "norm.2."),
                            ("conv1.", "conv.1."), ("conv2.", "conv.2.")):
            if ".denselayer" in key and new in key:
                key = key.replace(new, legacy)
        old[key] = value
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    want = flatten_dict(tvw.convert_state_dict("densenet121", sd))
    got = flatten_dict(tvw.convert_state_dict("densenet121", old))
    assert sorted(got) == sorted(want)
    assert all(np.array_equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------------------ googlenet_bn specifics
def test_googlenet_aux_heads_are_dropped():
    """torchvision's googlenet(aux_logits=True) (and its published checkpoint) has `aux1.*` /
    `aux2.*` keys; they convert to exactly the variables of the same model without them (the
    aux heads are training-only and untrained in the published file: `IGNORED_PREFIXES`)."""
    with_aux = _numpy_state_dict(_torchvision_model("googlenet_bn", aux_logits=True))
    aux_keys = {k for k in with_aux if k.startswith(("aux1.", "aux2."))}
    assert {k.split(".")[0] for k in aux_keys} == {"aux1", "aux2"} and len(aux_keys) == 2 * 10
    without = {k: v for k, v in with_aux.items() if k not in aux_keys}
    got = flatten_dict(tvw.convert_state_dict("googlenet_bn", with_aux))
    want = flatten_dict(tvw.convert_state_dict("googlenet_bn", without))
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    assert not any("aux" in "/".join(k) for k in got)
    assert set(tvw.IGNORED_PREFIXES["googlenet_bn"]) == {"aux1.", "aux2."}
    assert sorted(_numpy_state_dict(_torchvision_model("googlenet_bn"))) == sorted(without)
    # Only the aux prefixes are dropped: any other unknown key still fails.
    with pytest.raises(ValueError, match=r"it has keys torchvision's googlenet does not: "
                                         r"'aux3.fc1.weight'"):
        tvw.convert_state_dict("googlenet_bn",
                               dict(without, **{"aux3.fc1.weight": np.zeros((2, 2), np.float32)}))


def test_googlenet_logits_with_aux_heads_in_the_state_dict_match_torchvision():
    """A torchvision googlenet built with aux heads, in eval mode (which skips them), against
    cnnjax's googlenet_bn converted from its full state_dict."""
    _check("googlenet_bn", 80, 80, torch_kwargs={"aux_logits": True})


def test_googlenet_transform_input_matches_torchvision():
    """transform_input=True on both sides (torchvision's setting for its ImageNet weights, which
    `pretrained_model_kwargs` gives): ImageNet-normalized input rescaled to [-1, 1] inputs."""
    assert tvw.pretrained_model_kwargs("googlenet_bn") == {"transform_input": True}
    _check("googlenet_bn", 80, 80, torch_kwargs={"transform_input": True},
           model_kwargs=tvw.pretrained_model_kwargs("googlenet_bn"))
    # The transform matters: without it on the cnnjax side the logits differ.
    diff, scale, _ = max_logit_difference("googlenet_bn", 80, 80,
                                          torch_kwargs={"transform_input": True})
    assert diff > 1e-2 * scale


def _googlenet_aux_leaves(name):
    """torchvision's InceptionAux `name` -> cnnjax's InceptionAuxBN (the converter drops these;
    the aux layout test maps them itself)."""
    leaves = (tvw._conv(f"{name}.conv.conv", f"{name}/conv/conv", bias=False)
              + tvw._bn(f"{name}.conv.bn", f"{name}/conv/bn"))
    for torch_name, path, layout in ((f"{name}.fc1", "fc", tvw._flatten_chw_dense(128)),
                                     (f"{name}.fc2", "head", tvw._DENSE)):
        leaves += [tvw._Leaf(f"{torch_name}.weight", "params", (name, path, "kernel"), layout),
                   tvw._Leaf(f"{torch_name}.bias", "params", (name, path, "bias"), tvw._VECTOR)]
    return leaves


def test_googlenet_training_outputs_with_aux_heads_match_torchvision():
    """Train mode (BatchNorm on batch statistics, dropout off on both sides), aux heads on: the
    main logits and both auxiliary logits agree. At 112x112 the aux heads pool a 7x7 map to 4x4
    through overlapping adaptive bins, and fc1 reads torch's (c, h, w) flatten order.

    Tolerance 2e-4 of the logit scale, not 1e-5: 60 BatchNorms on batch statistics (of as few
    as 16 values per channel on the 2x2 maps of inception 5) amplify float32 rounding. Measured:
    torch float32 is itself 1.5e-5 off its float64 result here, cnnjax 4e-5 .. 9e-5 off torch
    float32, of which flax's one-pass variance (E[x^2] - E[x]^2) is most (two-pass: 1e-5 .. 4e-5).
    A layout error moves the logits by their own scale."""
    reference = _torchvision_model("googlenet_bn", aux_logits=True, dropout=0.0, dropout_aux=0.0)
    reference.train()
    sd = _numpy_state_dict(reference)
    x = np.random.default_rng(1).normal(size=(4, 3, 112, 112)).astype(np.float32)
    with torch.no_grad():
        want = reference(torch.from_numpy(x))
    variables = tvw.convert_state_dict("googlenet_bn", sd)
    flat = flatten_dict(variables)
    for aux in ("aux1", "aux2"):
        for leaf in _googlenet_aux_leaves(aux):
            flat[(leaf.collection, *leaf.path)] = leaf.layout.to_flax(sd[leaf.torch_key])
    model = create_model("googlenet_bn", num_classes=NUM_CLASSES, aux_logits=True,
                         dropout_rate=0.0, aux_dropout_rate=0.0)
    expected = jax.eval_shape(lambda r: model.init(r, x.transpose(0, 2, 3, 1)), jax.random.key(0))
    assert {k: v.shape for k, v in flat.items()} == {
        k: v.shape for k, v in flatten_dict(expected).items()}
    got, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        unflatten_dict(flat), x.transpose(0, 2, 3, 1))
    # torchvision returns (logits, aux_logits2, aux_logits1), cnnjax (logits, aux1, aux2).
    for g, w in zip(got, (want.logits, want.aux_logits1, want.aux_logits2), strict=True):
        w = w.numpy()
        assert 1e-2 < np.abs(w).max() < 1e3
        assert np.abs(np.asarray(g) - w).max() <= 2e-4 * np.abs(w).max()


@pytest.mark.slow
def test_command_writes_a_workdir_a_fine_tune_starts_from(tmp_path, monkeypatch):
    """The CLI on a .pth file, then a 10-class fine-tune of it with the unchanged engine."""
    from cnnjax.train import loop
    from cnnjax.train.parallel import DataParallel
    from experiments.configs import fake_data_benchmark

    reference = _torchvision_model("resnet18", num_classes=1000)
    weights, workdir = tmp_path / "resnet18-random.pth", tmp_path / "pretrained"
    torch.save(reference.state_dict(), weights)
    command = [sys.executable, "-m", "cnnjax.models.torchvision_weights", "--model=resnet18",
               f"--weights={weights}", f"--workdir={workdir}"]
    first = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "wrote" in first.stdout and "11,689,512 parameters" in first.stdout
    again = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "already converted (nothing written)" in again.stdout

    seen = []  # the host state each run hands to the devices: its state at step 0
    replicate = DataParallel.replicate
    monkeypatch.setattr(DataParallel, "replicate",
                        lambda self, tree: seen.append(jax.tree.map(np.array, tree))
                        or replicate(self, tree))
    config = fake_data_benchmark.get_config()
    config.data.fake_num_train, config.data.fake_num_eval = 16, 8
    config.global_batch_size, config.num_train_steps, config.eval_every_steps = 8, 1, 1
    config.progress_bar = config.tensorboard = config.async_checkpoints = False
    config.init_from.workdir = str(workdir)
    summary = loop.train_and_evaluate(config, str(tmp_path / "finetune"))

    assert summary["status"] == "completed"
    assert summary["init_from"]["model"] == "resnet18"
    assert summary["init_from"]["fresh_modules"] == ["head"]
    assert summary["init_from"]["loaded_leaves"] == 100  # 60 params + 40 BatchNorm statistics
    (start,) = seen
    converted = tvw.convert_state_dict("resnet18", _numpy_state_dict(reference))
    for collection in ("params", "batch_stats"):
        got = flatten_dict(getattr(start, collection))
        for key, value in flatten_dict(converted[collection]).items():
            if key[0] == "head":
                assert got[key].shape[-1] == 10  # fresh 10-class head
                continue
            np.testing.assert_array_equal(got[key], value, err_msg="/".join(key))
    assert json.loads((workdir / "summary.json").read_text())["status"] == "converted"


def test_bfloat16_and_grad_tracking_tensors_convert_like_their_float32_values():
    """`convert_state_dict` takes CPU tensors too: a bfloat16 state_dict (torch's
    `model.bfloat16().state_dict()`) and parameters that still track gradients
    (`dict(model.named_parameters())`) convert exactly as the float32 NumPy values of the same
    tensors (bfloat16 -> float32 is exact: tolerance 0)."""
    model = _torchvision_model("resnet18")
    half = {k: v.bfloat16() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    want = flatten_dict(tvw.convert_state_dict(
        "resnet18", {k: v.float().numpy() for k, v in half.items()}))
    got = flatten_dict(tvw.convert_state_dict("resnet18", half))
    assert sorted(got) == sorted(want)
    assert all(got[k].dtype == np.float32 and np.array_equal(got[k], want[k]) for k in want)
    tracking = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert any(v.requires_grad for v in tracking.values())
    got = flatten_dict(tvw.convert_state_dict("resnet18", tracking))
    want = flatten_dict(tvw.convert_state_dict("resnet18", _numpy_state_dict(model)))
    assert all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("name, torch_kwargs, model_kwargs", [
    ("resnet18", {}, {}),
    pytest.param("vgg11_bn", {"dropout": 0.0}, {"dropout_rate": 0.0},
                 marks=pytest.mark.slow),  # ~19 s: converting and running its 25088x4096 fc6
])
def test_a_training_step_updates_running_statistics_as_documented(name, torch_kwargs,
                                                                  model_kwargs):
    """Train mode from converted weights: logits equal torchvision's, every running mean is
    updated as torch's (flax momentum 0.9 = torch 0.1), and every running variance is
    0.9 * old + 0.1 * the biased batch variance, where torch folds in the unbiased one
    (`resnet.batch_norm`'s documented difference). The batch variances are computed
    independently, in float64, from the inputs torch's BatchNorms receive."""
    reference = _torchvision_model(name, **torch_kwargs).train()
    before = {k: a.copy() for k, a in _numpy_state_dict(reference).items()}  # torch updates
    inputs = {}                                                                # them in place
    hooks = [module.register_forward_hook(
        lambda mod, args, out, key=key: inputs.__setitem__(key, args[0].double().numpy()))
        for key, module in reference.named_modules() if isinstance(module, torch.nn.BatchNorm2d)]
    x = np.random.default_rng(2).normal(size=(4, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    for hook in hooks:
        hook.remove()
    model = create_model(name, num_classes=NUM_CLASSES, **model_kwargs)
    got, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        tvw.convert_state_dict(name, before), x.transpose(0, 2, 3, 1))
    assert np.abs(np.asarray(got) - want).max() <= 1e-5 * np.abs(want).max()
    # The torch keys of each cnnjax statistic: convert torch's updated state dict alike.
    torch_after = flatten_dict(tvw.convert_state_dict(name, _numpy_state_dict(reference)))
    old = flatten_dict(tvw.convert_state_dict(name, before))
    leaves = {leaf.target: leaf.torch_key for leaf in tvw._architecture(name).leaves(model)}
    ours = flatten_dict({"batch_stats": updates["batch_stats"]})
    assert len(ours) == 2 * len(inputs)
    for path, value in ours.items():
        value = np.asarray(value, np.float64)
        if path[-1] == "mean":
            np.testing.assert_allclose(value, torch_after[path], rtol=1e-5, atol=1e-6)
            continue
        module = leaves["/".join(path)].rsplit(".", 1)[0]
        batch = inputs[module]  # (N, C, H, W), as torch's BatchNorm saw it
        n = batch.size // batch.shape[1]
        biased = batch.var(axis=(0, 2, 3))
        np.testing.assert_allclose(value, 0.9 * old[path] + 0.1 * biased, rtol=1e-5)
        torch_var = 0.9 * old[path] + 0.1 * biased * n / (n - 1)
        np.testing.assert_allclose(torch_after[path], torch_var, rtol=1e-5)
