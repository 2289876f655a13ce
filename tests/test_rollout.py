"""A roll-out on real processes: two `s2meta serve` replicas sharing Redis and a registry; a
version staged, a canary scenario pinned to it, the version promoted, then rolled back, each
step by the `s2meta` command. At each point every replica serves the expected version, and
the scenarios adapted with the old version before the promotion get their records back on
the rollback instead of being adapted again."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import REDIS_URL, needs_redis, serving

S2META = Path(sys.executable).with_name("s2meta")


def s2meta(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [str(S2META), *args], env=env, capture_output=True, text=True, check=False, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def served(base: str, scenario_id: str, user: str) -> str:
    answer = httpx.get(f"{base}/recommend", params={"user": user, "scenario": scenario_id})
    assert answer.status_code == 200, answer.text
    return answer.json()["meta_learner"]


def wait_until_served(bases: list[str], expected: dict[str, str], user: str) -> None:
    """Until every replica serves each scenario from the expected version (30 s at most)."""
    deadline = time.monotonic() + 30
    while True:
        seen = {(base, name): served(base, name, user) for base in bases for name in expected}
        if all(version == expected[name] for (_, name), version in seen.items()):
            return
        assert time.monotonic() < deadline, seen
        time.sleep(0.2)


def readaptations(bases: list[str], how: str) -> float:
    total = 0.0
    for base in bases:
        text = httpx.get(f"{base}/metrics").text
        found = re.search(rf'^s2meta_readaptations_total{{how="{how}"}} (\S+)$', text, re.M)
        total += float(found.group(1)) if found else 0.0
    return total


@needs_redis
def test_stage_canary_promote_rollback(artifact, registry, scenario, namespace, tmp_path):
    env = {
        **os.environ,
        "S2META_REGISTRY": str(registry),  # v0001 published, current
        "S2META_REDIS_URL": REDIS_URL,
        "S2META_NAMESPACE": namespace,
        # Polling far apart: the replicas follow the announcements.
        "S2META_RELOAD_POLL_S": "600",
    }
    user = scenario.eval_user
    with serving(env, tmp_path / "one.log") as one, serving(env, tmp_path / "two.log") as two:
        bases = [one, two]
        for name in ("a", "b"):
            adapted = httpx.post(f"{one}/scenarios/{name}/adapt", json=scenario.body(), timeout=60)
            assert adapted.status_code == 200, adapted.text
        wait_until_served(bases, {"a": "v0001", "b": "v0001"}, user)

        # Staged: written, not current; nothing moves.
        assert "v0002" in s2meta(
            env, "publish", str(artifact), "--registry", str(registry), "--stage"
        )
        canary = httpx.post(
            f"{two}/scenarios/canary/adapt",
            json=scenario.body(meta_learner="v0002"),
            timeout=60,
        )
        assert canary.status_code == 200 and canary.json()["pinned"], canary.text
        wait_until_served(bases, {"a": "v0001", "b": "v0001", "canary": "v0002"}, user)

        s2meta(env, "promote", "v0002")
        wait_until_served(bases, {"a": "v0002", "b": "v0002", "canary": "v0002"}, user)
        assert readaptations(bases, "adapted") == 2  # a and b, once across the replicas

        s2meta(env, "rollback")
        wait_until_served(bases, {"a": "v0001", "b": "v0001", "canary": "v0002"}, user)
        deadline = time.monotonic() + 30
        while readaptations(bases, "reused") < 2:
            assert time.monotonic() < deadline, "the rollback did not reuse the v0001 records"
            time.sleep(0.2)
        assert readaptations(bases, "reused") == 2
        assert readaptations(bases, "adapted") == 2  # none adapted again
        versions = s2meta(env, "versions")
        assert re.search(r"v0001.*current", versions), versions
