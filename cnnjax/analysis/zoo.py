"""The model-zoo comparison table and the generator of `docs/models.md`.

`zoo_table(names)` runs `cnnjax.analysis.summary` on every registered model (or on `names`) at its
native input (`model_info(name).input_shape`, batch 1, float32, `train=False`) and returns one dict
per model: parameters, MACs and FLOPs (conventions of `cnnjax.analysis.trace`), activation memory,
receptive field and the paper. Models are only traced, never compiled, so the whole zoo takes
seconds. `render_markdown(rows)` turns the rows into `docs/models.md`, including the lecture's
comparison (AlexNet, VGG, GoogLeNet, ResNet) whose prose lives here as a template around the
generated numbers, so regenerating keeps the text and the numbers consistent.

CLI:
    python -m cnnjax.analysis.zoo --output=docs/models.md        # write the page
    python -m cnnjax.analysis.zoo --output=docs/models.md --check  # exit 1 if it is stale
"""

from __future__ import annotations

import difflib
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from cnnjax.analysis.summary import Summary, summary
from cnnjax.utils.validation import invalid

DEFAULT_OUTPUT = os.path.join("docs", "models.md")
COMMAND = "python -m cnnjax.analysis.zoo --output=docs/models.md"
MIB = 1024**2

#: Models the comparison section is written about (it is left out if any is missing).
LECTURE_MODELS = ("alexnet", "zfnet", "vgg16", "vgg19", "googlenet", "resnet18", "resnet50",
                  "resnet152")

#: ILSVRC classification top-5 *test* errors (%) of the entries each paper reports (ensembles, as
#: submitted); published figures, quoted, not computed here.
PUBLISHED_TOP5 = {
    "alexnet": (15.3, "ILSVRC-2012, 7-CNN ensemble (Krizhevsky et al. 2012, abstract)"),
    "vgg16": (7.3, "ILSVRC-2014 submission, 7-net ensemble of VGG-16/19 variants "
                   "(Simonyan & Zisserman 2015, Sec. 4.5)"),
    "googlenet": (6.67, "ILSVRC-2014 winner, 7-model ensemble (Szegedy et al. 2015)"),
    "resnet152": (3.57, "ILSVRC-2015 winner, ensemble (He et al. 2016, abstract)"),
}

_UPPER_BOUND_NOTE = "upper bound"  # summary's wording when a transposed conv blurs the grid
_MISALIGNED_NOTE = "misaligned"


def _summarize(name: str) -> tuple[Summary, Any]:
    from cnnjax.models import create_model, model_info

    info = model_info(name)
    return summary(create_model(name), tuple(info.input_shape)), info


def zoo_row(name: str) -> dict[str, Any]:
    """Analyses one registered model at its native input; see `zoo_table` for the keys."""
    result, info = _summarize(name)
    totals = result.totals
    rows = result.rows
    fc = [r for r in rows if r.macs > 0 and len(r.output_shape) == 2]
    field = result.receptive_field
    largest = max(rows, key=lambda r: r.activation_bytes)
    return {
        "name": name,
        "input_shape": tuple(info.input_shape),
        "num_classes": info.num_classes,
        "output_shape": tuple(result.output_shapes[0]),
        "params": totals["params"],
        "macs": totals["macs"],
        "flops": totals["flops"],
        "activation_bytes": totals["activation_bytes"],
        "largest_activation_bytes": largest.activation_bytes,
        "largest_activation_shape": tuple(largest.output_shape),
        "weight_bytes": 4 * totals["params"],  # parameters are always float32
        "weight_layers": sum(1 for r in rows if r.macs > 0),
        "fc_params": sum(r.params for r in fc),
        "fc_macs": sum(r.macs for r in fc),
        "transposed_macs": sum(r.macs for r in rows if _is_transposed(r)),
        "transposed_flops": sum(r.flops for r in rows if _is_transposed(r)),
        "rf_size": None if field is None else tuple(field.size),
        "rf_jump": None if field is None else tuple(field.jump),
        "rf_start": None if field is None else tuple(field.start),
        "rf_upper_bound": any(_UPPER_BOUND_NOTE in n for n in result.notes),
        "rf_misaligned": any(_MISALIGNED_NOTE in n for n in result.notes),
        "notes": tuple(result.notes),
        "paper": info.paper,
        "extra": _extras(name, result),
    }


def _is_transposed(row: Any) -> bool:
    return row.type == "conv_transpose" or "Transpose" in row.type


def _extras(name: str, result: Summary) -> dict[str, int]:
    """Per-model figures the comparison prose quotes (read from named summary rows)."""
    if name != "googlenet":
        return {}
    reduce_row = result.row("inception3a/branch5x5_reduce")
    conv_row = result.row("inception3a/branch5x5")
    _, h, w, c_in = reduce_row.input_shape
    c_out = conv_row.output_shape[-1]
    c_mid = conv_row.input_shape[-1]
    kernel = conv_row.macs // (conv_row.output_shape[1] * conv_row.output_shape[2] * c_mid * c_out)
    return {
        "b5_in": c_in,
        "b5_reduce": reduce_row.output_shape[-1],
        "b5_out": c_out,
        "b5_hw": h,  # the branch keeps the resolution (SAME padding)
        "b5_macs": reduce_row.macs + conv_row.macs,
        "b5_macs_direct": h * w * c_in * c_out * kernel,
    }


def zoo_models() -> list[str]:
    """The models the page compares: the classifiers and the dense predictors (FCN); not the
    detectors, whose outputs are box sets."""
    from cnnjax.models import list_models

    return list_models() + list_models(task="segmentation")


def check_zoo_names(names: Iterable[str], owner: str = "zoo_table", field: str = "names"
                    ) -> list[str]:
    """`names` without repeats (a name given twice is one row), each a model the page compares
    (`zoo_models()`); errors name `owner` and `field` (the CLI's `--models`)."""
    from cnnjax.models import list_models

    if isinstance(names, str):
        raise invalid(owner, field, names, f"expected a list of model names, e.g. [{names!r}]")
    names = list(dict.fromkeys(names))
    if not names:
        raise invalid(owner, field, names, "expected at least one registered model name")
    detectors = [n for n in names if n in list_models(task="detection")]
    if detectors:  # their outputs are box sets, not a class map: the page's tables mislabel them
        raise invalid(owner, field, detectors, "expected classification or segmentation "
                      "models; the detectors are compared in docs/detection.md (a per-layer "
                      "table: python -m cnnjax.analysis.summary --model=<name>)")
    compared = zoo_models()
    unknown = [n for n in names if n not in compared]
    if unknown:
        close = difflib.get_close_matches(unknown[0], compared, n=3)
        hint = f"did you mean {close}? " if close else ""
        raise invalid(owner, field, unknown, f"{hint}expected names from {compared}")
    return names


def zoo_table(
    names: Iterable[str] | None = None, *, progress: Callable[[str, float], None] | None = None
) -> list[dict[str, Any]]:
    """One dict per model (all registered models if `names` is None), in the given order.

    Keys: `name`, `input_shape`, `num_classes`, `output_shape`, `params` (exact),
    `macs` and `flops` (batch 1; `cnnjax.analysis.trace` conventions), `activation_bytes` (sum of
    all layer outputs, the forward-pass size), `largest_activation_bytes`, `weight_bytes`,
    `weight_layers` (layers doing MACs), `fc_params`/`fc_macs` (fully connected layers),
    `transposed_macs`/`transposed_flops`, `rf_size`/`rf_jump`/`rf_start` (receptive field of the
    output), `rf_upper_bound`, `rf_misaligned`, `notes` (the analysis' notes), `paper` and `extra`
    (figures the comparison quotes). `progress(name, seconds)` is called after each model.
    """
    names = zoo_models() if names is None else check_zoo_names(names)
    rows = []
    for name in names:
        start = time.perf_counter()
        rows.append(zoo_row(name))
        if progress is not None:
            progress(name, time.perf_counter() - start)
    return rows


# ----------------------------------------------------------------------------------------------
# Markdown


def _si(n: float) -> str:
    """15.47 G, 416.5 K: four significant digits with a decimal prefix."""
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= factor:
            return f"{n / factor:.4g} {prefix}"
    return f"{n:.0f}"


def _mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB" if n >= 0.1 * MIB else f"{n / 1024:.1f} KiB"


def _num(v: float) -> str:
    return f"{int(v):,}" if float(v).is_integer() else f"{v:g}"


def _axes(values: Sequence[float] | None) -> str:
    if values is None:
        return "n/a"
    if len(set(values)) == 1:
        return _num(values[0])
    return "×".join(_num(v) for v in values)


def _shape(shape: Sequence[int]) -> str:
    return "×".join(str(s) for s in shape)


def _rf(row: dict[str, Any]) -> str:
    text = _axes(row["rf_size"])
    if row["rf_upper_bound"]:
        text = "≤ " + text
    if row["rf_misaligned"]:
        text += " †"
    return text


def _offset(row: dict[str, Any]) -> str:
    return _axes(row["rf_start"]) + (" †" if row["rf_misaligned"] else "")


def _group(row: dict[str, Any]) -> str:
    if len(row["output_shape"]) == 4:
        return "Dense prediction (segmentation)"
    if max(row["input_shape"][:2]) <= 64:
        return "Small-image classifiers"
    return "ImageNet classifiers"


_GROUP_ORDER = ("ImageNet classifiers", "Small-image classifiers",
                "Dense prediction (segmentation)")


def _natural_key(name: str) -> list[Any]:
    """Sorts resnet18 < resnet50 < resnet101 and fcn8s < fcn16s < fcn32s."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _references(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Numbers the distinct papers; registry entries that extend a citation with "; <detail>"
    share the paper's number."""
    refs: dict[str, int] = {}
    for row in rows:
        paper = _paper_key(row["paper"])
        if paper and paper not in refs:
            refs[paper] = len(refs) + 1
    return refs


def _paper_key(paper: str) -> str:
    return paper.split(";")[0].strip()


def _model_table(
    rows: Sequence[dict[str, Any]], refs: dict[str, int], *, offset: bool = False
) -> list[str]:
    """One markdown table; `offset` adds the output field's centre offset (dense prediction)."""
    extra = " Offset |" if offset else ""
    out = [f"| Model | Input | Classes | Params | MACs | FLOPs | Activations | RF |{extra} Paper |",
           "|---|---|--:|--:|--:|--:|--:|--:|" + ("--:|" if offset else "") + "---|"]
    for r in rows:
        paper = _paper_key(r["paper"])
        cite = f"[{refs[paper]}]" if paper else ""
        detail = r["paper"][len(paper):].lstrip("; ").strip()
        if detail:
            cite += f"; {detail}"
        out.append(
            f"| `{r['name']}` | {_shape(r['input_shape'])} | {r['num_classes']:,} | "
            f"{r['params']:,} | {_si(r['macs'])} | {_si(r['flops'])} | "
            f"{_mib(r['activation_bytes'])} | {_rf(r)} |"
            + (f" {_offset(r)} |" if offset else "") + f" {cite} |"
        )
    return out


_INTRO = """\
# Model zoo

<!-- Generated by cnnjax/analysis/zoo.py: `{command}`.
Edit the template there, not this file; `--check` fails when this page is stale. -->

{which} ({n_models}
models; the detectors, `list_models(task="detection")`, are in docs/detection.md), analysed by
`cnnjax.analysis.summary` at its native input size (`model_info(name).input_shape`), batch 1,
float32, inference mode (`train=False`), with its default number of classes. Nothing is
computed or compiled: the models are traced abstractly. Per-layer tables:
`python -m cnnjax.analysis.summary --model=<name>`.

Columns:
- **Params**: exact size of the `params` collection (BatchNorm running statistics are not
  parameters).
- **MACs**: multiply-accumulates of the convolutions and fully connected layers, counted densely
  (taps that fall on zero padding included), i.e. the number papers and torchvision quote as
  "FLOPs"/"GFLOPS". A transposed convolution counts each input element times the whole kernel
  (the MACs of the forward convolution it transposes, fvcore's and `torch.utils.flop_counter`'s
  count), not the zeros inserted between inputs, nor, at stride 1, the full padding it is lowered
  with (DCGAN's first layer, 1x1x100 -> 4x4x512, reads 0.82 M MACs at any stride).
- **FLOPs**: floating-point operations as XLA's cost analysis counts them (before optimisation): 2
  per multiply-add that touches real data, plus 1 per element for bias adds, activations,
  BatchNorm arithmetic and pooling comparisons; transcendental functions (exp, rsqrt, tanh) are
  not counted. So FLOPs are about 2 × MACs for plain convolutional networks (for a transposed
  convolution, 2 × MACs less the taps scattered outside the cropped output).
- **Activations**: bytes of all layer outputs of one forward pass (float32), i.e. the
  "forward-pass size": the sum over the rows of the summary, not the peak memory of a compiled
  program (XLA fuses and frees buffers), and without the weights (4 bytes per parameter).
- **RF**: receptive-field side, in input pixels, of one output unit (Araujo, Norris & Sim, Distill
  2019): the theoretical field, which counts padding and can therefore exceed the input. "≤" marks
  an upper bound (after a transposed convolution the sampling grid is no longer uniform), "†" a
  merge of misaligned paths; both are explained under *Receptive-field notes*.
- **Offset** (dense prediction only): input coordinate on which output pixel 0's field is
  centred; output pixel i is centred on input pixel i + offset, so 0 means the score map is
  aligned with the image and -15.5 that it is shifted by 15.5 pixels up and left. With "†" the
  fused paths are centred differently and the value is the centre of their union. After an
  upsampling by s (the FCNs' bilinear or transposed layers) the placement holds on average over
  the s phases: one output pixel's field can sit up to (s - 1) / 2 pixels off it (15 in FCN-32s).
"""


_COMPARISON = """\
## The lecture's comparison

The four architectures a CNN lecture compares, in this zoo's numbers (224×224 inputs, batch 1).
*FC share* is the fraction of parameters in fully connected layers, *weight layers* counts the
layers that do MACs (convolutions, projection shortcuts included, and FC layers), *weights +
activations* is the float32 inference footprint of one image. The error rates are the published
ILSVRC results of each family's challenge entry (ensembles, not these single models); sources
below the text.

{table}

**AlexNet: few FLOPs, many parameters.** AlexNet does {a_macs}, the fewest of the ImageNet
classifiers here and {v16_over_a_macs} fewer than VGG-16, yet it holds {a_params} parameters,
{a_over_g_params} as many as GoogLeNet. {a_fc_share} of them sit in the three fully connected
layers, which do only {a_fc_mac_share} of the MACs: the convolutions do the work, the FC layers
hold the weights, which gives AlexNet the most parameters per MAC of the ImageNet classifiers.
ZFNet keeps the layout with a finer first layer and wider conv3-5: {z_params}, {z_macs}.

**VGG: the most memory and compute.** `{most_macs}` does {most_macs_macs}, the most of the
ImageNet classifiers here (VGG-16: {v16_macs}, {v16_over_a_macs} AlexNet's). Stacking 3×3
convolutions at full resolution is what costs: VGG-16's largest maps ({v16_big_shape}) take
{v16_big} each, and its {v16_params} parameters ({v16_weights} of float32, {v16_fc_share} of them
in the FC layers) plus {v16_act} of activations make {v16_footprint}; the largest inference
footprint of the ImageNet classifiers is `{most_footprint}`'s ({most_footprint_bytes}). Counting
activations alone, the deepest BatchNorm networks sum more (`{most_act}`: {most_act_bytes})
because each of their hundreds of layer outputs is counted, but those maps are small (largest:
{most_act_big}).

**GoogLeNet: efficient.** {g_params} parameters, {a_over_g_params} fewer than AlexNet and
{v16_over_g_params} fewer than VGG-16, for {g_macs}, {v16_over_g_macs} fewer than VGG-16, at a
lower published error ({g_err} against VGG's {v_err}). Two ideas do it. The 1×1 bottlenecks: in
inception 3a the 5×5 branch first reduces {b5_in} channels to {b5_reduce}, so it costs
{b5_macs} MACs instead of the {b5_macs_direct} of a direct 5×5 convolution to {b5_out} channels on
the {b5_hw}×{b5_hw} map. And global average pooling replaces the FC stack: the single classifier
layer holds {g_fc_share} of the parameters (AlexNet's FC layers: {a_fc_share}).{g_fewest}

**ResNet: simple and accurate.** One block type repeated in four stages (3×3 convolutions with
BatchNorm; resolution halved and channels doubled per stage, as in VGG; 1×1 bottlenecks from
ResNet-50 on, as in GoogLeNet), an identity shortcut around every block, no LRN, no auxiliary
classifiers, and a single FC layer ({r50_fc_share} of ResNet-50's parameters). The shortcuts let
depth grow: ResNet-152 has {r152_layers} weight layers against VGG-19's {v19_layers}, yet does
{r152_macs}, {v19_over_r152_macs} fewer than VGG-19, with {r152_params} parameters. ResNet-50
({r50_params}, {r50_macs}) and ResNet-18 ({r18_params}, {r18_macs}) are the cheaper members. A
ResNet ensemble won ILSVRC 2015 with {r_err} top-5 error, {r_over_g_err} of GoogLeNet's.

Published errors (top-5, ILSVRC test set, as entered in the challenge):
"""


def _check_claims(by_name: dict[str, dict[str, Any]], imagenet: list[dict[str, Any]]) -> None:
    """Raises if a claim of the comparison's prose is false for the current numbers."""
    a, g, v16, r152 = (by_name[n] for n in ("alexnet", "googlenet", "vgg16", "resnet152"))
    fewest_macs = min(imagenet, key=lambda r: r["macs"])["name"]
    most_per_mac = max(imagenet, key=lambda r: r["params"] / r["macs"])["name"]
    most_macs = max(imagenet, key=lambda r: r["macs"])["name"]
    most_footprint = max(imagenet, key=_footprint)["name"]
    claims = {
        "AlexNet does the fewest MACs of the ImageNet classifiers":
            fewest_macs.startswith("alexnet"),
        "AlexNet has the most parameters per MAC of the ImageNet classifiers":
            most_per_mac.startswith("alexnet"),
        "most of AlexNet's parameters are in its FC layers": a["fc_params"] > a["params"] / 2,
        "a VGG does the most MACs of the ImageNet classifiers": most_macs.startswith("vgg"),
        "a VGG has the largest weights + activations footprint of the ImageNet classifiers":
            most_footprint.startswith("vgg"),
        "GoogLeNet has fewer parameters than AlexNet and fewer MACs than VGG-16":
            g["params"] < a["params"] and g["macs"] < v16["macs"],
        "ResNet-152 does fewer MACs than VGG-16": r152["macs"] < v16["macs"],
    }
    failed = [claim for claim, holds in claims.items() if not holds]
    if failed:
        raise ValueError(
            "render_markdown: the comparison's prose no longer matches the numbers; false: "
            + "; ".join(failed) + ". Update the template in cnnjax/analysis/zoo.py."
        )


def _footprint(r: dict[str, Any]) -> int:
    return r["weight_bytes"] + r["activation_bytes"]


def _millions(n: float) -> str:
    return f"{n / 1e6:.1f} M"


def _gmacs(r: dict[str, Any]) -> str:
    return f"{r['macs'] / 1e9:.2f} GMACs"


def _pct(x: float, y: float) -> str:
    return f"{100 * x / y:.0f}%"


def _ratio(x: float, y: float) -> str:
    return f"{x / y:.1f}×" if x / y < 10 else f"{x / y:.0f}×"


def _comparison(by_name: dict[str, dict[str, Any]], imagenet: list[dict[str, Any]]) -> list[str]:
    """The lecture's comparison: `_COMPARISON` filled with the generated numbers."""
    _check_claims(by_name, imagenet)
    a, z, v16, v19, g, r18, r50, r152 = (by_name[n] for n in LECTURE_MODELS)
    table = ["| Model | Params | MACs | FC share of params | Weight layers | Weights + "
             "activations | Largest activation | ILSVRC top-5 error (published) |",
             "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in (a, z, v16, v19, g, r18, r50, r152):
        err = PUBLISHED_TOP5.get(r["name"])
        table.append(
            f"| `{r['name']}` | {_millions(r['params'])} | {_si(r['macs'])} | "
            f"{_pct(r['fc_params'], r['params'])} | {r['weight_layers']} | "
            f"{_mib(_footprint(r))} | {_mib(r['largest_activation_bytes'])} | "
            f"{'—' if err is None else f'{err[0]}%'} |"
        )
    most_macs = max(imagenet, key=lambda r: r["macs"])
    most_footprint = max(imagenet, key=_footprint)
    most_act = max(imagenet, key=lambda r: r["activation_bytes"])
    fewest_params = min(imagenet, key=lambda r: r["params"])
    ex = g["extra"]
    values = {
        "table": "\n".join(table),
        "a_macs": _gmacs(a), "a_params": _millions(a["params"]),
        "a_over_g_params": _ratio(a["params"], g["params"]),
        "a_fc_share": _pct(a["fc_params"], a["params"]),
        "a_fc_mac_share": _pct(a["fc_macs"], a["macs"]),
        "z_params": _millions(z["params"]), "z_macs": _gmacs(z),
        "most_macs": most_macs["name"], "most_macs_macs": _gmacs(most_macs),
        "v16_macs": _gmacs(v16), "v16_over_a_macs": _ratio(v16["macs"], a["macs"]),
        "v16_big_shape": _shape(v16["largest_activation_shape"][1:]),
        "v16_big": _mib(v16["largest_activation_bytes"]),
        "v16_params": _millions(v16["params"]), "v16_weights": _mib(v16["weight_bytes"]),
        "v16_fc_share": _pct(v16["fc_params"], v16["params"]),
        "v16_act": _mib(v16["activation_bytes"]), "v16_footprint": _mib(_footprint(v16)),
        "most_footprint": most_footprint["name"],
        "most_footprint_bytes": _mib(_footprint(most_footprint)),
        "most_act": most_act["name"], "most_act_bytes": _mib(most_act["activation_bytes"]),
        "most_act_big": _mib(most_act["largest_activation_bytes"]),
        "g_params": _millions(g["params"]), "g_macs": _gmacs(g),
        "v16_over_g_params": _ratio(v16["params"], g["params"]),
        "v16_over_g_macs": _ratio(v16["macs"], g["macs"]),
        "g_err": f"{PUBLISHED_TOP5['googlenet'][0]}%", "v_err": f"{PUBLISHED_TOP5['vgg16'][0]}%",
        "b5_in": ex["b5_in"], "b5_reduce": ex["b5_reduce"], "b5_out": ex["b5_out"],
        "b5_hw": ex["b5_hw"], "b5_macs": _si(ex["b5_macs"]),
        "b5_macs_direct": _si(ex["b5_macs_direct"]),
        "g_fc_share": _pct(g["fc_params"], g["params"]),
        "g_fewest": "" if fewest_params is g else (
            f" (Of the ImageNet classifiers, `{fewest_params['name']}` has even fewer "
            f"parameters: {_millions(fewest_params['params'])}.)"),
        "r50_fc_share": _pct(r50["fc_params"], r50["params"]),
        "r152_layers": r152["weight_layers"], "v19_layers": v19["weight_layers"],
        "r152_macs": _gmacs(r152), "r152_params": _millions(r152["params"]),
        "v19_over_r152_macs": _ratio(v19["macs"], r152["macs"]),
        "r50_params": _millions(r50["params"]), "r50_macs": _gmacs(r50),
        "r18_params": _millions(r18["params"]), "r18_macs": _gmacs(r18),
        "r_err": f"{PUBLISHED_TOP5['resnet152'][0]}%",
        "r_over_g_err": _pct(PUBLISHED_TOP5["resnet152"][0], PUBLISHED_TOP5["googlenet"][0]),
    }
    lines = _COMPARISON.format(**values).splitlines()
    for name, (err, source) in PUBLISHED_TOP5.items():
        lines.append(f"- `{name}`: {err}% — {source}.")
    return lines


def render_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The `docs/models.md` page for `rows` (from `zoo_table`).

    The comparison section needs the `LECTURE_MODELS` and is left out if one is missing. Raises a
    ValueError if the comparison's claims no longer hold for the numbers.
    """
    if not rows:
        raise invalid("render_markdown", "rows", rows, "expected the rows of zoo_table()")
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: _natural_key(r["name"])):
        groups.setdefault(_group(row), []).append(row)
    ordered = [title for title in _GROUP_ORDER if title in groups]
    refs = _references([r for title in ordered for r in groups[title]])
    which = ("Every classification and segmentation model registered in `cnnjax.models`"
             if {r["name"] for r in rows} == set(zoo_models()) else
             "A selection of the classification and segmentation models in `cnnjax.models`")
    lines = _INTRO.format(command=COMMAND, which=which, n_models=len(rows)).splitlines()
    for title in ordered:
        dense = title == _GROUP_ORDER[2]
        lines += ["", f"## {title}", "", *_model_table(groups[title], refs, offset=dense)]
    by_name = {r["name"]: r for r in rows}
    if all(n in by_name for n in LECTURE_MODELS):
        lines += ["", *_comparison(by_name, groups["ImageNet classifiers"])]
    transposed = [r for r in rows if r["transposed_macs"] > 0]
    if transposed:
        lines += ["", "## Transposed convolutions", ""]
        lines.append(
            "MACs count each input element of a transposed convolution times the whole kernel "
            "(not the zeros inserted between inputs); FLOPs count XLA's multiply-adds that land "
            "inside the cropped output. The upsampling layers' share:"
        )
        lines.append("")
        for r in transposed:
            lines.append(
                f"- `{r['name']}`: {_si(r['transposed_macs'])} MACs of {_si(r['macs'])}, "
                f"{_si(r['transposed_flops'])} FLOPs of {_si(r['flops'])}."
            )
    noted = [r for r in rows if r["notes"]]
    if noted:
        lines += ["", "## Receptive-field notes", ""]
        lines.append(
            "What `summary` reported while propagating receptive fields. A transposed "
            "convolution makes the sampling grid non-uniform, so later sizes are upper bounds "
            "(measured by the gradient's support on a 704-row input, with average pools for "
            "max pools and positive weights: `fcn32s_vgg16` and `fcn16s_vgg16` see exactly "
            "436 and 468 rows; `fcn8s_vgg16` 468, under its bound of 500). "
            "A misaligned merge means the summed maps' pixel centres differ by the given "
            "`starts` offset (in input pixels) at the given `jumps` (stride): one path is "
            "shifted against the other."
        )
        for r in noted:
            lines += ["", f"`{r['name']}`:", ""]
            lines += [f"- {note}" for note in r["notes"]]
    lines += ["", "## References", ""]
    lines += [f"{k}. {paper}" for paper, k in refs.items()]
    return "\n".join(lines) + "\n"


def is_stale(path: str | os.PathLike, text: str) -> bool:
    """Whether the file at `path` differs from `text` (a missing file is stale)."""
    if not os.path.exists(path):
        return True
    with open(path, encoding="utf-8") as f:
        return f.read() != text


# ----------------------------------------------------------------------------------------------
# Command line


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("output", DEFAULT_OUTPUT, "Markdown file to write (or to --check).")
    flags.DEFINE_bool("check", False, "Do not write; exit 1 if --output differs from what would "
                      "be generated.")
    flags.DEFINE_list("models", None, "Only these registered models (default: all).")


def main(argv: Sequence[str]) -> None:
    """Writes (or with --check verifies) the model-zoo page; bad input, or an `--output` it
    cannot write, ends the command with one `error: ...` line."""
    from absl import flags, logging

    from cnnjax.utils.cli import one_line_errors, start_command
    from cnnjax.utils.files import atomic_write, check_output_file, make_parent_dir

    start_command(list(argv))
    f = flags.FLAGS
    # COMMAND for the default; a selection's page is regenerated for the same selection
    regenerate = (f"python -m cnnjax.analysis.zoo --output={f.output}"
                  + (f" --models={','.join(f.models)}" if f.models else ""))
    with one_line_errors():
        # before the tracing: a directory, or a file in the way of its folder, is reported now
        if not f.check:
            check_output_file(f.output, "--output", "--output's folder")
        elif not os.path.isfile(f.output):
            raise ValueError(f"--output={f.output!r} is invalid; --check compares an existing "
                             f"file, and there is none: write it with `{regenerate}` first")
        if f.models is not None:
            check_zoo_names(f.models, "zoo", "--models")
        start = time.perf_counter()
        rows = zoo_table(f.models,
                         progress=lambda n, s: logging.info("%s: traced in %.2f s", n, s))
        text = render_markdown(rows)
        print(f"analysed {len(rows)} models in {time.perf_counter() - start:.1f} s")
        if f.check:
            if is_stale(f.output, text):
                print(f"{f.output} is stale; regenerate it with `{regenerate}`.")
                raise SystemExit(1)
            print(f"{f.output} is up to date.")
            return
        atomic_write(make_parent_dir(f.output), text)
    print(f"wrote {f.output} ({math.ceil(len(text) / 1024)} KiB)")


if __name__ == "__main__":
    from absl import app

    from cnnjax.utils.cli import parse_flags

    _define_flags()
    app.run(main, flags_parser=parse_flags)
