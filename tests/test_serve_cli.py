"""`s2meta serve`: settings errors exit 2 with the setting named; a real server process
comes up ready on a published registry and serves over TCP."""

import importlib
from collections.abc import Iterable

import httpx
import torch
from conftest import REDIS_URL, needs_redis, serving
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from s2meta.cli import main


def test_bad_settings_exit_2_naming_the_setting(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("S2META_REGISTRY", str(tmp_path))
    monkeypatch.setenv("S2META_DEVICE", "gpu")
    assert main(["serve"]) == 2
    assert "S2META_DEVICE" in capsys.readouterr().err
    monkeypatch.delenv("S2META_DEVICE")
    monkeypatch.setenv("S2META_REGISTRY", str(tmp_path / "missing"))
    assert main(["serve"]) == 2
    assert "not a directory" in capsys.readouterr().err
    monkeypatch.setenv("S2META_REGISTRY", str(tmp_path))
    monkeypatch.setenv("S2META_FAISS_SEARCH", "efSearch=64")  # the default IVF has nprobe
    assert main(["serve"]) == 2
    assert "S2META_FAISS_SEARCH='efSearch=64'" in capsys.readouterr().err


def test_serve_runs_torch_on_the_configured_threads(tmp_path, monkeypatch):
    seen = []

    def run_one_worker(app: str, **options: object) -> None:
        module, _, factory = app.partition(":")
        assert options["factory"] and options["workers"] == 1
        getattr(importlib.import_module(module), factory)()  # what a worker process does
        seen.append(torch.get_num_threads())

    monkeypatch.setattr("service.cli.uvicorn.run", run_one_worker)
    monkeypatch.setenv("S2META_REGISTRY", str(tmp_path))
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            monkeypatch.setenv("S2META_TORCH_THREADS", str(threads))
            assert main(["serve"]) == 0
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 2]


def test_several_workers_need_redis(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("S2META_REGISTRY", str(tmp_path))
    monkeypatch.setenv("S2META_WORKERS", "2")
    monkeypatch.delenv("S2META_REDIS_URL", raising=False)
    assert main(["serve"]) == 2
    assert "S2META_WORKERS=2 needs S2META_REDIS_URL" in capsys.readouterr().err


def test_a_server_process_becomes_ready_and_serves(registry, scenario, tmp_path):
    env = {"S2META_REGISTRY": str(registry), "S2META_ADMIN_TOKEN": "t"}
    with serving(env, tmp_path / "serve.log") as base:
        url = f"{base}/scenarios/{scenario.scenario_id}/adapt"
        assert httpx.post(url, json=scenario.body(), timeout=60).status_code == 401
        adapted = httpx.post(
            url, json=scenario.body(), headers={"Authorization": "Bearer t"}, timeout=60
        )
        assert adapted.status_code == 200, adapted.text
        params = {"user": scenario.eval_user, "scenario": scenario.scenario_id}
        served = httpx.get(f"{base}/recommend", params=params, timeout=10).json()
        assert len(served["items"]) == 10 and served["meta_learner"] == "v0001"
    # The access log is off unless S2META_ACCESS_LOG is set (the workers' test sets it).
    assert '"GET /recommend?' not in (tmp_path / "serve.log").read_text()


@needs_redis
def test_workers_share_the_port_redis_and_metrics(registry, scenario, namespace, tmp_path):
    """Two worker processes: a scenario adapted through one is served by both, and /metrics,
    whichever worker answers it, counts every worker's requests (multiprocess mode); the
    access log, set on, has a line per recommend."""
    metrics_dir = tmp_path / "metrics"
    env = {
        "S2META_REGISTRY": str(registry),
        "S2META_REDIS_URL": REDIS_URL,
        "S2META_NAMESPACE": namespace,
        "S2META_WORKERS": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "S2META_ACCESS_LOG": "true",
    }
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"a previous run's file")  # must be emptied
    recommends = 40
    with serving(env, tmp_path / "serve.log") as base:
        url = f"{base}/scenarios/{scenario.scenario_id}/adapt"
        assert httpx.post(url, json=scenario.body(), timeout=60).status_code == 200
        params = {"user": scenario.eval_user, "scenario": scenario.scenario_id}
        rankings = set()
        for _ in range(recommends):  # a new connection each: the kernel spreads them
            served = httpx.get(f"{base}/recommend", params=params, timeout=10)
            assert served.status_code == 200, served.text
            rankings.add(tuple(item["item"] for item in served.json()["items"]))
        histograms = sorted(metrics_dir.glob("histogram_*.db"))
        counted = [
            httpx.get(f"{base}/metrics", timeout=10).text for _ in range(4)
        ]  # answered by either worker: each must see the total
    assert len(rankings) == 1  # the same adapted recommender in both
    # The access log, asked for: a line per recommend, from whichever worker answered it.
    assert (tmp_path / "serve.log").read_text().count('"GET /recommend?') == recommends
    assert len(histograms) == 2, histograms  # one per worker process
    line = (
        's2meta_request_seconds_count{method="GET",route="/recommend",status="200"} '
        f"{float(recommends)}"
    )
    assert all(line in text for text in counted), counted[0]
    assert all('s2meta_meta_learner_loaded{version="v0001"} 1.0' in text for text in counted)
    assert not metrics_dir.joinpath("counter_1.db").exists()
    # Each worker's own file: both took some of the recommends.
    served_by = [recommend_count(MultiProcessCollector.merge([str(f)])) for f in histograms]
    assert sum(served_by) == recommends and min(served_by) > 0, served_by


def recommend_count(metrics: Iterable[Metric]) -> float:
    return sum(
        sample.value
        for metric in metrics
        for sample in metric.samples
        if sample.name == "s2meta_request_seconds_count" and sample.labels["route"] == "/recommend"
    )
