"""`python -m experiments.proposals` as a user runs it: a config without `data.proposals` is a
one-line error; a prepared cache is printed one `split: path` line each (the cache itself is
tested in tests/data)."""

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_config_without_proposals_is_a_one_line_error(tmp_path):
    config = os.path.join(ROOT, "experiments", "configs", "rcnn_shapes.py")  # dense windows
    result = subprocess.run(  # -X importtime: stderr lists every module the command imported
        [sys.executable, "-X", "importtime", "-m", "experiments.proposals", f"--config={config}",
         f"--config.data.data_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: data: proposals.method=None is invalid; expected one of ['selective_search'] "
        "(nothing to prepare).")
    assert "Traceback" not in result.stderr
    assert not os.listdir(tmp_path)  # nothing built or written
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "cnnjax.data.spec" in imported and "tensorflow" not in imported  # refused before TF


_PREPARED = """
import json
import sys
import types

from absl import app

import cnnjax.data

def prepare_proposals(data):  # the cache's paths, as cnnjax.data.detection returns them
    print(json.dumps({"method": data.proposals.method}), file=sys.stderr)
    return {"train": "/cache/train.npz", "test": "/cache/test.npz"}

# stands in for the module (it imports TensorFlow: ~6 s) the command imports once running
detection = types.ModuleType("cnnjax.data.detection")
detection.prepare_proposals = prepare_proposals
sys.modules["cnnjax.data.detection"] = cnnjax.data.detection = detection
from experiments import proposals

app.run(proposals.main, flags_parser=proposals.parse_flags)
"""


def test_each_prepared_split_is_printed_with_its_path():
    """The command's output on success: one `split: path` line per split, in the order
    `prepare_proposals` returned them, then the time taken (the stand-in got the config's
    data, with its selective_search proposals)."""
    config = os.path.join(ROOT, "experiments", "configs", "rcnn_shapes.py")
    result = subprocess.run(
        [sys.executable, "-c", _PREPARED, f"--config={config}:selective_search"], cwd=ROOT,
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.dumps({"method": "selective_search"}) in result.stderr.splitlines()
    lines = result.stdout.strip().splitlines()
    assert lines[:2] == ["train: /cache/train.npz", "test: /cache/test.npz"]
    assert len(lines) == 3 and re.fullmatch(r"Done in \d+\.\d s\.", lines[2]), lines
