"""Where a `ray job submit --working-dir .` job writes: never into Ray's package cache.

Real submits to the shared `ray start --head` cluster (tests/integration/conftest.py). The job runs inside
`<ray tmp>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>/`; a relative output path must land
in the directory named by NEOBERT_SUBMIT_DIR (a cluster on the submitting machine), and without it, or when
that directory is not on the node (a remote cluster), the job must refuse with one error line, exit 2.
jobs/validate_contrastive.py with the in-process engine is the cheapest job that writes an output dir.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ROWS = [
    {"query": f"question {i}", "corpus": f"answer passage {i}", "negative": f"wrong {i}"} for i in range(6)
]


def submit_cmd(ray_cluster, job_args: list[str], env_vars: dict[str, str] | None) -> list[str]:
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", ray_cluster.dashboard_url,
           "--working-dir", str(REPO)]  # fmt: skip
    if env_vars is not None:
        cmd += ["--runtime-env-json", json.dumps({"env_vars": env_vars})]
    return [*cmd, "--", sys.executable, *job_args]


def submit_all(cmds: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Every submit at once (each job waits mostly on Ray: runtime env, driver start, log tail); a submit that a
    fresh cluster's job agent refused before anything ran (not up yet) is repeated."""
    deadline = time.time() + 60
    out: dict[str, subprocess.CompletedProcess] = {}
    todo = dict(cmds)
    while todo:
        procs = {
            k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
            for k, c in todo.items()
        }
        for k, p in procs.items():
            stdout, stderr = p.communicate(timeout=180)
            out[k] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
        todo = {
            k: c
            for k, c in todo.items()
            if "No available agent to submit job" in out[k].stderr + out[k].stdout and time.time() <= deadline
        }
        if todo:
            time.sleep(2)
    return out


@pytest.fixture(scope="module")
def submit_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("submitter")
    (d / "data").mkdir()
    with open(d / "data" / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS)
    return d


ARGS = ["jobs/validate_contrastive.py", "--engine", "local", "--source", "pairs=data/pairs.jsonl",
        "--output", "outputs/validated"]  # fmt: skip


@pytest.fixture(scope="module")
def submitted(ray_cluster, submit_dir) -> dict[str, subprocess.CompletedProcess]:
    """The three submits of this module (NEOBERT_SUBMIT_DIR set, unset, and naming a dir not on the node)."""
    return submit_all(
        {
            "submit_dir": submit_cmd(ray_cluster, ARGS, {"NEOBERT_SUBMIT_DIR": str(submit_dir)}),
            "no_submit_dir": submit_cmd(ray_cluster, ARGS, None),
            "remote": submit_cmd(ray_cluster, ARGS, {"NEOBERT_SUBMIT_DIR": "/nonexistent/laptop/home"}),
        }
    )


def test_relative_paths_resolve_against_the_submit_dir(ray_cluster, submit_dir, submitted):
    proc = submitted["submit_dir"]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    target = submit_dir / "outputs" / "validated"
    assert f"validate_contrastive: output = {target}" in out  # the absolute path, printed up front
    report = json.loads((target / "report.json").read_text())
    assert report["totals"]["valid"] == len(ROWS)
    assert not list(
        Path(ray_cluster.temp_dir).glob("session_*/runtime_resources/working_dir_files/*/outputs")
    )


def test_relative_output_without_submit_dir_is_refused(submitted):
    proc = submitted["no_submit_dir"]
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    assert "validate_contrastive: error: output='outputs/validated' is relative" in out, out[-4000:]
    assert "working-dir package cache" in out and "NEOBERT_SUBMIT_DIR" in out and "Traceback" not in out


def test_remote_cluster_needs_an_absolute_output(submitted):
    proc = submitted["remote"]
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    assert "job runs on a remote cluster" in out and "a URI" in out, out[-4000:]
