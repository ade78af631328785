"""predictor/gpu_job.sh's control flow, with a stand-in interpreter that records each step instead of running it."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, fail_on: str = "") -> tuple[int, list[str]]:
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "fake-python"
    fake.write_text(
        f'#!/bin/bash\necho "$*" >> {calls}\n[[ -n "{fail_on}" && "$*" == *"{fail_on}"* ]] && exit 3\nexit 0\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PYTHON": str(fake), "DEEPSEEK_NPZ": "routes.npz"}
    done = subprocess.run(
        ["bash", "predictor/gpu_job.sh", str(tmp_path / "out"), "2"], cwd=ROOT, env=env, capture_output=True, timeout=60
    )
    return done.returncode, calls.read_text().splitlines()


def test_every_step_runs_and_deepseek_is_imported_trained_scored_and_simulated(tmp_path):
    rc, calls = _run(tmp_path)
    assert rc == 0
    trained = [c for c in calls if "train-predictor" in c]
    assert len(trained) == 7  # fine, coarse, four fine-no-<domain>, deepseek
    assert any("--max-steps 6" in c for c in trained if "deepseek" in c)  # three times STEPS by default
    assert sum("orchestrator.cli simulate" in c for c in calls) == 4  # three budgets + the true-routes bound
    assert any("import-routes --npz routes.npz" in c for c in calls)


def test_a_failing_step_fails_the_job(tmp_path):
    rc, calls = _run(tmp_path, fail_on="--budget 0.25")
    assert rc == 1 and any("--budget 0.25" in c for c in calls)
