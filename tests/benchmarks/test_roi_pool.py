"""benchmarks/roi_pool.py runs both reductions and says which one roi_pool picks."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_prints_both_paths_and_the_choice():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.roi_pool", "--boxes=8", "--map=4", "--channels=2",
         "--levels=1,2", "--repeats=1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("8 boxes on 16x4x4x2, levels [1, 2]: roi_pool uses the vectorized "
                               "path (512 masked values at the largest level")
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["vectorized", "loop"]


def test_median_times_takes_wall_and_cpu_medians_separately():
    """Not the CPU time of the median-wall call, and the mean of the middle two for an even
    count (the upper middle one was reported before)."""
    from benchmarks.roi_pool import median_times

    times = [(1.0, 9.0), (2.0, 1.0), (3.0, 2.0), (4.0, 3.0)]
    assert median_times(times) == (2.5, 2.5)
    assert median_times([(5.0, 0.5), (1.0, 0.75), (3.0, 0.25)]) == (3.0, 0.5)
