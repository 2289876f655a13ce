"""A shop's path, as the README gives it: its own interaction log (CSV or Parquet) to a
served promotion in three commands (train, publish, serve), then a promotion posted with a
new SKU the artifact has never seen, which is folded in and can be recommended."""

from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import serving

from s2meta.cli import main

USERS, SCENARIOS, ITEMS_PER_SCENARIO, PER_USER = 150, 6, 40, 12
NEW_SKU = "sku-new-0001"


def shop_log(rng: np.random.Generator) -> tuple[dict[str, list], dict[str, list]]:
    """Interactions (user, item, timestamp, weight) and scenario membership (item,
    scenario): each user buys PER_USER items in each of two categories."""
    log: dict[str, list] = {"user": [], "item": [], "timestamp": [], "weight": []}
    for user in range(USERS):
        for category in rng.choice(SCENARIOS, size=2, replace=False):
            first = category * ITEMS_PER_SCENARIO
            for item in rng.choice(ITEMS_PER_SCENARIO, size=PER_USER, replace=False):
                log["user"].append(f"customer-{user}")
                log["item"].append(f"sku-{first + item}")
                log["timestamp"].append(len(log["timestamp"]))
                log["weight"].append(float(rng.integers(1, 4)))
    membership = {
        "item": [f"sku-{item}" for item in range(SCENARIOS * ITEMS_PER_SCENARIO)],
        "scenario": [
            f"category-{item // ITEMS_PER_SCENARIO}"
            for item in range(SCENARIOS * ITEMS_PER_SCENARIO)
        ],
    }
    return log, membership


def write_log(directory: Path, form: str, log: dict[str, list], membership: dict) -> None:
    directory.mkdir()
    for name, columns in (("interactions", log), ("item_scenarios", membership)):
        if form == "parquet":
            pq.write_table(pa.table(columns), directory / f"{name}.parquet")
        else:
            rows = zip(*columns.values(), strict=True)
            lines = [",".join(columns), *(",".join(map(str, row)) for row in rows)]
            (directory / f"{name}.csv").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("form", ["csv", "parquet"])
def test_a_shop_log_becomes_a_served_promotion(form, tmp_path, capsys):
    log, membership = shop_log(np.random.default_rng(7))
    write_log(tmp_path / "shop", form, log, membership)
    small = ["--min-pool-items", "20", "--min-interactions", "100", "--support-size", "16"]
    budget = ["--meta-steps", "2", "--meta-batch", "2", "--embedding-dim", "8"]
    cache = ["--cache-dir", str(tmp_path / "cache")]
    data = ["--data", str(tmp_path / "shop")]
    assert main(["train", *data, "--out", str(tmp_path / "artifact"), *small, *budget, *cache]) == 0
    capsys.readouterr()
    assert main(["publish", str(tmp_path / "artifact"), "--registry", str(tmp_path / "reg")]) == 0
    assert capsys.readouterr().out.strip() == "v0001"

    # A promotion over category 0's items and a SKU launched with it, which two customers
    # who bought in category 0 have already bought.
    promoted = [i for i, s in zip(*membership.values(), strict=True) if s == "category-0"]
    buyers = sorted({u for u, i in zip(log["user"], log["item"], strict=True) if i in promoted})
    interactions = [
        {"user": u, "item": i}
        for u, i in zip(log["user"], log["item"], strict=True)
        if i in promoted and u in buyers[:8]
    ]
    interactions += [{"user": u, "item": NEW_SKU} for u in buyers[:2]]
    body = {"interactions": interactions, "candidates": [*promoted, NEW_SKU]}
    env = {"S2META_REGISTRY": str(tmp_path / "reg")}
    with serving(env, tmp_path / "serve.log") as base:
        adapted = httpx.post(f"{base}/scenarios/promo/adapt", json=body, timeout=60)
        assert adapted.status_code == 200, adapted.text
        assert adapted.json()["folded_in"]["items"] == [NEW_SKU]
        assert adapted.json()["ignored"] == {"unknown_users": [], "unknown_items": []}
        params = {"user": buyers[-1], "scenario": "promo", "n": len(promoted) + 1}
        served = httpx.get(f"{base}/recommend", params=params, timeout=10).json()
        assert served["source"] == "adapted"
        assert NEW_SKU in {entry["item"] for entry in served["items"]}
