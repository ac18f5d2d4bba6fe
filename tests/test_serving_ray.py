"""`evssd serve ray`: Ray as the control plane on a local multi-node cluster
(`ray.cluster_utils.Cluster`, 2 nodes of 1 CPU). Servers are placed by shard (custom
resources), publish addresses and memory keys, are restarted by Ray after a crash, and rankers
(a Ray actor and one in this process) reconnect through the published addresses. Ray writes
its state under a temporary directory (RAY_TMPDIR) that is removed afterwards, and ~/.ray
unless it existed before."""
import os
import shutil
import signal
import tempfile
import time

import numpy as np
import pytest

from evssd.host.serving.config import make_config

pytestmark = pytest.mark.xdist_group("serving-ray")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="evssd-ray-", dir="/tmp")
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_USAGE_STATS_ENABLED")}
    home_ray = os.path.expanduser("~/.ray")          # Ray writes an auth token there
    had_home_ray = os.path.exists(home_ray)
    # every Ray process (they inherit the environment) keeps its state under tmp, not /tmp/ray
    os.environ["RAY_TMPDIR"] = tmp
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "resources": {"evssd_s0": 1}, "include_dashboard": False})
        worker = cluster.add_node(num_cpus=1, resources={"evssd_s1": 1})
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        yield cluster, cluster.head_node, worker
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for _ in range(20):          # Ray's last processes may still write while they exit
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.exists(tmp):
                break
            time.sleep(0.25)
        if not had_home_ray:
            shutil.rmtree(home_ray, ignore_errors=True)
        assert not os.path.exists(tmp), f"Ray left {tmp} behind"


def test_ray_places_publishes_restarts_and_rankers_recover(ray_cluster):
    import ray

    from evssd.host.serving.engine import Engine
    from evssd.host.serving.providers import get_provider
    from evssd.host.serving.ranker import Ranker, ServingError, local_pooled, synthetic_batch
    from evssd.host.serving.ray_plane import RayDeployment

    cluster, head, worker = ray_cluster
    cfg = make_config(2, 2000, 8, 2)
    dep = RayDeployment(cfg, max_restarts=3).start()
    try:
        infos = dep.infos()
        # placed by shard: s0 on the head (resource evssd_s0), s1 on the worker node
        assert infos["s0"]["node_id"] == head.node_id and infos["s1"]["node_id"] == worker.node_id
        assert dep.placement == {"s0": "resource evssd_s0", "s1": "resource evssd_s1"}
        # published: real addresses and the META with memory keys
        for s, info in infos.items():
            assert info["port"] > 0 and set(info["meta"]["tables"]) == {"t0", "t1"}
            assert all(m["rkey"] > 0 for m in info["meta"]["tables"].values())
        # a ranker actor inside Ray: every batch correct
        (ranker,) = dep.start_rankers(1, timeout=5.0)
        res = ray.get(ranker.run.remote(3), timeout=60)
        assert res["ok"] == 3 and not res["errors"] and res["max_abs_err"] < 1e-4
        # a ranker outside Ray on the published config, resolving through the actors
        with Engine(get_provider("tcp"), 1, request_timeout=3.0) as eng:
            r = Ranker(dep.config(), eng, timeout=3.0, resolve=dep.resolver(), reconnect_backoff=(0.02, 0.2))
            rng = np.random.default_rng(0)
            sparse = synthetic_batch(cfg, 16, 4, rng)[1]
            for g, w in zip(r.embeddings(sparse), local_pooled(cfg, sparse)):
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
            # crash s1's process: Ray restarts the actor (new port, new memory keys)
            old = infos["s1"]
            os.kill(old["pid"], signal.SIGKILL)
            t0 = time.monotonic()
            failed = 0
            deadline = t0 + 40
            recovered = None
            while time.monotonic() < deadline:
                sparse = synthetic_batch(cfg, 16, 4, rng)[1]
                try:
                    got = r.embeddings(sparse)
                except ServingError as exc:
                    assert "s1" in str(exc)            # failed clearly, naming the server
                    failed += 1
                    time.sleep(0.05)
                    continue
                for g, w in zip(got, local_pooled(cfg, sparse)):
                    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
                if r.reconnects:
                    recovered = time.monotonic() - t0
                    break
            assert recovered is not None, f"ranker never came back to the restarted s1 ({failed} failed batches)"
            new = dep.infos()["s1"]
            assert new["pid"] != old["pid"] and new["node_id"] == worker.node_id
            assert new["meta"]["tables"]["t0"]["rkey"] != old["meta"]["tables"]["t0"]["rkey"]
            print(f"s1 restarted by Ray; ranker recovered after {recovered:.2f} s, {failed} batches failed meanwhile")
        # the Ray ranker recovers too
        res = ray.get(ranker.run.remote(3), timeout=60)
        assert res["ok"] == 3 and res["max_abs_err"] < 1e-4 and res["reconnects"] >= 1
    finally:
        dep.shutdown()


def test_core_and_serving_import_without_ray():
    import subprocess
    import sys
    code = ("import sys; sys.modules['ray'] = None\n"
            "import evssd.host.serving.server, evssd.host.serving.ranker, evssd.host.serving.cli\n"
            "from evssd.host.serving.ray_plane import require_ray\n"
            "try:\n    require_ray()\nexcept RuntimeError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "needs Ray (pip install 'evssd[ray]')" in out.stdout


def test_cli_serve_ray_deploys_publishes_and_ranks(ray_cluster, tmp_path, capsys):
    import json

    from evssd.host.cli import main
    cluster, head, worker = ray_cluster
    out = tmp_path / "published.json"
    rc = main(["serve", "ray", "--address", cluster.address, "--servers", "2", "--tables", "2", "--rows", "1500",
               "--rankers", "1", "--batches", "2", "--batch-size", "8", "--publish", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "(resource evssd_s0)" in text and "(resource evssd_s1)" in text
    assert "ranker 0: 2/2 batches" in text and "errors 0" in text
    pub = json.loads(out.read_text())
    assert all(s["port"] > 0 for s in pub["servers"].values())
