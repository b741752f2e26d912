"""Autoscaling seen to happen: jobs on Ray's fake multi-node autoscaler (autoscaler v2).

The cluster is a head with no CPUs and a worker node type of 1 CPU, 0 to 3 nodes. The fake node
provider starts each worker node as a real raylet on this machine, so a job's pending actors and
trials make the autoscaler add nodes, and idle nodes are removed after `IDLE_TIMEOUT_MIN`.

Ray 2.60's wheel lacks the fake provider's `example.yaml` defaults (so `ray.cluster_utils.
AutoscalingCluster` fails to start), and AutoscalingCluster runs `ray stop --force`, which would
kill every other Ray cluster on the machine (the session's included). The head is therefore
started here with the provider named as an `external` module, in a process group of its own
that the fixture kills at the end.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from test_sweep import tiny_config

from dprm_ray.data import load_rows
from dprm_ray.judge import row_key

pytestmark = pytest.mark.slow

HEAD_ID = "f" * 51 + "00000"  # the fake provider's head node id
MAX_NODES = 3
IDLE_TIMEOUT_MIN = 0.1  # 6 s: the test waits for scale-down, a real cluster would use minutes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def autoscaling_config(gcs_address: str) -> dict:
    return {
        "cluster_name": "dprm-ray-fake",
        "max_workers": MAX_NODES,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "provider": {
            "type": "external",
            "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
            "launch_multiple": True,
            "head_node_id": HEAD_ID,
            "gcs_address": gcs_address,
        },
        "auth": {"ssh_user": "ray"},
        "available_node_types": {
            "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
            "cpu_1": {
                "resources": {"CPU": 1, "object_store_memory": 150 * 1024**2},
                "node_config": {},
                "min_workers": 0,
                "max_workers": MAX_NODES,
            },
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class FakeAutoscalingCluster:
    """The head (and, through its autoscaler, the worker nodes) in one process group."""

    def __init__(self, tmp_dir):
        self.address = f"127.0.0.1:{_free_port()}"
        config = tmp_dir / "autoscaling.json"
        config.write_text(json.dumps(autoscaling_config(self.address)))
        env = dict(
            os.environ,
            RAY_AUTH_MODE="disabled",
            RAY_FAKE_CLUSTER="1",
            AUTOSCALER_UPDATE_INTERVAL_S="1",
            RAY_enable_autoscaler_v2="1",
            RAY_CLOUD_INSTANCE_ID=HEAD_ID,
            RAY_OVERRIDE_NODE_ID_FOR_TESTING=HEAD_ID,
        )
        env.pop("RAY_ADDRESS", None)
        self.log = tmp_dir / "head.log"
        self.temp_dir = tempfile.mkdtemp(prefix="rayas_", dir="/tmp")  # short: socket paths
        self.head = subprocess.Popen(
            [
                "ray",
                "start",
                "--head",
                "--block",
                f"--port={self.address.split(':')[1]}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=0",
                "--object-store-memory=150000000",
                "--include-dashboard=false",
                "--disable-usage-stats",
                # A temp dir of its own: `ray start` records its address in the default one,
                # where every later address-less ray.init on the machine would find it.
                f"--temp-dir={self.temp_dir}",
                f"--autoscaling-config={config}",
            ],
            env=env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        # The GCS answers before the head has registered (-1 worker nodes).
        while (n := self.worker_nodes()) is None or n < 0:
            if self.head.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the fake autoscaling head did not start: {self.log}")
            time.sleep(1)

    def worker_nodes(self) -> int | None:
        """Alive worker nodes (the head not counted); None while the GCS does not answer."""
        from ray._raylet import GcsClient

        try:
            nodes = GcsClient(address=self.address).get_all_node_info(timeout=5).values()
        except Exception:
            return None
        return sum(1 for n in nodes if n.state == 0) - 1  # state 0: ALIVE

    def job_env(self) -> dict:
        return dict(os.environ, RAY_ADDRESS=self.address, RAY_AUTH_MODE="disabled")

    def stop(self) -> None:
        if self.head.poll() is None:
            os.killpg(self.head.pid, signal.SIGTERM)
            try:  # `ray start --block` takes ~30 s to stop its nodes one by one: not waited for
                self.head.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.head.pid, signal.SIGKILL)
                self.head.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class NodeTimeline:
    """Worker-node count once a second, in a thread, while a job runs and after."""

    def __init__(self, cluster: FakeAutoscalingCluster):
        self.cluster = cluster
        self.start = time.monotonic()
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            n = self.cluster.worker_nodes()
            if n is not None:
                self.samples.append((round(time.monotonic() - self.start, 1), n))
            self._stop.wait(1.0)

    def mark(self) -> float:
        return round(time.monotonic() - self.start, 1)

    def wait_for(self, nodes: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.samples and self.samples[-1][1] == nodes:
                return True
            time.sleep(0.5)
        return False

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join()
        return self.samples

    def changes(self) -> list[tuple[float, int]]:
        """The samples where the count changed (the first included)."""
        return [s for i, s in enumerate(self.samples) if i == 0 or s[1] != self.samples[i - 1][1]]


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory):
    cluster = FakeAutoscalingCluster(tmp_path_factory.mktemp("fake-autoscaler"))
    yield cluster
    cluster.stop()


def run_job(cluster, *args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dprm_ray.jobs.cli", *args],
        cwd=REPO,
        env=cluster.job_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def after_job(name: str, timeline: NodeTimeline, tmp_path) -> tuple[list[int], bool]:
    """Call when the job has ended: waits (up to 120 s) for the idle nodes to go, prints the
    timeline and saves it to `tmp_path/timeline.json`. Returns the node counts seen while the
    job ran and whether the cluster got back to 0 worker nodes."""
    marks = {"job_done": timeline.mark()}
    scaled_down = timeline.wait_for(0, timeout=120)
    marks["idle_removed"] = timeline.mark()
    samples = timeline.stop()
    print(f"\n{name}: worker nodes over time (s, nodes): {timeline.changes()}; {marks}")
    (tmp_path / "timeline.json").write_text(json.dumps({"samples": samples, "marks": marks}))
    return [n for t, n in samples if t <= marks["job_done"]], scaled_down


def test_annotation_pool_scales_the_cluster_up_and_back_down(fake_cluster, tmp_path):
    """A pool of up to 3 one-CPU judges on a head with no CPUs: nodes are added while rows wait,
    every row is annotated once, and the idle nodes are removed after the job."""
    assert fake_cluster.worker_nodes() == 0
    rows = [
        {"prompt": f"Human: question number {i}?", "response": f"Here is answer {i}."}
        for i in range(240)
    ]
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), inp)
    timeline = NodeTimeline(fake_cluster)
    proc = run_job(
        fake_cluster,
        "annotate",
        f"input={inp}",
        f"output={tmp_path / 'ann.parquet'}",
        "judge.model=tiny",
        "judge.personas_per_item=3",
        "pool.min_actors=1",
        f"pool.max_actors={MAX_NODES}",
        "pool.cpus_per_actor=1",
        "pool.batch_size=4",
        f"output_dir={tmp_path / 'run'}",
    )
    during, scaled_down = after_job("annotate", timeline, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = load_rows(tmp_path / "ann.parquet", kind="annotations", num_labels=6).rows
    assert sorted(r["prompt"] for r in out) == sorted(r["prompt"] for r in rows)
    assert len({row_key(r["prompt"], r["response"]) for r in out}) == len(rows)
    assert "processed 240, rejected 0" in proc.stdout
    assert max(during) == MAX_NODES, timeline.changes()  # the pool grew to 3 actors on 3 nodes
    assert scaled_down, f"idle nodes were not removed: {timeline.changes()}"


def test_sweep_with_more_trials_than_fit_scales_up_and_back_down(fake_cluster, tmp_path):
    """Four one-CPU trials, at most three nodes: the cluster grows to three, every trial
    completes, and the nodes go once the sweep is done."""
    assert fake_cluster.worker_nodes() == 0 or pytest.fail("nodes left from the previous test")
    config = tiny_config(
        tmp_path,
        "search:\n  targets.eps: {grid: [0.0, 0.1]}\n  optim.lr: {grid: [0.003, 0.01]}\n"
        "asha: {enabled: false}\nresources: {workers: 1, cpus: 1.0}\n",
        steps=10,
    )
    text = config.read_text().replace("max_concurrent_trials: 1", "max_concurrent_trials: 0")
    config.write_text(text)
    out = tmp_path / "out"
    timeline = NodeTimeline(fake_cluster)
    proc = run_job(fake_cluster, "sweep", "--config", str(config), f"output_dir={out}")
    during, scaled_down = after_job("sweep", timeline, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = pq.read_table(out / "results.parquet").to_pylist()
    assert len(results) == 4
    assert all(r["status"] == "completed" and r["steps"] == 10 for r in results), results
    assert max(during) == MAX_NODES, timeline.changes()
    assert scaled_down, f"idle nodes were not removed: {timeline.changes()}"
