"""torchvision weight conversion without torch: bad inputs, layouts against NumPy, the workdir.

State dicts here are NumPy dicts written out by hand in torchvision's naming (ResNet-18), so
these tests run in the default suite, which has no torch; the logit comparisons against
torchvision itself are in test_torchvision_weights.py.
"""

import json
import sys

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from cnnjax.models import create_model
from cnnjax.models import torchvision_weights as tvw
from cnnjax.train.checkpoint import SourceCheckpoints
from cnnjax.train.state import WARM_START_COLLECTIONS, init_variables, select_pretrained


def _bn(prefix, n, rng):
    return {f"{prefix}.weight": rng.uniform(0.5, 1.5, n), f"{prefix}.bias": rng.normal(0, 0.1, n),
            f"{prefix}.running_mean": rng.normal(0, 0.1, n),
            f"{prefix}.running_var": rng.uniform(0.5, 1.5, n),
            f"{prefix}.num_batches_tracked": np.array(7, np.int64)}


def resnet18_state_dict(num_classes=1000, seed=0):
    """torchvision's resnet18 state_dict (its names and shapes, 0.29) holding random numbers."""
    rng = np.random.default_rng(seed)
    sd = {"conv1.weight": rng.normal(0, 0.1, (64, 3, 7, 7)), **_bn("bn1", 64, rng)}
    width_in = 64
    for i, width in enumerate((64, 128, 256, 512), start=1):
        for j in range(2):
            p = f"layer{i}.{j}"
            cin = width_in if j == 0 else width
            sd[f"{p}.conv1.weight"] = rng.normal(0, 0.1, (width, cin, 3, 3))
            sd[f"{p}.conv2.weight"] = rng.normal(0, 0.1, (width, width, 3, 3))
            sd.update(_bn(f"{p}.bn1", width, rng) | _bn(f"{p}.bn2", width, rng))
            if j == 0 and i > 1:
                sd[f"{p}.downsample.0.weight"] = rng.normal(0, 0.1, (width, cin, 1, 1))
                sd.update(_bn(f"{p}.downsample.1", width, rng))
        width_in = width
    sd["fc.weight"] = rng.normal(0, 0.1, (num_classes, 512))
    sd["fc.bias"] = rng.normal(0, 0.1, num_classes)
    return {k: np.asarray(v, np.float32) if v.dtype == np.float64 else v for k, v in sd.items()}


@pytest.fixture(scope="module")
def resnet18_sd():
    return resnet18_state_dict(num_classes=7)


@pytest.fixture(scope="module")
def resnet18_vars(resnet18_sd):
    return tvw.convert_state_dict("resnet18", resnet18_sd)


# ------------------------------------------------------------------------------- conversion
def test_resnet18_every_leaf_filled_with_the_model_shapes(resnet18_sd, resnet18_vars):
    expected = tvw.expected_variable_shapes("resnet18", 7)
    got = {"/".join(k): v.shape for k, v in flatten_dict(resnet18_vars).items()}
    assert got == expected  # 7 classes read from fc.weight; num_batches_tracked dropped
    assert all(v.dtype == np.float32 for v in jax.tree.leaves(resnet18_vars))
    p, s = resnet18_vars["params"], resnet18_vars["batch_stats"]
    np.testing.assert_array_equal(p["head"]["kernel"], resnet18_sd["fc.weight"].T)
    np.testing.assert_array_equal(p["stage2_block1"]["proj_bn"]["scale"],
                                  resnet18_sd["layer2.0.downsample.1.weight"])
    np.testing.assert_array_equal(s["stage4_block2"]["bn2"]["var"],
                                  resnet18_sd["layer4.1.bn2.running_var"])
    np.testing.assert_array_equal(s["bn_init"]["mean"], resnet18_sd["bn1.running_mean"])


def _torch_conv2d_f64(x_nchw, w_oihw, stride, pad):
    """Cross-correlation in torch's convention, float64 NumPy (the independent reference)."""
    x = np.pad(x_nchw.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    o, _, kh, kw = w_oihw.shape
    h = (x.shape[2] - kh) // stride + 1
    w = (x.shape[3] - kw) // stride + 1
    out = np.zeros((x.shape[0], o, h, w))
    for dy in range(kh):
        for dx in range(kw):
            patch = x[:, :, dy:dy + stride * h:stride, dx:dx + stride * w:stride]
            out += np.einsum("nihw,oi->nohw", patch, w_oihw[:, :, dy, dx].astype(np.float64))
    return out


def test_converted_conv_kernel_computes_the_torch_convolution(resnet18_sd, resnet18_vars):
    """conv1 (7x7/2, pad 3): the HWIO kernel in lax (NHWC) equals torch's OIHW conv (NCHW)."""
    x = np.random.default_rng(1).normal(size=(2, 3, 20, 18)).astype(np.float32)
    got = jax.lax.conv_general_dilated(
        x.transpose(0, 2, 3, 1), resnet18_vars["params"]["conv_init"]["kernel"], (2, 2),
        ((3, 3), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST)
    want = _torch_conv2d_f64(x, resnet18_sd["conv1.weight"], 2, 3).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_flattened_map_dense_matches_torch_flatten_order():
    """VGG/AlexNet fc6: torch flattens (c, h, w), cnnjax (h, w, c); same outputs either way."""
    rng = np.random.default_rng(0)
    c, side, out = 3, 4, 5
    w = rng.normal(size=(out, c * side * side))
    x_chw = rng.normal(size=(c, side, side))
    kernel = tvw._flatten_chw_dense(c).to_flax(w)
    np.testing.assert_allclose(x_chw.transpose(1, 2, 0).reshape(-1) @ kernel,
                               w @ x_chw.reshape(-1), rtol=1e-12)


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name, match", [
    ("resnet19", r"model='resnet19' is invalid; expected one of \['alexnet', 'densenet121'"),
    ("googlenet", r"model='googlenet' is invalid; it cannot take torchvision weights: "
                  r"cnnjax's googlenet is the paper's network .*convert torchvision's googlenet "
                  r"to model 'googlenet_bn'"),
    ("alexnet_2tower", "only has the single-tower alexnet"),
    ("vgg11_lrn", "torchvision has no VGG configuration A-LRN"),
    ("vgg16_c", "torchvision has no VGG configuration C"),
])
def test_unsupported_model_names(resnet18_sd, name, match):
    with pytest.raises(ValueError, match=match):
        tvw.convert_state_dict(name, resnet18_sd)


def test_a_missing_weights_file_is_named_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"torchvision_weights: weights='/nowhere/r50.pth' is "
                                         r"invalid; no such file \(cnnjax never downloads"):
        tvw.convert_file("resnet50", "/nowhere/r50.pth", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_workdir_blocked_by_a_file_is_refused_before_the_weights_are_read(tmp_path,
                                                                            monkeypatch):
    (tmp_path / "r18.pth").write_bytes(b"weights")
    monkeypatch.setattr(tvw, "load_torch_state_dict", lambda path: pytest.fail("weights read"))
    for workdir in ("r18.pth", "r18.pth/sub"):
        with pytest.raises(ValueError, match=r"^--workdir=.* is invalid"):
            tvw.convert_file("resnet18", str(tmp_path / "r18.pth"), str(tmp_path / workdir))


def test_torchvision_builder_names_and_pretrained_kwargs():
    """Every supported model converts from the torchvision builder of its name, but googlenet_bn
    (torchvision's googlenet, which also needs transform_input=True for its ImageNet weights)."""
    assert tvw.TORCHVISION_BUILDERS["googlenet_bn"] == "googlenet"
    assert all(v == k for k, v in tvw.TORCHVISION_BUILDERS.items() if k != "googlenet_bn")
    assert {"densenet161", "googlenet_bn"} <= set(tvw.SUPPORTED_MODELS)
    assert not set(tvw.SUPPORTED_MODELS) & set(tvw.UNSUPPORTED_MODELS)
    assert tvw.pretrained_model_kwargs("googlenet_bn") == {"transform_input": True}
    assert tvw.pretrained_model_kwargs("resnet50") == {}
    model = create_model("googlenet_bn", **tvw.pretrained_model_kwargs("googlenet_bn"))
    assert model.transform_input


def test_errors_name_the_torchvision_builder(resnet18_sd):
    with pytest.raises(ValueError, match=(
            r"torchvision_weights\('googlenet_bn'\): state_dict='122 keys' is invalid; it lacks "
            r"'conv1.conv.weight' \(torch shape \(64, 3, 7, 7\) for params/conv1/conv/kernel\)"
            r".*expected every key of torchvision's googlenet\(num_classes=7\)")):
        tvw.convert_state_dict("googlenet_bn", resnet18_sd)


def test_missing_key_names_it_and_its_torch_shape(resnet18_sd):
    sd = {k: v for k, v in resnet18_sd.items() if k != "layer3.1.conv2.weight"}
    with pytest.raises(ValueError, match=(
            r"torchvision_weights\('resnet18'\): state_dict='121 keys' is invalid; it lacks "
            r"'layer3.1.conv2.weight' \(torch shape \(256, 256, 3, 3\) for "
            r"params/stage3_block2/conv2/kernel\)")):
        tvw.convert_state_dict("resnet18", sd)


def test_missing_classifier_is_named(resnet18_sd):
    sd = {k: v for k, v in resnet18_sd.items() if not k.startswith("fc.")}
    with pytest.raises(ValueError, match=r"fc.weight: missing.*expected the classifier weight "
                                         r"'fc.weight' of shape \(num_classes, features\)"):
        tvw.convert_state_dict("resnet18", sd)


def test_extra_key_is_named(resnet18_sd):
    sd = dict(resnet18_sd, **{"layer1.0.se.fc.weight": np.zeros((4, 64), np.float32)})
    with pytest.raises(ValueError, match=r"it has keys torchvision's resnet18 does not: "
                                         r"'layer1.0.se.fc.weight' \(4, 64\)"):
        tvw.convert_state_dict("resnet18", sd)


def test_a_data_parallel_checkpoint_converts_the_same(resnet18_sd, resnet18_vars):
    """`nn.DataParallel` / DDP save every key as `module.<key>`."""
    wrapped = {f"module.{k}": v for k, v in resnet18_sd.items()}
    got = flatten_dict(tvw.convert_state_dict("resnet18", wrapped))
    want = flatten_dict(resnet18_vars)
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_a_prefix_on_only_some_keys_is_not_stripped(resnet18_sd):
    mixed = {("module." + k if k.startswith("layer1.") else k): v for k, v in resnet18_sd.items()}
    with pytest.raises(ValueError, match=r"it lacks 'layer1\.0\.conv1\.weight'"):
        tvw.convert_state_dict("resnet18", mixed)


def test_a_resnet50_checkpoint_is_not_a_resnet18(resnet18_sd):
    sd = dict(resnet18_sd, **{"fc.weight": np.zeros((7, 2048), np.float32)})
    with pytest.raises(ValueError, match=(
            r"fc.weight=.array of shape \(7, 2048\). is invalid; torchvision's resnet18 "
            r"classifier weight has shape \(num_classes, 512\) \(torch's nn.Linear stores "
            r"\(out, in\)\)\.$")):
        tvw.convert_state_dict("resnet18", sd)


def test_a_transposed_classifier_weight_is_named_as_one(resnet18_sd):
    """num_classes is read from the head weight's first dim; a (features, num_classes) weight
    once made that 512 and asked for a (512, 512) tensor, a shape no valid file has."""
    sd = dict(resnet18_sd, **{"fc.weight": resnet18_sd["fc.weight"].T})
    with pytest.raises(ValueError) as error:
        tvw.convert_state_dict("resnet18", sd)
    assert str(error.value) == (
        "torchvision_weights('resnet18'): fc.weight='array of shape (512, 7)' is invalid; "
        "torchvision's resnet18 classifier weight has shape (num_classes, 512) (torch's "
        "nn.Linear stores (out, in)); it looks transposed, (features, num_classes) as JAX/Keras "
        "store a dense kernel: transpose it to (7, 512).")
    assert "(512, 512)" not in str(error.value)


def test_wrong_conv_shape_is_named(resnet18_sd):
    sd = dict(resnet18_sd, **{"conv1.weight": np.zeros((64, 3, 3, 3), np.float32)})
    with pytest.raises(ValueError, match=(
            r"conv1.weight=.array of shape \(64, 3, 3, 3\). is invalid; cnnjax's "
            r"params/conv_init/kernel needs shape \(7, 7, 3, 64\) \(conv OIHW -> HWIO\), i.e. a "
            r"torch tensor of shape \(64, 3, 7, 7\)")):
        tvw.convert_state_dict("resnet18", sd)


def test_not_a_mapping():
    with pytest.raises(ValueError, match=r"state_dict='list' is invalid; expected a mapping"):
        tvw.convert_state_dict("resnet18", [("fc.weight", np.zeros((2, 2)))])


def test_without_torch_reading_a_pth_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError, match="reading .pth files needs PyTorch"):
        tvw.load_torch_state_dict(str(tmp_path / "resnet18.pth"))


def test_a_whole_pickled_model_is_refused_with_the_state_dict_hint(tmp_path):
    """`torch.save(model)` pickles the module itself: `weights_only` loading refuses it (raising
    UnpicklingError, whose advice is to unpickle it anyway); cnnjax says to save the state_dict."""
    torch = pytest.importorskip("torch")
    path = tmp_path / "whole.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(ValueError, match=r"^torchvision_weights: weights='.*whole.pth' is "
                                         r"invalid; expected a state_dict saved with "
                                         r"torch.save\(model.state_dict\(\), path\)"):
        tvw.load_torch_state_dict(str(path))
    # torch raises UnpicklingError, KeyError ('hello' is read as a pickle opcode) or EOFError
    # with an empty message (which broke the message itself) on other junk.
    for junk in (b"not a torch file", b"hello", b"\x80"):
        (tmp_path / "junk.pth").write_bytes(junk)
        with pytest.raises(ValueError, match=r"weights='.*junk.pth' is invalid; expected a "
                                             r"state_dict"):
            tvw.load_torch_state_dict(str(tmp_path / "junk.pth"))
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"weights='.*empty.pth' is invalid; the file is empty "
                                         r"\(an interrupted download\?\)"):
        tvw.load_torch_state_dict(str(tmp_path / "empty.pth"))


def test_a_truncated_download_is_named_as_one(tmp_path):
    """Half of a state_dict file was refused as "expected a state_dict ... (a whole pickled
    model is not read ...)", with torch's own explanation cut mid-sentence."""
    torch = pytest.importorskip("torch")
    path = tmp_path / "lin.pth"
    torch.save(torch.nn.Linear(64, 64).state_dict(), path)
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match=r"^torchvision_weights: weights='.*lin.pth' is invalid; "
                                         r"the file is not a complete torch.save archive \(a "
                                         r"truncated or corrupted download\?\); fetch it again"):
        tvw.load_torch_state_dict(str(path))


def test_a_truncated_legacy_format_download_is_named_by_its_digest(tmp_path):
    """A pre-zip file (`_use_new_zipfile_serialization=False`: no end marker) cut anywhere was
    refused as "expected a state_dict ... (a whole pickled model ...)"; torch raises EOFError,
    struct.error, RuntimeError or UnpicklingError on such cuts. torch.hub names a published file
    by its SHA-256's first digits, which tell the cut; a whole pickled model named right keeps
    its own message."""
    torch = pytest.importorskip("torch")
    scratch = tmp_path / "scratch.pth"
    for seed in range(100):  # a digest of digits only takes the date hint below (2.3% of them)
        torch.manual_seed(seed)
        torch.save(torch.nn.Linear(8, 4).state_dict(), scratch,
                   _use_new_zipfile_serialization=False)
        if not tvw.file_sha256(str(scratch))[:8].isdigit():
            break
    whole = scratch.read_bytes()
    path = tmp_path / f"lin-{tvw.file_sha256(str(scratch))[:8]}.pth"
    for cut in (3, 15, 40, 120, 200, len(whole) // 2, len(whole) - 1):
        path.write_bytes(whole[:cut])
        with pytest.raises(ValueError, match=r"^torchvision_weights: weights='.*lin-[0-9a-f]{8}"
                                             r"\.pth' is invalid; its SHA-256 starts [0-9a-f]{8}, "
                                             r"not the [0-9a-f]{8} its name carries: a truncated "
                                             r"or corrupted download; fetch it again"):
            tvw.load_torch_state_dict(str(path))
    path.write_bytes(whole)
    assert set(tvw.load_torch_state_dict(str(path))) == {"weight", "bias"}
    # a digest of digits only (torchvision's vgg13-19584684.pth) may be a date: a hint
    digits = tmp_path / "vgg13-19584684.pth"
    digits.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match=r"expected a state_dict .*\); if 19584684 begins its "
                                         r"SHA-256, as in torch.hub's names, the file \(SHA-256 "
                                         r"[0-9a-f]{8}\.\.\.\) is a truncated or corrupted "
                                         r"download: fetch it again\.$"):
        tvw.load_torch_state_dict(str(digits))
    # whole pickled models: named by their digest, by a step number, and a zip-format one (its
    # end marker tells it is complete) whatever its name
    torch.save(torch.nn.Linear(2, 2), scratch, _use_new_zipfile_serialization=False)
    named = tmp_path / f"model-{tvw.file_sha256(str(scratch))[:8]}.pth"
    scratch.rename(named)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "ckpt-001000.pth",
               _use_new_zipfile_serialization=False)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model-abcdef12.pth")
    for path in (named, tmp_path / "ckpt-001000.pth", tmp_path / "model-abcdef12.pth"):
        with pytest.raises(ValueError, match=r"expected a state_dict saved with "
                                             r"torch.save\(model.state_dict\(\), path\) \(a "
                                             r"file holding a whole pickled model is not read"):
            tvw.load_torch_state_dict(str(path))


# ----------------------------------------------------------------------- warm-start workdir
def test_workdir_is_read_by_the_engines_init_from_path(tmp_path, resnet18_vars):
    workdir = str(tmp_path / "pretrained")
    source = {"weights": "/data/resnet18-f37072fd.pth", "sha256": "ab" * 32}
    assert tvw.write_warm_start_workdir(workdir, "resnet18", resnet18_vars, source)
    config = json.loads((tmp_path / "pretrained" / "config.json").read_text())
    assert config["model"] == "resnet18" and config["best_metric"] is None
    summary = json.loads((tmp_path / "pretrained" / "summary.json").read_text())
    assert summary["status"] == "converted" and summary["num_params"] == 11_180_103
    assert summary["model_kwargs"] == {}  # googlenet_bn's: {"transform_input": True}

    # What cnnjax.train.init_from.load_init_from does, for a 10-class fine-tune of resnet18.
    checkpoints = SourceCheckpoints(workdir)
    try:
        step, how = checkpoints.choose_step(None, config["best_metric"], config["best_mode"])
        assert (step, how) == (0, "latest")
        model = create_model("resnet18", num_classes=10)
        new_shapes = jax.eval_shape(
            lambda r: init_variables(model, r, (1, 32, 32, 3)), jax.random.key(0))
        selected = select_pretrained(
            new_shapes, checkpoints.shapes(step, WARM_START_COLLECTIONS), ("head",),
            source_workdir=workdir, source_step=step, model="resnet18",
            source_model=config["model"])
        loaded = checkpoints.restore(step, selected)
    finally:
        checkpoints.close()
    want = {k: v for k, v in flatten_dict(resnet18_vars).items() if k[1] != "head"}
    got = flatten_dict(loaded)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg="/".join(key))

    # A rerun is a no-op; other weights into the same workdir need --overwrite.
    assert not tvw.write_warm_start_workdir(workdir, "resnet18", resnet18_vars, source)
    other = dict(source, sha256="cd" * 32)
    with pytest.raises(ValueError, match=r"workdir='.*pretrained' is invalid; it already holds "
                                         r"checkpoints that are not this conversion"):
        tvw.write_warm_start_workdir(workdir, "resnet18", resnet18_vars, other)
    assert tvw.write_warm_start_workdir(workdir, "resnet18", resnet18_vars, other, overwrite=True)
    assert json.loads((tmp_path / "pretrained" / "summary.json").read_text())["source"] == other



def test_workdir_refuses_variables_of_another_model(tmp_path, resnet18_vars):
    with pytest.raises(ValueError, match=r"variables='102 leaves' is invalid; expected exactly "
                                         r"the variables of cnnjax's resnet34"):
        tvw.write_warm_start_workdir(str(tmp_path), "resnet34", resnet18_vars, {})
    assert not (tmp_path / "checkpoints").exists()


def test_a_run_without_the_settings_converted_weights_need_is_refused(tmp_path):
    """googlenet_bn's torchvision weights need transform_input=True: a fine-tune from them that
    leaves it False is refused by init_from; other models' weights need nothing."""
    import ml_collections

    from cnnjax.train.config import model_kwargs_config
    from cnnjax.train.init_from import check_pretrained_model_kwargs

    workdir = str(tmp_path / "pretrained")
    # The check reads the workdir's config, not the values: zeros of the model's shapes (no
    # compile of googlenet_bn's init, ~30 s on 2 CPUs)
    variables = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), jax.eval_shape(
        create_model("googlenet_bn").init, jax.random.key(0),
        jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)))
    tvw.write_warm_start_workdir(workdir, "googlenet_bn", variables,
                                 {"weights": "/data/googlenet.pth", "sha256": "cd" * 32})
    source_config = json.loads((tmp_path / "pretrained" / "config.json").read_text())
    assert source_config["model_kwargs"] == {"transform_input": True}
    config = ml_collections.ConfigDict({"model": "googlenet_bn",
                                        "model_kwargs": model_kwargs_config("googlenet_bn")})
    with pytest.raises(ValueError, match=r"init_from: workdir=.* is invalid; its converted "
                                         r"torchvision weights need model_kwargs\."
                                         r"transform_input=True .* this run has None; pass "
                                         r"--config.model_kwargs.transform_input=True\.$"):
        check_pretrained_model_kwargs(config, workdir, source_config)
    # A config file written for another model (lenet5_digits.py with --config.model=googlenet_bn)
    # has no such field, so that flag alone would fail: the message says how to declare it.
    other = ml_collections.ConfigDict({"model": "googlenet_bn",
                                       "model_kwargs": model_kwargs_config("lenet5")})
    with pytest.raises(ValueError, match=(
            r"pass --config.model_kwargs.transform_input=True in a config whose model_kwargs "
            r"declares googlenet_bn's fields \(this one's does not have 'transform_input': in the "
            r"config file, config.model_kwargs = model_kwargs_config\('googlenet_bn'\) from "
            r"cnnjax.train.config\)\.$")):
        check_pretrained_model_kwargs(other, workdir, source_config)
    config.model_kwargs.transform_input = True
    check_pretrained_model_kwargs(config, workdir, source_config)
    # A run of another model (a submodule warm start) is not this model's input: no check.
    check_pretrained_model_kwargs(ml_collections.ConfigDict({"model": "resnet18"}), workdir,
                                  source_config)
    # An interrupted conversion (summary.json is written last) is still known by its
    # config.json, and checked the same.
    (tmp_path / "pretrained" / "summary.json").unlink()
    config.model_kwargs.transform_input = None
    with pytest.raises(ValueError, match=r"need model_kwargs\.transform_input=True"):
        check_pretrained_model_kwargs(config, workdir, source_config)


@pytest.mark.parametrize("value, kind", [
    (np.array([None] * 64), "object"),
    (np.ones(64, np.complex64), "complex64"),
    (np.array(["1"] * 64), "<U1"),
])
def test_a_value_that_is_not_a_real_number_array_is_named(resnet18_sd, value, kind):
    """np.asarray(..., float32) would turn None into NaN and drop an imaginary part silently."""
    with pytest.raises(ValueError, match=rf"^torchvision_weights\('resnet18'\): "
                                         rf"bn1.running_var='array of dtype {kind}' is invalid; "
                                         r"expected real numbers"):
        tvw.convert_state_dict("resnet18", {**resnet18_sd, "bn1.running_var": value})


@pytest.mark.parametrize("name", [["resnet18"], {"resnet18": 1}])
def test_an_unhashable_model_name_is_named(resnet18_sd, name):
    with pytest.raises(ValueError, match=r"^torchvision_weights: model=.* is invalid; expected "
                                         r"one of \["):
        tvw.convert_state_dict(name, resnet18_sd)
