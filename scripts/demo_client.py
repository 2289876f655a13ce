"""The main job's last leg, as a client of the running service (s2meta.client): take a
meta-test scenario of the benchmark the artifact was trained on, register its support
interactions and pool (POST /scenarios/{id}/adapt), and print the top-n of GET /recommend for
one of its evaluation users, marking the items that user really chose (their held-out ground
truth)."""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from meta_training.config import Settings
from meta_training.prepare import prepare_for_artifact
from meta_training.protocol import ground_truth
from s2meta.client import Client, ProblemError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--artifact", type=Path, required=True, help="the published artifact")
    parser.add_argument("--data", type=Path, required=True, help="the dataset it was trained on")
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--token", default=None, help="the admin token, if the service has one")
    args = parser.parse_args()
    # Adapting a LastFM scenario on a busy CPU can take minutes.
    with Client(args.url, token=args.token, timeout=600) as client:
        try:
            demo(client, args.artifact, args.data, args.n)
        except ProblemError as error:
            sys.exit(f"demo: {error.instance}: {error} (request id {error.request_id})")


def demo(client: Client, artifact: Path, data_dir: Path, n: int) -> None:
    metrics = json.loads((artifact / "metrics.json").read_text())
    print("demo: loading the benchmark the meta learner was trained on (cached) ...", flush=True)
    benchmark = prepare_for_artifact(metrics, data_dir, Settings().cache_dir).benchmark
    data = benchmark.data
    if not benchmark.test:
        sys.exit(
            f"demo: {artifact} was trained under the {metrics['protocol']['kind']} "
            "protocol, which holds no meta-test scenario out; train with --protocol evaluation"
        )
    task = benchmark.test[0]  # a meta-test scenario: never seen by pretraining or training
    interactions = [
        (data.user_ids[data.users[r]], data.item_ids[data.items[r]]) for r in task.support_rows
    ]
    candidates = [data.item_ids[i] for i in task.pool]
    print(
        f"demo: POST /scenarios/{task.scenario_id}/adapt with {len(interactions)} interactions "
        f"and a pool of {len(candidates)} items ...",
        flush=True,
    )
    adapted = client.adapt(task.scenario_id, interactions, candidates)
    print(
        f"demo: adapted revision {adapted.revision} with meta learner "
        f"{adapted.meta_learner} ({adapted.variant}): {adapted.steps} steps, stopped by "
        f"{adapted.stopped_by}, training loss {adapted.train_loss[0]:.3f} -> "
        f"{adapted.train_loss[-1]:.3f}, {adapted.duration_ms:.0f} ms"
    )
    users, truth = ground_truth(benchmark, task)
    user_row = int(users[np.argmax(truth.sum(axis=1))])  # the user with most held-out items
    user = data.user_ids[user_row]
    chosen = {data.item_ids[task.pool[k]] for k in np.flatnonzero(truth[users == user_row][0])}
    served = client.recommend(task.scenario_id, user, n=n)
    print(f"demo: GET /recommend for user {user} of scenario {task.scenario_id}, n={n}")
    print(f"top-{n} for user {user} ({served.source}; * = an item they chose):")
    for rank, entry in enumerate(served.items, 1):
        mark = "*" if entry.item in chosen else " "
        print(f"  {rank:>2}. {mark} item {entry.item:<12} score {entry.score:.4f}")
    hits = sum(entry.item in chosen for entry in served.items)
    print(f"demo: {hits} of the user's {len(chosen)} held-out items in the top {n}")


if __name__ == "__main__":
    main()
