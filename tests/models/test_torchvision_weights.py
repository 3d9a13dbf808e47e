"""torchvision -> cnnjax weight conversion against torchvision itself (needs torch + torchvision).

Each supported architecture is built in torchvision with random weights (BatchNorm affine
parameters and running statistics randomized too, so BN is not the identity), converted, and
both are run in eval mode on the same random input (NCHW for torch, NHWC for cnnjax) in float32.
Tolerance: max |logit difference| <= 1e-5 * max |torch logit| (float32 summation order; the
measured ratios are 3e-7 .. 3e-6). Inputs are small where the architecture allows:
ResNets and DenseNets have global pooling; VGG's and AlexNet's adaptive pools (7x7, 6x6) make
any size valid, and AlexNet runs at 224 so its pool5 map is a real 6x6 map (fc6's flatten order
is exercised on distinct positions; VGG-16 at 224 is the slow native-size case).
Bad inputs and the workdir are tested without torch in test_torchvision_weights_inputs.py.
"""

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax.traverse_util import flatten_dict  # noqa: E402

from cnnjax.models import create_model  # noqa: E402
from cnnjax.models import torchvision_weights as tvw  # noqa: E402
from tests.models.test_torchvision_weights_inputs import resnet18_state_dict  # noqa: E402

NUM_CLASSES = 10


def _torchvision_model(name, num_classes=NUM_CLASSES, seed=0):
    """torchvision's `name` with random weights and random BatchNorm state, in eval mode."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(num_classes=num_classes)
    with torch.no_grad():
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


def max_logit_difference(name, height, width, batch=2):
    """(max |cnnjax - torchvision| logit, max |torchvision logit|) on one random batch."""
    reference = _torchvision_model(name)
    x = np.random.default_rng(0).normal(size=(batch, 3, height, width)).astype(np.float32)
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    variables = tvw.convert_state_dict(name, _numpy_state_dict(reference))
    model = create_model(name, num_classes=NUM_CLASSES)
    got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x.transpose(0, 2, 3, 1))
    return float(np.abs(np.asarray(got) - want).max()), float(np.abs(want).max())


def _check(name, height, width):
    diff, scale = max_logit_difference(name, height, width)
    assert 1e-2 < scale < 1e3  # logits neither vanish nor explode with these random weights
    assert diff <= 1e-5 * scale, f"{name}: max |diff| {diff} at logit scale {scale}"


# One of each layout in the default suite (basic and bottleneck ResNet, VGG with BN, AlexNet);
# DenseNet's table is exercised there by the published-key-names test, its logits are slow.
FAST = [("resnet18", 64, 64), ("resnet50", 64, 64), ("vgg11_bn", 64, 96), ("alexnet", 224, 224)]
SLOW = ([(f"resnet{d}", 64, 64) for d in (34, 101, 152)]
        + [(f"vgg{d}{bn}", 64, 96) for d in (11, 13, 16, 19) for bn in ("", "_bn")
           if f"vgg{d}{bn}" != "vgg11_bn"]
        + [(f"densenet{d}", 64, 64) for d in (121, 169, 201)]
        + [("vgg16", 224, 224)])


def test_every_supported_model_is_compared():
    assert sorted({name for name, _, _ in FAST + SLOW}) == sorted(tvw.SUPPORTED_MODELS)
    assert set(tvw.SUPPORTED_MODELS) <= set(torchvision.models.list_models())


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
