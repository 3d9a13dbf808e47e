"""Per-layer summary of a Flax CNN: shapes, parameters, MACs/FLOPs, memory and receptive fields.

`summary(model, input_shape)` traces `model.apply` to a jaxpr (see `cnnjax.analysis.trace`), so
it sees layers written as plain functions (`nn.max_pool`, `jnp.pad`, a reshape) as well as Flax
modules. Rows, in execution order:
- one per module call containing at most one convolution/dense/pooling op (a `Conv`, `Dense`,
  `BatchNorm`, LRN, a conv+BN block...) or calling no other module (a layer written in lax,
  e.g. `TiledConv2D`), with its parameters, FLOPs and output (a patch extraction,
  `lax.conv_general_dilated_patches`, is a gather and no convolution here);
- one per structural op outside such modules: convolution, dot product, pooling, pad, flatten,
  concatenation, reduction (global pooling), slicing, and every elementwise op that merges two
  paths (a residual `add`);
- elementwise ops with a single input (ReLU, dropout, scaling) are folded into the row that
  produced their input.

Work whose result the call discards (GoogLeNet's auxiliary heads with `train=False`) is dead
code, which XLA removes: it has no rows, and its parameters count only in the total (a note says
how many).

Columns: `params` (count of the `params` collection, each shared parameter once), `macs` and
`flops` (conventions in `cnnjax.analysis.trace`: FLOPs follow XLA's cost analysis, MACs are the
dense textbook count), `activation_bytes` (bytes of the row's output tensors: every value it
passes on, e.g. all parts of a split; the table shows the first shape and "(+n)") and the receptive
field (size, jump, start) of the row's output on the network input (`receptive_field.py`).
Pooling counts `window - 1` adds (or comparisons) per output, plus one division per output for
an average: adaptive average pooling whose bins tile the map counts as `avg_pool2d` of the same
windows (its separable sums add as many), 1x1 bins (the identity) count 0 as in XLA, and a
global average the same as a 1-bin adaptive one (`H*W - 1` adds and one division per channel).
These are FLOPs, not MACs: pooling has no MACs. Arithmetic on constants only (e.g. `jnp.take`'s
index clamping in adaptive pooling) costs no FLOPs, as XLA folds it at compile time. XLA's count
can still differ where its own rewrites change the work: XLA:CPU splits a reduction over more
than 32 elements into a padded 32-wide reduce-window plus a small reduce and counts the padding
(SPP level 3 on 224x224x64, 75-76 element bins: 3.27M FLOPs here, 4.14M in XLA), and it folds an
explicit zero pad into the next conv.

CLI: `python -m cnnjax.analysis.summary --model=alexnet --input_shape=224,224,3 [--csv=out.csv]`.
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import io
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from cnnjax.analysis.receptive_field import (
    CUMULATIVE,
    ELEMENTWISE,
    REDUCTIONS,
    WINDOW_REDUCTIONS,
    Info,
    ReceptiveField,
    input_info,
    output_info,
    propagate,
    to_receptive_field,
    with_counts,
)
from cnnjax.analysis.trace import Trace, init_shapes, is_prng_key, trace_model
from cnnjax.utils.files import make_parent_dir
from cnnjax.utils.validation import (
    check_float_dtype,
    check_positive_int,
    checked_input_shape,
    invalid,
)

ANCHORS = frozenset({"conv_general_dilated", "dot_general", *WINDOW_REDUCTIONS})
STRUCTURAL = frozenset(
    {
        *ANCHORS,
        *REDUCTIONS,
        *CUMULATIVE,
        "pad", "concatenate", "slice", "split", "rev", "gather", "dynamic_slice",
        "dynamic_update_slice", "scatter", "scatter-add", "scatter_add", "sort", "top_k",
        "cond", "while", "scan",
    }
)
_OP_NAMES = {
    "conv_general_dilated": "conv",
    "dot_general": "dot_general",
    "reduce_window_max": "max_pool",
    "reduce_window_min": "min_pool",
    "reduce_window_sum": "sum_pool",
    "reduce_window": "window_reduce",
}


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One row of the summary table; `output_shape` is the first of `output_shapes` (a split has
    several, and `activation_bytes` covers them all)."""

    name: str
    type: str
    input_shapes: tuple[tuple[int, ...], ...]
    output_shape: tuple[int, ...]
    params: int
    macs: int
    flops: int
    activation_bytes: int
    field: ReceptiveField
    output_shapes: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if not self.output_shapes:  # a row built by hand with one output
            object.__setattr__(self, "output_shapes", (self.output_shape,))

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The first input's shape (a merge has several; see `input_shapes`)."""
        return self.input_shapes[0] if self.input_shapes else ()


def _fmt_num(v: float) -> str:
    """`v` in full (a field start of 1,999.5, not 2000; 19,999.5, not 2e+04), rounded to 4
    decimals only where it has more (a jump of 1/3 after a 3x upsampling)."""
    if float(v).is_integer():
        return f"{int(v):,}"
    return f"{v:,}" if round(v, 4) == v else f"{v:,.4f}"


def _fmt_axes(values: Sequence[float]) -> str:
    if len(set(values)) == 1:
        return _fmt_num(values[0])
    return "x".join(_fmt_num(v) for v in values)


def _fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape) if shape else "scalar"


def _fmt_shapes(shapes: Sequence[Sequence[int]]) -> str:
    """The first shape, and how many more there are (a merge's inputs, a split's outputs)."""
    extra = f" (+{len(shapes) - 1})" if len(shapes) > 1 else ""
    return (_fmt_shape(shapes[0]) if shapes else _fmt_shape(())) + extra


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@dataclasses.dataclass
class Summary:
    """Result of `summary`: `rows`, `totals`, the final `receptive_field` and analysis `notes`."""

    rows: list[LayerRow]
    input_shape: tuple[int, ...]
    output_shapes: list[tuple[int, ...]]
    receptive_field: ReceptiveField | None
    total_params: int
    notes: list[str]

    def row(self, name: str) -> LayerRow:
        """The row called `name` (e.g. "block1/conv_a")."""
        for r in self.rows:
            if r.name == name:
                return r
        raise invalid("Summary.row", "name", name, f"expected one of {[r.name for r in self.rows]}")

    @property
    def totals(self) -> dict[str, int]:
        """Totals: `params` (all parameters of the model), `macs`, `flops` and `activation_bytes`
        (sum of the rows' output tensors, the "forward pass size"; not the peak memory)."""
        return {
            "params": self.total_params,
            "macs": sum(r.macs for r in self.rows),
            "flops": sum(r.flops for r in self.rows),
            "activation_bytes": sum(r.activation_bytes for r in self.rows),
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (JSON-serializable)."""
        return {
            "input_shape": list(self.input_shape),
            "output_shapes": [list(s) for s in self.output_shapes],
            "rows": [_row_dict(r) for r in self.rows],
            "totals": self.totals,
            "receptive_field": None if self.receptive_field is None else {
                "size": list(self.receptive_field.size),
                "jump": list(self.receptive_field.jump),
                "start": list(self.receptive_field.start),
            },
            "notes": list(self.notes),
        }

    def to_csv(self, path_or_buffer: str | os.PathLike | io.TextIOBase) -> None:
        """Writes one CSV line per row (receptive field split per spatial axis); a path's
        missing folder is created (the CLI's `--csv` check accepts one still to be made)."""
        rows = [_row_csv(r) for r in self.rows]
        fields = list(rows[0]) if rows else ["name"]
        if isinstance(path_or_buffer, str | os.PathLike):
            with open(make_parent_dir(path_or_buffer), "w", newline="") as f:
                _write_csv(f, fields, rows)
        else:
            _write_csv(path_or_buffer, fields, rows)

    def __str__(self) -> str:
        header = ["Layer", "Type", "Input", "Output", "Params", "MACs", "FLOPs", "Act. memory",
                  "RF size", "RF jump", "RF start"]
        lines = []
        for r in self.rows:
            lines.append([
                r.name, r.type, _fmt_shapes(r.input_shapes), _fmt_shapes(r.output_shapes),
                f"{r.params:,}", f"{r.macs:,}", f"{r.flops:,}", _fmt_bytes(r.activation_bytes),
                _fmt_axes(r.field.size), _fmt_axes(r.field.jump), _fmt_axes(r.field.start),
            ])
        t = self.totals
        total = ["Total", "", _fmt_shape(self.input_shape), "", f"{t['params']:,}",
                 f"{t['macs']:,}", f"{t['flops']:,}", _fmt_bytes(t["activation_bytes"]), "", "", ""]
        widths = [max(len(row[i]) for row in [header, total, *lines]) for i in range(len(header))]
        numeric = set(range(4, 11))

        def render(row: list[str]) -> str:
            cells = [c.rjust(w) if i in numeric else c.ljust(w)
                     for i, (c, w) in enumerate(zip(row, widths, strict=True))]
            return "  ".join(cells).rstrip()

        rule = "-" * len(render(header))
        out = [render(header), rule, *(render(row) for row in lines), rule, render(total)]
        out.append(
            "MACs: dense multiply-accumulates of conv/dense layers (padding taps included). "
            "FLOPs: XLA cost-analysis count (2 per multiply-add on real data, 1 per elementwise "
            "op, window - 1 per pooled output, in - out per reduction; transcendentals excluded)."
        )
        out.append(
            "RF: receptive field size, jump (effective stride) and start (centre of the first "
            "field; input pixel i is centred at i), Araujo et al. 2019."
        )
        out.extend(f"note: {n}" for n in self.notes)
        return "\n".join(out)


def _row_dict(r: LayerRow) -> dict[str, Any]:
    return {
        "name": r.name,
        "type": r.type,
        "input_shapes": [list(s) for s in r.input_shapes],
        "output_shape": list(r.output_shape),
        "output_shapes": [list(s) for s in r.output_shapes],
        "params": r.params,
        "macs": r.macs,
        "flops": r.flops,
        "activation_bytes": r.activation_bytes,
        "rf_size": list(r.field.size),
        "rf_jump": list(r.field.jump),
        "rf_start": list(r.field.start),
    }


def _row_csv(r: LayerRow) -> dict[str, Any]:
    out = {
        "name": r.name,
        "type": r.type,
        "input_shape": _fmt_shape(r.input_shape),
        "output_shape": _fmt_shape(r.output_shape),
        "params": r.params,
        "macs": r.macs,
        "flops": r.flops,
        "activation_bytes": r.activation_bytes,
    }
    axes = "hw" if len(r.field.size) == 2 else [str(i) for i in range(len(r.field.size))]
    for key, values in (("rf_size", r.field.size), ("rf_jump", r.field.jump),
                        ("rf_start", r.field.start)):
        for axis, v in zip(axes, values, strict=True):
            out[f"{key}_{axis}"] = v
    return out


def _write_csv(f: Any, fields: list[str], rows: list[dict[str, Any]]) -> None:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)


@dataclasses.dataclass
class _RowBuilder:
    key: Any
    name: str  # module path, or the owner's path for op rows (numbered when finished)
    type: str
    named: bool
    eqns: list[int] = dataclasses.field(default_factory=list)
    inputs: list[int] = dataclasses.field(default_factory=list)
    output: int = -1
    params: int = 0
    flops: int = 0
    macs: int = 0


class _Grouper:
    """Assigns the traced equations to rows and propagates receptive fields."""

    def __init__(self, trace: Trace, n_spatial: int):
        self.t = trace
        self.notes: list[str] = []
        self.info: dict[int, Info | None] = {
            trace.input_id: with_counts(input_info(n_spatial), trace.avals[trace.input_id].shape)
        }
        self.producer: dict[int, Any] = {trace.input_id: None}
        self.rows: dict[Any, _RowBuilder] = {}
        self.deps: dict[int, tuple[frozenset[int], frozenset[int]]] = {
            vid: (frozenset([vid]), frozenset()) for vid in trace.param_leaves
        }
        self.claimed_params: set[int] = set()
        self.claimed_eqns: set[int] = set()
        self.call_counts: dict[tuple[str, ...], int] = {}
        self.row_of: dict[int, Any] = {}  # equation index -> key of its row
        self.atomic = self._atomic_calls()

    def _atomic_calls(self) -> set[int]:
        """Module calls with at most one anchor op, or with several but no submodule calls (a
        layer written in lax, e.g. `TiledConv2D`), and jitted functions with a structural op and
        at most one anchor, become single rows."""
        act = self._activation_eqns()
        anchors: dict[int, int] = {}
        structural: dict[int, int] = {}
        for e in self.t.eqns:
            if e.index not in act:
                continue
            for c in set(e.calls):
                anchors[c] = anchors.get(c, 0) + (e.prim in ANCHORS and not e.patches)
                structural[c] = structural.get(c, 0) + (e.prim in STRUCTURAL)
        parents = self._calls_with_submodules()
        atomic = set()
        for call in self.t.calls:
            c = call.index
            if c not in anchors:
                continue
            if call.path is None:
                if structural[c] and anchors[c] <= 1:
                    atomic.add(c)
            elif call.path != () and (anchors[c] <= 1 or c not in parents):
                atomic.add(c)
        return atomic

    def _calls_with_submodules(self) -> set[int]:
        """Module calls inside which another module (a different path) is called."""
        parents = set()
        for e in self.t.eqns:
            for k, c in enumerate(e.calls):
                path = self.t.calls[c].path
                if any(self.t.calls[d].path not in (None, path) for d in e.calls[k + 1:]):
                    parents.add(c)
        return parents

    def _activation_eqns(self) -> set[int]:
        live = {self.t.input_id}
        out = set()
        for e in self.t.eqns:
            if any(i in live for i in e.inputs):
                out.add(e.index)
                live.update(e.outputs)
        return out

    def _owner_path(self, calls: Sequence[int]) -> str:
        for c in reversed(calls):
            path = self.t.calls[c].path
            if path is not None:
                return "/".join(path)
        return ""

    def _new_row(self, key: Any, name: str, type_: str, *, named: bool) -> _RowBuilder:
        row = _RowBuilder(key, name, type_, named=named)
        self.rows[key] = row
        return row

    def _op_row(self, e: Any, op: str) -> _RowBuilder:
        return self._new_row(("op", e.index), self._owner_path(e.calls), op, named=False)

    def _call_row(self, c: int) -> _RowBuilder:
        if ("call", c) in self.rows:
            return self.rows[("call", c)]
        call = self.t.calls[c]
        if call.path is None:  # a jitted function (jnp.pad...): named like an op
            e = next(e for e in self.t.eqns if c in e.calls)
            owner = self._owner_path(e.calls[: e.calls.index(c)])
            return self._new_row(("call", c), owner, call.type_name.lstrip("_") or "jit",
                                 named=False)
        name = "/".join(call.path)
        n = self.call_counts.get(call.path, 0)
        self.call_counts[call.path] = n + 1
        if n:
            name += f" (call {n + 1})"
        return self._new_row(("call", c), name, call.type_name, named=True)

    def _layout_changed(self, before: Info, after: Info) -> bool:
        return any(
            (b.axis is not None and a.axis is None) or (b.exclusive and not a.exclusive)
            for b, a in zip(before, after, strict=True)
        )

    def run(self) -> list[LayerRow]:
        t = self.t
        for e in t.eqns:
            in_infos = [self.info.get(i) for i in e.inputs]
            if e.prim == "optimization_barrier":  # each operand passes through, as it was
                for i, o in zip(e.inputs, e.outputs, strict=True):
                    self.info[o] = self.info.get(i)
                    for table in (self.deps, self.producer):
                        if i in table:
                            table[o] = table[i]
                continue
            if (e.prim == "convert_element_type" and in_infos[0] is not None
                    and self.producer.get(e.inputs[0]) is None):
                # A cast of the model's input is no layer (a bfloat16 pool's widening, a float32
                # image into a bfloat16 conv): it passes the input to the row that reads it, as
                # `_before_widening` does a row's output; as its own row it charged the input's
                # bytes again (in float32) to a phantom layer.
                self.info[e.outputs[0]] = in_infos[0]
                continue
            if all(i is None for i in in_infos):
                deps_p, deps_e = frozenset(), frozenset([e.index])
                for i in e.inputs:
                    p, q = self.deps.get(i, (frozenset(), frozenset()))
                    deps_p, deps_e = deps_p | p, deps_e | q
                for o in e.outputs:
                    self.info[o] = None
                    self.deps[o] = (deps_p, deps_e)
                continue
            where = f"{self._owner_path(e.calls) or 'top level'} ({e.prim})"
            out_infos = propagate(
                e.prim, e.params, in_infos, [t.avals[i].shape for i in e.inputs],
                [t.avals[o].shape for o in e.outputs], self.notes, where,
            )
            row = self._row_for(e, in_infos, out_infos)
            self._add(row, e)
            for o, info in zip(e.outputs, out_infos, strict=True):
                self.info[o] = info
                self.producer[o] = row.key
        counts: dict[tuple[str, str], int] = {}
        for r in self.rows.values():
            if not r.named:
                k = counts.get((r.name, r.type), 0)
                counts[(r.name, r.type)] = k + 1
                r.name = f"{r.name}/{r.type}_{k}" if r.name else f"{r.type}_{k}"
        leaving = self._values_leaving_rows()
        return [self._finish(r, leaving) for r in self.rows.values()]

    def _values_leaving_rows(self) -> set[int]:
        """Values a row produces that another row reads or the model returns: its outputs."""
        leaving = {o for o in self.t.output_ids if self.producer.get(o) is not None}
        for index, key in self.row_of.items():
            for i in self.t.eqns[index].inputs:
                if self.producer.get(i) not in (None, key):
                    leaving.add(i)
        return leaving

    def _row_for(self, e: Any, in_infos: list[Info | None], out_infos: list[Info]) -> _RowBuilder:
        group = next((c for c in e.calls if c in self.atomic), None)
        if group is not None:
            return self._call_row(group)
        act_inputs = [i for i, info in zip(e.inputs, in_infos, strict=True) if info is not None]
        producers = {self.producer.get(i) for i in act_inputs}
        structural = e.prim in STRUCTURAL or (
            e.prim not in ELEMENTWISE
            and e.prim not in {"reshape", "transpose", "squeeze", "broadcast_in_dim",
                               "optimization_barrier"}
        )
        if e.prim == "reshape":
            structural = self._layout_changed(in_infos[0], out_infos[0])
        if structural:
            return self._op_row(e, self._op_name(e, in_infos, out_infos))
        if len(producers) > 1:
            return self._op_row(e, e.prim)
        producer = producers.pop()
        if producer is None:
            return self._op_row(e, e.prim)
        row = self.rows[producer]
        if row.type == "sum_pool" and e.prim in {"div", "mul"}:
            row.type = "avg_pool"
        if row.type == "global_sum_pool" and e.prim in {"div", "mul"}:
            row.type = "global_avg_pool"
        return row

    def _op_name(self, e: Any, in_infos: list[Info | None], out_infos: list[Info]) -> str:
        if e.patches:
            return "patches"
        if e.prim == "conv_general_dilated" and any(d > 1 for d in e.params["lhs_dilation"]):
            return "conv_transpose"
        if e.prim == "reshape":
            return "flatten" if any(not f.exclusive for f in out_infos[0]) else "reshape"
        if e.prim in REDUCTIONS:
            spatial = [f for f in in_infos[0] if f.axis is not None and f.axis in e.params["axes"]]
            if spatial and len(spatial) == sum(f.axis is not None for f in in_infos[0]):
                return {"reduce_max": "global_max_pool", "reduce_sum": "global_sum_pool"}.get(
                    e.prim, e.prim)
        return _OP_NAMES.get(e.prim, e.prim)

    def _add(self, row: _RowBuilder, e: Any) -> None:
        row.eqns.append(e.index)
        self.row_of[e.index] = row.key
        row.flops += e.flops
        row.macs += e.macs
        for i in e.inputs:
            if self.info.get(i) is not None:
                if self.producer.get(i) != row.key and i not in row.inputs:
                    row.inputs.append(i)
                continue
            params, eqns = self.deps.get(i, (frozenset(), frozenset()))
            for p in params - self.claimed_params:
                row.params += self.t.param_leaves[p][1]
            for q in eqns - self.claimed_eqns:
                if not self.t.eqns[q].static:  # constant-only (take's index arithmetic): folded
                    row.flops += self.t.eqns[q].flops
                    row.macs += self.t.eqns[q].macs
            self.claimed_params |= params
            self.claimed_eqns |= eqns
        row.output = e.outputs[0]

    def _before_widening(self, value: int, r: _RowBuilder) -> int:
        """The value a row hands on, seen through a widening cast it feeds another row: an
        average pool widens its bfloat16 input to float32 inside itself, and that cast, folded
        into the producing row as one-input elementwise, doubled the row's bytes. A model's
        own output keeps its dtype (logits returned in float32)."""
        if value in self.t.output_ids:
            return value
        e = next(self.t.eqns[q] for q in r.eqns if value in self.t.eqns[q].outputs)
        if e.prim != "convert_element_type" or self.producer.get(e.inputs[0]) != r.key:
            return value
        source = e.inputs[0]
        wider = self.t.avals[value].dtype.itemsize > self.t.avals[source].dtype.itemsize
        return source if wider else value

    def _finish(self, r: _RowBuilder, leaving: set[int]) -> LayerRow:
        """The row's record; its outputs are the values it passes on (all parts of a split),
        else its last equation's first output."""
        # once each: a value handed on both as it is and widened (to a bfloat16 block's conv
        # branch and to its pool branch) was charged twice
        outputs = list(dict.fromkeys(self._before_widening(o, r) for q in r.eqns
                                     for o in self.t.eqns[q].outputs if o in leaving))
        avals = [self.t.avals[o] for o in outputs or [r.output]]
        shapes = tuple(tuple(int(s) for s in a.shape) for a in avals)
        return LayerRow(
            name=r.name,
            type=r.type,
            input_shapes=tuple(tuple(int(s) for s in self.t.avals[i].shape) for i in r.inputs),
            output_shape=shapes[0],
            params=r.params,
            macs=r.macs,
            flops=r.flops,
            activation_bytes=sum(int(np.prod(a.shape, dtype=np.int64)) * a.dtype.itemsize
                                 for a in avals),
            field=to_receptive_field(self.info[(outputs or [r.output])[0]]),
            output_shapes=shapes,
        )


#: `model.apply`'s own keywords: they never reach the called method.
_APPLY_KWARGS = frozenset({"rngs", "method", "capture_intermediates"})


def _check_call_kwargs(owner: str, model: nn.Module, call_kwargs: dict[str, Any]) -> None:
    """Keyword arguments the called method (`__call__`, or apply's `method=`) does not take are
    refused before tracing, naming them and the method's signature."""
    if "mutable" in call_kwargs:
        raise invalid(owner, "mutable", call_kwargs["mutable"],
                      "summary makes every collection but 'params' mutable itself (a training "
                      "call's BatchNorm updates count as its work); drop the argument")
    kwargs = {k: v for k, v in call_kwargs.items() if k not in _APPLY_KWARGS}
    rngs = call_kwargs.get("rngs")
    if rngs is not None and not isinstance(rngs, dict) and not is_prng_key(rngs):
        raise invalid(owner, "rngs", rngs, "expected a dict of PRNG keys by stream name (e.g. "
                      "{'dropout': jax.random.key(0)}) or one PRNG key (for 'params'), as "
                      "model.apply takes")
    method = call_kwargs.get("method") or "__call__"
    if not isinstance(method, str) and not callable(method):
        raise invalid(owner, "method", method, f"expected the name of a method of "
                      f"{type(model).__name__} or a function of (module, x, ...), as "
                      "model.apply takes")
    fn = getattr(type(model), method, None) if isinstance(method, str) else method
    if fn is None:  # flax looks the name up on the unbound module: setup's are not there either
        raise invalid(owner, "method", method, f"{type(model).__name__} has no such method; "
                      "expected the name of one of its methods or a function of (module, x, "
                      "...), as model.apply takes")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # not introspectable: let the call itself decide
        return
    try:
        signature.bind(model, None, **kwargs)
    except TypeError as err:
        name = getattr(fn, "__qualname__", str(method))
        raise invalid(owner, "keyword arguments", kwargs,
                      f"{name}{signature} refuses them ({err})") from None


def check_model(owner: str, model: Any) -> None:
    """A ValueError naming `owner` when `model` is no Flax module (a zoo name, which
    `cnnjax.models.create_model` builds, raised AttributeError in the trace)."""
    if isinstance(model, nn.Module):
        return
    if isinstance(model, str):
        raise invalid(owner, "model", model, "expected a flax.linen Module, e.g. "
                      f"cnnjax.models.create_model({model!r}) for a registered model")
    if isinstance(model, type) and issubclass(model, nn.Module):
        raise invalid(owner, "model", model.__name__, "it is a Module class; expected an "
                      f"instance, e.g. {model.__name__}()")
    raise invalid(owner, "model", type(model).__name__, "expected a flax.linen Module")


def _failed_trace_error(owner: str, model: nn.Module, shape: tuple[int, ...], err: Exception,
                        **init_kwargs: Any) -> Exception:
    """The error for a trace that failed on `shape` (`err`, the layer's `LayerCallError`): an
    input_shape ValueError if the model runs on a larger input or on an (H, W, C) image (the size
    or the rank is at fault); else the model's own error (an AttributeError in its code, a
    setting no input satisfies), re-raised with its traceback rather than blamed on the input."""
    from cnnjax.train.checks import larger_input

    cause = err.__cause__
    others = [larger_input(shape, len(shape) - 1)]
    if len(shape) != 3:  # the models take [N, H, W, C] images
        others.append(larger_input((1, 1, shape[-1]), 2))
    if (cause is not None and not isinstance(cause, MemoryError)  # too large: not retried
            and not any(_runs(model, other, init_kwargs) for other in others)):
        return cause
    # (1, 32, 32, 3) for (32, 32, 3): the batch axis is `batch_size`'s, not input_shape's
    batch = (f"; input_shape excludes the batch axis (batch_size sets it): did you mean "
             f"{shape[1:]}?" if len(shape) > 3 and shape[0] == 1 else "")
    return invalid(owner, "input_shape", shape, f"in {type(model).__name__}, {err}; a larger "
                   f"input, another rank or other model settings may be needed{batch}")


def _runs(model: nn.Module, shape: tuple[int, ...], init_kwargs: dict[str, Any]) -> bool:
    """Whether `model.init` traces on a `shape` input, as `trace_model` would try it."""
    from cnnjax.train.checks import LayerCallError

    try:
        init_shapes(model, shape, **init_kwargs)
    except LayerCallError:
        return False
    return True


def summary(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch_size: int = 1,
    dtype: Any = jnp.float32,
    **call_kwargs: Any,
) -> Summary:
    """Per-layer table of `model` on inputs `[batch_size, *input_shape]` (e.g. `(224, 224, 3)`).

    Extra keyword arguments go to `model.apply` (e.g. `train=False`). Nothing is computed: the
    model is traced abstractly, so ImageNet-size models summarize in seconds.
    """
    return summarize("summary", model, input_shape, batch_size=batch_size, dtype=dtype,
                     **call_kwargs)


def summarize(owner: str, model: Any, input_shape: Any, /, *, batch_size: Any = 1,
              dtype: Any = jnp.float32, **call_kwargs: Any) -> Summary:
    """`summary` for a function built on it (`receptive_field`): its argument errors name
    `owner`, the function the user called (positional-only, so any keyword reaches the model)."""
    check_model(owner, model)
    shape = checked_input_shape(owner, input_shape)
    batch_size = check_positive_int(owner, "batch_size", batch_size)  # a NumPy int: Python's
    check_float_dtype(owner, "dtype", dtype, allow_none=False, computable=True)
    _check_call_kwargs(owner, model, call_kwargs)
    from cnnjax.train.checks import LayerCallError  # trace_model imports it too: no extra cost

    try:
        trace = trace_model(model, shape, batch_size=batch_size, dtype=dtype, **call_kwargs)
        failure = None
    except LayerCallError as err:
        failure = _failed_trace_error(owner, model, shape, err, batch_size=batch_size,
                                      dtype=dtype, **call_kwargs)
    if failure is not None:  # raised here, out of the handler: no LayerCallError in its chain
        raise failure
    grouper = _Grouper(trace, len(shape) - 1)
    rows = grouper.run()
    out_info = grouper.info.get(trace.output_ids[0]) if trace.output_ids else None
    if out_info is not None:  # a merged axis left in the output has no uniform grid
        out_info = output_info(out_info, grouper.notes)
    # Parameters of outputs computed without the input are in no row, yet not unused.
    unclaimed = set().union(*(grouper.deps.get(o, ((),))[0] for o in trace.output_ids))
    unclaimed -= grouper.claimed_params
    constant = sum(trace.param_leaves[p][1] for p in unclaimed)
    if constant:
        grouper.notes.append(f"{constant:,} parameters reach the outputs without the input "
                             "(an output computed from parameters alone): in the total, in no "
                             "row")
    unused = trace.total_params - sum(r.params for r in rows) - constant
    if unused:
        grouper.notes.append(f"{unused:,} parameters take no part in this call's outputs (e.g. "
                             "auxiliary heads in eval mode): in the total, in no row")
    return Summary(
        rows=rows,
        input_shape=(batch_size, *shape),
        output_shapes=[tuple(int(s) for s in trace.avals[o].shape) for o in trace.output_ids],
        receptive_field=None if out_info is None else to_receptive_field(out_info),
        total_params=trace.total_params,
        notes=list(dict.fromkeys(grouper.notes)),
    )


# ----------------------------------------------------------------------------------------------
# Command line: python -m cnnjax.analysis.summary --model=resnet18 --input_shape=224,224,3

_EXAMPLES_PREFIX = "examples."


def parse_shape(text: str, owner: str = "summary CLI") -> tuple[int, ...]:
    """An `--input_shape` flag's "H,W,C" as ints; `owner` (the CLI) names it in errors."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise invalid(owner, "--input_shape", text, "expected comma-separated ints, "
                      "e.g. 224,224,3") from None
    if len(shape) != 3 or any(s <= 0 for s in shape):  # the models take [N, H, W, C] images
        raise invalid(owner, "--input_shape", text, "expected positive ints H,W,C, e.g. "
                      "224,224,3")
    return shape


def check_input_shape(model: nn.Module, name: str, shape: tuple[int, ...], text: str,
                      owner: str = "summary CLI") -> None:
    """A ValueError naming the `--input_shape` flag (given as `text`) when model `name` cannot
    run on `shape`: the engine's own pre-compilation check (`check_input_size`: the registry's
    `min_input_size`, then an abstract trace naming the layer where the input collapses), which
    words it for training's `data.image_size`, reworded for the flag. Without it the user would
    get a layer's internal shape error naming neither the flag nor the model's minimum."""
    from cnnjax.train.checks import check_input_size

    minimum = None
    if not name.startswith(_EXAMPLES_PREFIX):
        from cnnjax.models.registry import min_input_size

        minimum = min_input_size(name, model)
    try:
        check_input_size(model, name, tuple(shape), minimum)
    except ValueError as err:  # "<name>: input resolution='HxW' is invalid; <why>."
        why = str(err).split(" is invalid; ", 1)[-1].rstrip(".")
        why = why.replace("a larger data.image_size", "a larger --input_shape")
        raise invalid(owner, "--input_shape", text, f"{name}: {why}") from None


def load_model(name: str, num_classes: int | None = None,
               owner: str = "summary CLI") -> tuple[nn.Module, tuple[int, ...]]:
    """Builds a zoo model (`cnnjax.models.create_model`) or, for `examples.<name>`, a reference
    network from `tests/examples.py` (importable from the repository root); returns it with its
    native input shape. `owner` (the CLI) names the `--model` flag in errors."""
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if name.startswith(_EXAMPLES_PREFIX):
        try:
            from tests.examples import EXAMPLES, create_example
        except ImportError:
            raise invalid(owner, "--model", name, "examples.* networks live in "
                          "tests/examples.py; run from the repository root") from None
        key = name[len(_EXAMPLES_PREFIX):]
        model = create_example(key, **kwargs)
        return model, EXAMPLES[key][1]
    from cnnjax.models import UnknownModelError, create_model, model_info

    try:
        info = model_info(name)
    except UnknownModelError as err:  # the registry's advice under the flag's name
        raise invalid(owner, "--model", name, err.valid) from None
    return create_model(name, **kwargs), tuple(info.input_shape)


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("model", None, "Zoo model name (see cnnjax.models.list_models()) or "
                        "examples.<name> for a network in tests/examples.py.", required=True)
    flags.DEFINE_string("input_shape", None, "H,W,C (default: the model's native shape).")
    flags.DEFINE_integer("num_classes", None, "Number of classes (default: the model's).")
    flags.DEFINE_integer("batch_size", 1, "Batch size of the traced input.")
    flags.DEFINE_string("csv", None, "Also write the rows to this CSV file.")


def main(argv: Sequence[str]) -> None:
    """Prints the summary table of `--model` (and writes `--csv`); bad input, or a `--csv` it
    cannot write, ends the command with one `error: ...` line."""
    from absl import flags

    from cnnjax.utils.cli import one_line_errors, start_command
    from cnnjax.utils.files import check_output_file

    start_command(list(argv))
    f = flags.FLAGS
    with one_line_errors():
        for name in ("input_shape", "csv"):  # given but empty (an unset shell variable)
            if getattr(f, name) == "":
                raise ValueError(f"--{name}='' is invalid; expected a value, or leave the flag "
                                 "out")
        if f.batch_size < 1:  # absl types it; the summary would name its own argument
            raise ValueError(f"--batch_size={f.batch_size} is invalid; expected a positive "
                             "integer")
        shape = parse_shape(f.input_shape) if f.input_shape else None
        if f.csv:  # before the tracing: a path that cannot be written is reported at once
            check_output_file(f.csv, "--csv", "--csv's folder")
        model, native = load_model(f.model, f.num_classes)
        if shape is not None:  # before the tracing: a too-small input is named as the flag
            check_input_shape(model, f.model, shape, f.input_shape)
        result = summary(model, shape or native, batch_size=f.batch_size)
        print(f"{f.model} on input {result.input_shape}")
        print(result)
        if result.receptive_field is not None:
            print(f"receptive field of the output: {result.receptive_field}")
        if f.csv:
            result.to_csv(f.csv)
            print(f"wrote {f.csv}")


if __name__ == "__main__":
    from absl import app

    from cnnjax.utils.cli import parse_flags

    _define_flags()
    app.run(main, flags_parser=parse_flags)
