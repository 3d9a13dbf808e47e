"""benchmarks.train_step's PyTorch twin is the cnnjax ResNet: given the cnnjax network's initial
weights and batch, it computes the same train-mode logits, and the benchmark's PyTorch step moves
every parameter as the benchmark's JAX step does.

The benchmark itself checks only the parameter count, which a different topology can keep (the
stem's max pool dropped, the stride on another convolution of a block). Weights go JAX -> torch
by the cnnjax layer names in forward order, the order of the twin's layers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from benchmarks import train_step as ts

torch = pytest.importorskip("torch")

CLASSES, BATCH, SIZE = 10, 4, 32
# float32 on both sides. Logits: the twin's differ by <= 7e-5 (5 seeds; 1e-7 with both sides in
# float64), by >= 0.7 with the stem's max pool dropped or a block's stride moved.
LOGITS_ATOL = 5e-4
# One step's update, as a fraction of a tensor's largest, with both steps in float64: <= 7.2e-8
# apart (ResNet-18 and -50). In float32 a random BatchNorm net's one-step gradients at batch 4
# are rounding-bound: on a Zen 3 CPU PyTorch's own float32 update is 6.7% (ResNet-18) and 18%
# (ResNet-50) of a tensor's largest away from its float64 one, and JAX's alike.
UPDATE_RTOL = 1e-6


def cnnjax_layers_in_forward_order(params: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """`(name, variables)` of every conv, BatchNorm and dense layer of a cnnjax ResNet: the stem,
    each block's conv/bn pairs then its projection, the head."""
    def block_key(name: str) -> tuple[int, int]:  # "stage2_block10" -> (2, 10)
        stage, block = name.removeprefix("stage").split("_block")
        return int(stage), int(block)

    blocks = sorted((name for name in params if name.startswith("stage")), key=block_key)
    assert set(params) == {"conv_init", "bn_init", *blocks, "head"}, sorted(params)
    in_block = [f"{kind}{k}" for k in (1, 2, 3) for kind in ("conv", "bn")]
    in_block += ["proj_conv", "proj_bn"]
    layers = [("conv_init", params["conv_init"]), ("bn_init", params["bn_init"])]
    for block in blocks:
        names = [name for name in in_block if name in params[block]]
        assert len(names) == len(params[block]), f"{block}: {sorted(params[block])}"
        layers += [(f"{block}/{name}", params[block][name]) for name in names]
    return [*layers, ("head", params["head"])]


def in_twin_layout(params: dict[str, Any], twin: Any) -> list[np.ndarray]:
    """A cnnjax ResNet's params as the twin's `parameters()` (OIHW kernels, (out, in) dense),
    refusing a layer whose kind or shape differs from the twin's."""
    layers = cnnjax_layers_in_forward_order(params)
    modules = [m for m in twin.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.Linear))]
    assert len(layers) == len(modules), f"{len(layers)} cnnjax layers, {len(modules)} torch ones"
    values = []
    for (name, variables), module in zip(layers, modules, strict=True):
        if isinstance(module, torch.nn.Conv2d):
            assert "conv" in name, f"{name} -> {module}"
            pairs = [(module.weight, variables["kernel"].transpose(3, 2, 0, 1))]
        elif isinstance(module, torch.nn.BatchNorm2d):
            assert "bn" in name, f"{name} -> {module}"
            pairs = [(module.weight, variables["scale"]), (module.bias, variables["bias"])]
        else:
            assert name == "head", f"{name} -> {module}"
            pairs = [(module.weight, variables["kernel"].T), (module.bias, variables["bias"])]
        for target, value in pairs:  # (copy_ would broadcast a 1x1 kernel into a 3x3 one)
            assert tuple(target.shape) == value.shape, f"{name}: {target.shape} vs {value.shape}"
            values.append(value)
    assert len(values) == len(list(twin.parameters()))
    return values


def load_into_twin(twin: Any, params: dict[str, Any]) -> None:
    """Overwrites the twin's parameters with a cnnjax ResNet's `params`."""
    with torch.no_grad():
        for target, value in zip(twin.parameters(), in_twin_layout(params, twin), strict=True):
            target.copy_(torch.tensor(value))


def nchw(images: np.ndarray) -> torch.Tensor:
    """NHWC images as a torch NCHW tensor."""
    return torch.tensor(images.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("model_name, stem", [
    ("resnet18", "imagenet"), pytest.param("resnet18", "cifar", marks=pytest.mark.slow),
    pytest.param("resnet50", "cifar", marks=pytest.mark.slow)])
def test_the_twin_computes_the_same_train_mode_logits(model_name, stem):
    """With the cnnjax network's weights, in train mode (BatchNorm normalizes with the batch's
    statistics, as in the timed step). ResNet-50: the bottleneck blocks, where the stride sits
    on the 3x3; the CIFAR stem keeps its last BatchNorm at 64 values per channel (4 with the
    ImageNet stem at 32x32, where float32 rounding reaches 4e-3)."""
    import jax

    from cnnjax.models import create_model

    images = np.random.default_rng(0).standard_normal((BATCH, SIZE, SIZE, 3), np.float32)
    model = create_model(model_name, num_classes=CLASSES, stem=stem)
    variables = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0), images))
    logits, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
    twin = ts.build_torch_resnet(model_name, CLASSES, stem).train()
    load_into_twin(twin, variables["params"])
    with torch.no_grad():
        torch_logits = twin(nchw(images)).numpy()
    np.testing.assert_allclose(torch_logits, np.asarray(logits), rtol=0, atol=LOGITS_ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("model_name, stem", [("resnet18", "cifar"), ("resnet18", "imagenet"),
                                              ("resnet50", "cifar")])
def test_the_benchmarks_jax_and_pytorch_steps_update_every_parameter_alike(model_name, stem):
    """The benchmark's JAX step and its PyTorch step, from the same weights on the same batch:
    the first SGD+momentum step moves each parameter by -learning_rate * gradient on both
    (resnet50: the bottleneck blocks' three convolutions and projection too). Both in float64,
    where rounding cannot hide a difference of the steps' math."""
    import jax
    import jax.numpy as jnp

    def widened(tree: Any) -> Any:
        return jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x,
                            tree)

    with jax.enable_x64(True):
        bench = ts.build_jax_step(model_name, CLASSES, BATCH, (SIZE, SIZE, 3), 1, "pmap",
                                  "float64", stem=stem)
        bench["state"], bench["batch"] = widened(bench["state"]), widened(bench["batch"])
        unreplicate = bench["parallel"].unreplicate
        initial = jax.tree.map(np.asarray, unreplicate(bench["state"].params))
        ts.compile_jax_step(bench)
        ts.run_jax_steps(bench, 1)
        end = jax.tree.map(np.asarray, unreplicate(bench["state"].params))
    twin = ts.build_torch_step(model_name, CLASSES, BATCH, SIZE, "float32", False, stem)
    net = twin["model"].double()
    load_into_twin(net, initial)
    with torch.no_grad():
        twin["images"].data = nchw(np.asarray(bench["batch"]["image"])[0]).double()
        twin["labels"].copy_(torch.tensor(np.asarray(bench["batch"]["label"])[0]))
    before = [p.detach().numpy().copy() for p in net.parameters()]
    assert {b.dtype for b in before} == {np.dtype(np.float64)}

    twin["step"]()

    jax_after = in_twin_layout(end, net)
    for (name, torch_after), start, jax_end in zip(net.named_parameters(), before, jax_after,
                                                   strict=True):
        jax_update, torch_update = jax_end - start, torch_after.detach().numpy() - start
        scale = np.abs(jax_update).max()
        assert scale > 0, f"{name}: JAX's step left it unchanged"
        np.testing.assert_allclose(torch_update, jax_update, rtol=0, atol=UPDATE_RTOL * scale,
                                   err_msg=f"{name}: one step's update")
