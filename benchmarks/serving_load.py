"""Serving under load: GET /recommend of the service against a bare FastAPI endpoint, side by
side in one run, at fixed concurrency levels; and the service again while adaptations are
posted during the load.

The service runs as deployed (`s2meta serve` over Redis with its append-only file, --workers
server processes, default one), with a meta learner trained on LastFM with a tiny budget
(64-dim embeddings) and the LastFM meta-test scenarios whose pools hold 300 to 1,000
candidates registered first. The bare endpoint (benchmarks/bare_app.py) answers a constant
JSON of the same shape and size under uvicorn with the same settings (uvloop and httptools,
as `s2meta serve`, as many worker processes, the access log on or off as S2META_ACCESS_LOG
says). The load generator is a separate process on loopback (asyncio on uvloop with plain
HTTP/1.1, one keep-alive connection per concurrent worker, bounded in time), each request a
random (evaluation user, scenario) pair. Reported per target and level: requests/s,
p50/p95/p99 latency in ms, and the CPU time per request of the server's processes and of the
generator; the service's throughput as a share of the bare endpoint's (the ratio is what
carries over between machines, these ones being noisy). At each level the two targets run in
alternating rounds (--rounds, of seconds / rounds each), their figures over all their
rounds, so that the machine's speed changing during the run falls on both alike. Then, at 32
connections (the targets' level; the top level when 32 is not among the levels): recommend
p99 with adaptations posted during the load against without; the service with dynamic
batching of recommends off (S2META_RECOMMEND_BATCH_MAX=1) against on; and the service with
uvicorn's access log the other way round (what a line per request costs).

There, whether the targets (TARGET_*) are met, the bare endpoint's own p99 beside the
service's. The service runs on the device S2META_DEVICE names (auto: CUDA when there is
one). Prints a table and writes benchmarks/results/serving_load.json (--name). Not part of the
test run. Run: python -m benchmarks.serving_load [--seconds 10] [--rounds 5] [--levels 1,8,32]
[--workers 2] [--log-format json] [--profile]
"""

import argparse
import asyncio
import json
import os
import random
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import httpx
import uvloop

from benchmarks.harness import (
    POOL_RANGE,
    Stack,
    cpu_seconds,
    percentile,
    register,
    start_lastfm_stack,
    stop_process,
)
from benchmarks.ports import free_port
from benchmarks.report import write_report
from service.settings import Settings

PROFILE_TOP = 25
# The targets this benchmark checks, set for 32 connections on a 2-core machine: the service
# at least this share of the bare endpoint's throughput, at most this p99, and adaptations
# posted during the load raising recommend's p99 at most this many times.
TARGET_CONCURRENCY = 32
TARGET_SHARE = 0.35
TARGET_P99_MS = 20.0
TARGET_P99_RATIO_UNDER_ADAPTATION = 2.0


async def read_response(reader: asyncio.StreamReader) -> int:
    """One HTTP/1.1 response off a keep-alive connection; its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        (
            int(line.split(":", 1)[1])
            for line in lines
            if line.lower().startswith("content-length:")
        ),
        None,
    )
    if length is None:
        raise RuntimeError(f"a response without Content-Length: {lines[0]}")
    await reader.readexactly(length)
    return int(lines[0].split()[1])


async def generate(url: str, pairs: list[list[str]], concurrency: int, seconds: float) -> dict:
    """Drive GET {url}/recommend with `concurrency` workers, one keep-alive connection each,
    for `seconds`.

    Plain HTTP/1.1 over asyncio streams, the requests encoded beforehand: an httpx client
    spends more CPU per request than the bare endpoint does to answer it, so on two cores it
    measured itself more than the server (the first version of this script did).
    """
    parsed = urlsplit(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    requests = [
        f"GET /recommend?{urlencode({'user': user, 'scenario': scenario})} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n\r\n".encode()
        for user, scenario in pairs
    ]
    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds

    async def worker(seed: int) -> None:
        nonlocal failures
        rng = random.Random(seed)
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                writer.write(rng.choice(requests))
                status = await read_response(reader)
                latencies.append((time.perf_counter() - start) * 1000)
                failures += status != 200
        finally:
            writer.close()

    started, cpu_started = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "failures": failures,
        "seconds": elapsed,
        "generator_cpu_s": time.process_time() - cpu_started,
        "latencies_ms": latencies,
    }


def run_generator(url: str, pairs: Path, concurrency: int, seconds: float, server_pid: int) -> dict:
    """One run of the generator in a process of its own, so it does not share the server's:
    what it measured (`summarise` makes figures of runs) and the server's CPU seconds over
    the run."""
    # The figures come back in a file, not on the generator's stdout: read from its pipe, a
    # run's JSON (over 100 KiB of latencies) came back broken by a newline at a multiple of
    # 64 KiB, twice in this project's runs.
    with tempfile.TemporaryDirectory(prefix="s2meta-generator-") as scratch:
        out = Path(scratch) / "figures.json"
        command = [sys.executable, "-m", "benchmarks.serving_load", "generate", url, str(pairs)]
        command += ["--concurrency", str(concurrency), "--seconds", str(seconds), "--out", str(out)]
        server_cpu = cpu_seconds(server_pid)
        subprocess.run(command, check=True)
        figures = json.loads(out.read_text())
    return {**figures, "server_cpu_s": cpu_seconds(server_pid) - server_cpu}


def summarise(parts: list[dict]) -> dict:
    """Runs of the generator as one: requests/s over their time, latency percentiles over
    all their requests, and CPU time per request of the server (times requests/s: the cores
    it used, of the two it shares with the generator) and of the generator."""
    requests = sum(part["requests"] for part in parts)
    latencies = [ms for part in parts for ms in part["latencies_ms"]]
    return {
        "requests": requests,
        "failures": sum(part["failures"] for part in parts),
        "requests_per_s": requests / sum(part["seconds"] for part in parts),
        "generator_cpu_ms_per_request": sum(part["generator_cpu_s"] for part in parts)
        * 1000
        / max(1, requests),
        "server_cpu_ms_per_request": sum(part["server_cpu_s"] for part in parts)
        * 1000
        / max(1, requests),
        "ms": {q: percentile(latencies, p) for q, p in (("p50", 50), ("p95", 95), ("p99", 99))},
    }


def start_bare(port: int, log: Path, workers: int, access_log: bool) -> subprocess.Popen:
    command = [sys.executable, "-m", "uvicorn", "benchmarks.bare_app:app", "--port", str(port)]
    command += ["--workers", str(workers), "--log-level", "info"]
    command += ["--access-log" if access_log else "--no-access-log"]
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/recommend", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        # A server that exited (a port it could not bind, say) is not waited for.
        if server.poll() is not None or time.monotonic() > deadline:
            stop_process(server)
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the bare endpoint did not get ready on port {port}:\n{tail}")
        time.sleep(0.2)


def post_adaptations(
    url: str, token: str, bodies: list[tuple[str, dict]], every_s: float, stop: threading.Event
) -> list[float]:
    """Re-adapt registered scenarios every `every_s` until stopped; their durations in ms."""
    durations = []
    headers = {"Authorization": f"Bearer {token}"}
    k = 0
    while not stop.is_set():
        scenario, body = bodies[k % len(bodies)]
        start = time.perf_counter()
        response = httpx.post(
            f"{url}/scenarios/{scenario}/adapt",
            json={**body, "seed": k},
            headers=headers,
            timeout=120,
        )
        response.raise_for_status()
        durations.append((time.perf_counter() - start) * 1000)
        k += 1
        stop.wait(every_s)
    return durations


def profile_during_load(
    api_pid: int, url: str, pairs: Path, concurrency: int, seconds: float, raw: Path
) -> dict:
    """py-spy samples of the service (all its threads, not idle ones) while the generator
    drives it; the functions with the most samples, on top of the stack (self) and anywhere
    in it (total), as shares of all samples."""
    command = [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(api_pid)]
    command += ["--duration", str(int(seconds)), "--rate", "200", "--format", "raw"]
    command += ["--nonblocking", "--subprocesses", "--output", str(raw)]
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1)  # py-spy attached
    figures = summarise([run_generator(url, pairs, concurrency, seconds - 1, api_pid)])
    _, errors = spy.communicate(timeout=60)
    if spy.returncode != 0:
        raise RuntimeError(f"py-spy failed: {errors[-2000:]}")
    own: dict[str, int] = {}
    anywhere: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [_function(frame) for frame in stack.split(";")]
        total += int(count)
        own[frames[-1]] = own.get(frames[-1], 0) + int(count)
        for frame in set(frames):
            anywhere[frame] = anywhere.get(frame, 0) + int(count)

    def top(counts: dict[str, int]) -> list[tuple[str, float]]:
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:PROFILE_TOP]
        return [(name, count / total) for name, count in ranked]

    return {"load": figures, "samples": total, "self": top(own), "total": top(anywhere)}


def _function(frame: str) -> str:
    """'name (path/to/file.py:12)' as 'name (file.py)'."""
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.rstrip(')').rpartition(':')[0]).name})" if where else name


def flipped_log_target(access_log: bool) -> str:
    """The name of the service's run with the access log the other way round."""
    return f"service, access log {'off' if access_log else 'on'}"


def access_log_cost(by: dict[tuple[str, int], dict], checked: int, access_log: bool) -> dict:
    """What uvicorn's access log costs at level `checked`: server CPU per request with it on
    less with it off, and throughput with it off over with it on (the service's main run,
    with the setting as it is, against its run with the setting flipped)."""
    runs = {
        access_log: by[("service", checked)],
        not access_log: by[(flipped_log_target(access_log), checked)],
    }
    return {
        "on_in_main_runs": access_log,
        "cpu_ms_per_request": runs[True]["server_cpu_ms_per_request"]
        - runs[False]["server_cpu_ms_per_request"],
        "throughput_gain_off": runs[False]["requests_per_s"] / runs[True]["requests_per_s"],
    }


def check_targets(by: dict[tuple[str, int], dict], checked: int) -> dict:
    """The targets at level `checked`, each with its value and whether it is met. The bare
    endpoint's p99 stands beside the service's: where the framework alone misses the p99
    bound on the machine of the run, the service cannot meet it there."""
    service, bare = by[("service", checked)], by[("bare FastAPI", checked)]
    share = service["requests_per_s"] / bare["requests_per_s"]
    ratio = by[("service + adaptations", checked)]["ms"]["p99"] / service["ms"]["p99"]
    return {
        "concurrency": checked,
        "share_of_bare": {"value": share, "at_least": TARGET_SHARE, "met": share >= TARGET_SHARE},
        "p99_ms": {
            "value": service["ms"]["p99"],
            "at_most": TARGET_P99_MS,
            "met": service["ms"]["p99"] <= TARGET_P99_MS,
            "bare_endpoint": bare["ms"]["p99"],
        },
        "p99_ratio_under_adaptation": {
            "value": ratio,
            "at_most": TARGET_P99_RATIO_UNDER_ADAPTATION,
            "met": ratio <= TARGET_P99_RATIO_UNDER_ADAPTATION,
        },
    }


def print_table(figures: dict) -> None:
    print(
        f"{'target':<24}{'conc.':>6}{'req/s':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
        f"{'server CPU ms/req':>19}{'generator CPU ms/req':>22}"
    )
    for row in figures["runs"]:
        ms = row["ms"]
        print(
            f"{row['target']:<24}{row['concurrency']:>6}{row['requests_per_s']:>10.0f}"
            f"{ms['p50']:>9.1f}{ms['p95']:>9.1f}{ms['p99']:>9.1f}"
            f"{row['server_cpu_ms_per_request']:>19.3f}{row['generator_cpu_ms_per_request']:>22.3f}"
        )
    for level, share in figures["service_share_of_bare"].items():
        print(f"service throughput / bare at concurrency {level}: {share:.1%}")
    print(f"recommend p99 with adaptations / without: {figures['p99_ratio_under_adaptation']:.2f}")
    print(f"throughput with dynamic batching / without: {figures['batching_throughput_gain']:.2f}")
    access = figures["access_log"]
    print(
        f"uvicorn's access log: {access['cpu_ms_per_request']:+.3f} ms of server CPU per request "
        f"with it on; throughput with it off / on: {access['throughput_gain_off']:.2f}"
    )
    goals = figures["targets"]
    met = {True: "met", False: "missed"}
    print(
        f"targets at concurrency {goals['concurrency']}: "
        f"share of bare >= {TARGET_SHARE:.0%}: {met[goals['share_of_bare']['met']]}; "
        f"p99 <= {TARGET_P99_MS:.0f} ms: {met[goals['p99_ms']['met']]} "
        f"(the bare endpoint's p99 {goals['p99_ms']['bare_endpoint']:.1f} ms); "
        f"p99 under adaptations <= {TARGET_P99_RATIO_UNDER_ADAPTATION:.0f}x: "
        f"{met[goals['p99_ratio_under_adaptation']['met']]}"
    )
    if "profile" in figures:
        profile = figures["profile"]
        print(f"py-spy, {profile['samples']} samples of the service under load:")
        for kind in ("self", "total"):
            print(f"  {kind}: " + "; ".join(f"{n} {share:.0%}" for n, share in profile[kind][:12]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command")
    generate_cmd = commands.add_parser("generate", help="(internal) the load generator")
    generate_cmd.add_argument("url")
    generate_cmd.add_argument("pairs", type=Path)
    generate_cmd.add_argument("--concurrency", type=int, required=True)
    generate_cmd.add_argument("--seconds", type=float, required=True)
    generate_cmd.add_argument("--out", type=Path, required=True, help="where its JSON goes")
    parser.add_argument("--seconds", type=float, default=10.0, help="per run (default 10)")
    parser.add_argument("--levels", default="1,8,32", help="concurrency levels (default 1,8,32)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="alternating rounds of the service and the bare endpoint per level, of seconds / "
        "rounds each (default 5)",
    )
    parser.add_argument("--adapt-every", type=float, default=1.0, help="seconds (default 1)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes, of the service (S2META_WORKERS) and of the bare endpoint alike "
        "(default 1)",
    )
    parser.add_argument(
        "--name", default="serving_load", help="results file name (default serving_load)"
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="the service's S2META_LOG_FORMAT (default: as the environment says, else text); "
        "with the access log on, json makes a JSON line per request",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile the service (py-spy) during one more run at the targets' level",
    )
    args = parser.parse_args()
    if args.command == "generate":
        pairs = json.loads(args.pairs.read_text())
        figures = uvloop.run(generate(args.url, pairs, args.concurrency, args.seconds))
        args.out.write_text(json.dumps(figures))
        return 0

    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    levels = [int(level) for level in args.levels.split(",")]
    if args.log_format is not None:  # the service's processes inherit this environment
        os.environ["S2META_LOG_FORMAT"] = args.log_format
    log_format = Settings().log_format
    access_log = Settings().access_log  # the service's (and the bare endpoint's) setting
    with tempfile.TemporaryDirectory(prefix="s2meta-load-") as scratch:
        root = Path(scratch)
        stack = Stack(root, secrets.token_hex(16))
        bare = None
        try:
            workers = {"S2META_WORKERS": str(args.workers)}
            scenarios = start_lastfm_stack(stack, "serving_load", workers)
            register(stack, scenarios)
            pairs = [[u, s.scenario_id] for s in scenarios for u in s.users]
            pairs_path = root / "pairs.json"
            pairs_path.write_text(json.dumps(pairs))
            bare_port = free_port()
            bare = start_bare(bare_port, root / "bare.log", args.workers, access_log)
            bare_url = f"http://127.0.0.1:{bare_port}"
            print(
                f"serving_load: {len(scenarios)} scenarios of {POOL_RANGE[0]}-{POOL_RANGE[1]} "
                f"candidates, {len(pairs)} (user, scenario) pairs; {args.seconds:.0f} s per run "
                f"({args.rounds} alternating rounds for service and bare); "
                f"{args.workers} server process(es) each; service logs: {log_format}"
            )
            runs = []
            round_s = args.seconds / args.rounds
            targets = {
                "service": (stack.base_url, stack.api.pid),
                "bare FastAPI": (bare_url, bare.pid),
            }
            for level in levels:
                # The two in alternating rounds, so that a change of the machine's speed
                # during the run (seen here: twofold within a minute) falls on both.
                parts: dict[str, list[dict]] = {target: [] for target in targets}
                for _ in range(args.rounds):
                    for target, (url, pid) in targets.items():
                        parts[target].append(run_generator(url, pairs_path, level, round_s, pid))
                for target in targets:
                    figures = summarise(parts[target])
                    runs.append({"target": target, "concurrency": level, **figures})
            stop = threading.Event()
            adapt_ms: list[float] = []
            bodies = [(s.scenario_id, s.body) for s in scenarios]

            def adapt_in_background() -> None:
                adapt_ms.extend(
                    post_adaptations(
                        stack.base_url, stack.admin_token, bodies, args.adapt_every, stop
                    )
                )

            poster = threading.Thread(target=adapt_in_background)
            poster.start()
            checked = TARGET_CONCURRENCY if TARGET_CONCURRENCY in levels else max(levels)
            figures = summarise(
                [run_generator(stack.base_url, pairs_path, checked, args.seconds, stack.api.pid)]
            )
            stop.set()
            poster.join()
            runs.append({"target": "service + adaptations", "concurrency": checked, **figures})
            profile = None
            if args.profile:
                assert stack.api is not None
                profile = profile_during_load(
                    stack.api.pid, stack.base_url, pairs_path, checked, args.seconds + 1,
                    root / "profile.txt",
                )  # fmt: skip
            # The same service with dynamic batching off: each recommend ranked alone.
            stack.stop_api()
            stack.start_api({**workers, "S2META_RECOMMEND_BATCH_MAX": "1"})
            figures = summarise(
                [run_generator(stack.base_url, pairs_path, checked, args.seconds, stack.api.pid)]
            )
            runs.append({"target": "service, batching off", "concurrency": checked, **figures})
            # And with uvicorn's access log the other way round (S2META_ACCESS_LOG), to show
            # what a line per request costs.
            stack.stop_api()
            stack.start_api({**workers, "S2META_ACCESS_LOG": str(not access_log).lower()})
            figures = summarise(
                [run_generator(stack.base_url, pairs_path, checked, args.seconds, stack.api.pid)]
            )
            flipped = flipped_log_target(access_log)
            runs.append({"target": flipped, "concurrency": checked, **figures})
        finally:
            if bare is not None:
                stop_process(bare)
            stack.close()

    by = {(r["target"], r["concurrency"]): r for r in runs}
    report = {
        "seconds_per_run": args.seconds,
        "rounds": args.rounds,
        "scenarios": len(scenarios),
        "pool_range": POOL_RANGE,
        "cpus_seen": os.cpu_count(),
        "workers": args.workers,
        "log_format": log_format,
        "runs": runs,
        "service_share_of_bare": {
            level: by[("service", level)]["requests_per_s"]
            / by[("bare FastAPI", level)]["requests_per_s"]
            for level in levels
        },
        "adaptations_during_load": len(adapt_ms),
        "adapt_ms_median": percentile(adapt_ms, 50),
        "p99_ratio_under_adaptation": by[("service + adaptations", checked)]["ms"]["p99"]
        / by[("service", checked)]["ms"]["p99"],
        "batching_throughput_gain": by[("service", checked)]["requests_per_s"]
        / by[("service, batching off", checked)]["requests_per_s"],
        "access_log": access_log_cost(by, checked, access_log),
        "targets": check_targets(by, checked),
        **({"profile": profile} if profile is not None else {}),
    }
    print_table(report)
    write_report(args.name, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
