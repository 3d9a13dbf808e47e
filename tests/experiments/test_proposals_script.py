"""`python -m experiments.proposals` as a user runs it: a config without `data.proposals` is a
one-line error (the cache itself is tested in tests/data)."""

import os
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
