"""`s2meta serve`: settings errors exit 2 with the setting named; a real server process
comes up ready on a published registry and serves over TCP."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

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
    monkeypatch.setattr(
        "service.cli.uvicorn.run", lambda app, **_: seen.append(torch.get_num_threads())
    )
    monkeypatch.setenv("S2META_REGISTRY", str(tmp_path))
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            monkeypatch.setenv("S2META_TORCH_THREADS", str(threads))
            assert main(["serve"]) == 0
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 2]


def test_help_lists_serve_beside_the_offline_commands(capsys):
    try:
        main(["--help"])
    except SystemExit as done:
        assert done.code == 0
    out = capsys.readouterr().out
    assert "serve" in out and "train" in out and "publish" in out


def test_a_server_process_becomes_ready_and_serves(registry, lastfm_scenario, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    s2meta = Path(sys.executable).with_name("s2meta")
    env = {**os.environ, "S2META_REGISTRY": str(registry), "S2META_ADMIN_TOKEN": "t"}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [str(s2meta), "serve", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.5)
        url = f"{base}/scenarios/{lastfm_scenario.scenario_id}/adapt"
        assert httpx.post(url, json=lastfm_scenario.body(), timeout=60).status_code == 401
        adapted = httpx.post(
            url, json=lastfm_scenario.body(), headers={"Authorization": "Bearer t"}, timeout=60
        )
        assert adapted.status_code == 200, adapted.text
        params = {"user": lastfm_scenario.eval_user, "scenario": lastfm_scenario.scenario_id}
        served = httpx.get(f"{base}/recommend", params=params, timeout=10).json()
        assert len(served["items"]) == 10 and served["meta_learner"] == "v0001"
    finally:
        server.terminate()
        code = server.wait(timeout=30)
        log.close()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it as its exit status.
    assert code in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in (tmp_path / "serve.log").read_text()
