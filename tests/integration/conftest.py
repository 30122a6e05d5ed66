"""One real local Ray cluster (`ray start --head`) shared by every integration test of the session.

Start-up (~7 s) and teardown are paid once. Tests that drive Ray in-process use the `ray_session` fixture
(a driver connected to that cluster); `ray job submit` tests use `ray_cluster.dashboard_url`. The cluster runs in
its own process group and only that group is stopped at the end (`ray stop` would kill every Ray on the host).

`pretrain_reference` is the uninterrupted pretraining run that the restart tests of several modules compare
against (test_pretrain, test_faults): one real `ray job submit` per session. `recipe_data` is the packed data of
the tiny recipes (test_recipe, test_recipe_modernbert), preprocessed once per session.

Ray Train's controller polls its workers every `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S` (2 s by default): the end of a
fit, a reported checkpoint and a dead worker are only seen at the next poll. Tiny runs poll every 0.5 s (the
variable reaches the cluster, the in-process drivers and the job drivers through the environment).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def _free_ports(n: int) -> list[int]:
    """n distinct free ports: every socket stays bound until all are picked (one at a time, the OS may hand the
    same port out twice, and Ray refuses two components on one port)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@dataclasses.dataclass(frozen=True)
class RayCluster:
    address: str  # GCS address for ray.init(address=...)
    dashboard_url: str  # for `ray job submit --address`
    temp_dir: str


@pytest.fixture(scope="session")
def ray_cluster():
    ray_bin = Path(sys.executable).with_name("ray")
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix socket paths are length-limited
    port, dash, client, worker, agent, agent_grpc, metrics, node, objects, env_agent = _free_ports(10)
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: on SIGTERM `ray start --block` would first drain the node for up to
    # 30 s (for Ray Serve proxies) before stopping its processes; nothing here needs draining.
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_DATA_DISABLE_PROGRESS_BARS="1",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # fmt: skip
    cmd = [
        str(ray_bin), "start", "--head", "--block",
        f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        "--num-cpus=4",  # logical CPUs: Train workers + Ray Data tasks must fit together (see docs)
        "--object-store-memory=700000000", f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={client}", f"--min-worker-port={worker}",
        "--max-worker-port=0", "--disable-usage-stats",
        # Every fixed default port gets a free one, so a second Ray on the host cannot break the job agent.
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}", f"--node-manager-port={node}",
        f"--object-manager-port={objects}", f"--runtime-env-agent-port={env_agent}",
    ]  # fmt: skip
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 (closed in the finally below)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address, url = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    import urllib.request

    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                raise RuntimeError(
                    f"ray start failed:\n{(Path(temp_dir) / 'ray-start.log').read_text()}"
                ) from None
            time.sleep(0.5)
    try:
        yield RayCluster(address=address, dashboard_url=url, temp_dir=temp_dir)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)  # ~2 s
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    """A driver in this pytest process connected to the shared cluster."""
    import ray

    ray.init(address=ray_cluster.address, log_to_driver=False)
    yield ray_cluster
    # ray.shutdown() can block for good in its disconnect when threads of other libraries (W&B's service
    # finalizer, tqdm monitors) are still alive in this process; the cluster fixture stops the whole cluster
    # right after, so give the disconnect a bounded time in a daemon thread: it takes well under 1 s when it
    # returns at all (at the end of a whole-suite run it did not within 30 s).
    import threading

    done = threading.Thread(target=ray.shutdown, name="ray-shutdown", daemon=True)
    done.start()
    done.join(timeout=5)


PRETRAIN_PACK = 128


@dataclasses.dataclass(frozen=True)
class PretrainReference:
    """The uninterrupted reference pretraining run: `run_dir` and the finished `ray job submit` process."""

    run_dir: Path
    proc: subprocess.CompletedProcess

    @staticmethod
    def overrides(storage: Path | str, name: str, **extra) -> list[str]:
        """The reference's CLI overrides for a run `name` under `storage`, with `extra` keys on top: 10 steps of 8
        packed rows (2 workers x 1 micro-batch of 4 rows of PRETRAIN_PACK tokens) over a train set capped at 40
        rows (an epoch is 5 steps), a data trace of every micro-batch, the loss logged every 2 steps."""
        base = {
            "data.pack_tokens": PRETRAIN_PACK,
            "data.num_train_rows": 40,
            "data.num_eval_rows": 8,
            "data.shuffle_window_rows": 8,
            "train.tokens_per_micro_batch": 4 * PRETRAIN_PACK,
            "train.num_steps": 10,
            "train.warmup_steps": 2,
            "train.lr": 3e-3,
            "checkpoint.every_steps": 10,
            "checkpoint.num_to_keep": 2,
            "checkpoint.storage_path": str(storage),
            "checkpoint.name": name,
            "logging.every_steps": 2,
            "logging.eval_every_steps": 0,
            "logging.num_eval_batches": 2,
            "logging.trace_data": True,
            **extra,
        }
        return [f"--{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def pretrain_reference(ray_cluster, tmp_path_factory) -> PretrainReference:
    """The uninterrupted reference run, as a real job: `ray job submit --working-dir . -- python jobs/pretrain.py`
    on the embedded default data (tokenized and packed on the fly). Its result is asserted in test_pretrain."""
    storage = tmp_path_factory.mktemp("reference")
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [
        str(ray_bin), "job", "submit", "--address", ray_cluster.dashboard_url, "--working-dir", str(REPO),
        "--", sys.executable, "jobs/pretrain.py", *PretrainReference.overrides(storage, "a"),
    ]  # fmt: skip
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    deadline = time.time() + 60
    while True:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
        # A fresh cluster's job agent may not be up yet; the submit is refused before anything runs.
        if "No available agent to submit job" not in proc.stderr + proc.stdout or time.time() > deadline:
            return PretrainReference(run_dir=storage / "a", proc=proc)
        time.sleep(2)


@pytest.fixture(scope="session")
def recipe_data(ray_session, tmp_path_factory) -> Path:
    """The `--data_root` of the tiny recipes: 400 paragraphs of the embedded Wikipedia articles packed at 64
    tokens (`pack1024`) and at 128 tokens with the length views >= 64 and >= 96 tokens (`pack4096`); `pack8192`
    is the same 128-token packs under the ModernBERT-style recipe's name."""
    from pipelines.embedded import materialize
    from pipelines.mlm.preprocess import PreprocessConfig, run_preprocess

    root = tmp_path_factory.mktemp("recipe-data")
    wiki = next(p for p in materialize().mlm_files if "wiki" in p.name)
    docs = []
    for line in wiki.read_text().splitlines()[:4]:
        art = json.loads(line)
        for j, para in enumerate(p for p in art["text"].split("\n\n") if len(p.split()) >= 8):
            docs.append({"id": f"{art['id']}-{j}", "text": para})
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs[:400]))
    common = dict(input=[str(corpus)], eval_fraction=0.1, rows_per_shard=64, row_group_rows=16)
    run_preprocess(PreprocessConfig(output=str(root / "pack1024"), pack_tokens=64, max_seq_len=64, **common))
    run_preprocess(
        PreprocessConfig(
            output=str(root / "pack4096"), pack_tokens=128, max_seq_len=128, length_views=[64, 96], **common
        )
    )
    (root / "pack8192").symlink_to(root / "pack4096", target_is_directory=True)
    return root
