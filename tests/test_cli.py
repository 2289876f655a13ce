"""`s2meta` in-process: prepare (with its cache), evaluate (results.json/.md) and the
contract for bad input: exit code 2, one 's2meta: error: ...' line, no results written."""

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import DATA

from meta_training.cli import _parser, main
from meta_training.cli_options import training_config as _training
from meta_training.config import MetaTrainConfig

LASTFM = DATA / "LastFM"
METRIC_NAMES = {f"{name}@{n}" for name in ("recall", "ndcg") for n in (10, 20, 50)}
METHODS = ["random", "itempop", "mf_dot"]


@pytest.fixture(autouse=True)
def no_default_cache(tmp_path, monkeypatch):
    """Every command here passes --cache-dir; the default location must stay untouched."""
    default = tmp_path / "default-cache"
    monkeypatch.setenv("S2META_CACHE_DIR", str(default))
    yield
    assert not default.exists()


@pytest.fixture(scope="module")
def lastfm_tabular(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "lastfm-tab"
    assert main(["export-tabular", "--data", str(LASTFM), "--out", str(out)]) == 0
    return out


def error_line(stderr: str) -> str:
    """The one error line (progress bars share stderr, separated by carriage returns)."""
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("s2meta:")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("s2meta: error: ")
    assert stderr.endswith(lines[0] + "\n")
    return lines[0]


def expected_lastfm_scenarios() -> int:
    """Scenarios with 100..1000 pool items and >= 500 interactions, from the raw files."""
    counts: dict[str, int] = {}
    for line in (DATA / "LastFM.txt").read_text().splitlines():
        _, *items = line.split()
        for item in set(items):
            counts[item] = counts.get(item, 0) + 1
    pools: dict[str, set[str]] = {}
    for item, attributes in json.loads((DATA / "LastFM_item2attributes.json").read_text()).items():
        for attribute in attributes:
            pools.setdefault(str(attribute), set()).add(item)
    return sum(
        1
        for pool in pools.values()
        if 100 <= len(pool) <= 1000 and sum(counts.get(item, 0) for item in pool) >= 500
    )


# ---------------------------------------------------------------------------- prepare

SPLITS = re.compile(
    r"scenarios: meta-train (\d+), meta-valid (\d+), meta-test (\d+), dropped (\d+)"
)


def test_prepare_prints_summary_then_loads_from_cache(tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = ["prepare", "--data", str(LASTFM), "--cache-dir", str(cache)]

    assert main(argv) == 0
    first = capsys.readouterr().out
    header = first.splitlines()[0]
    assert header.startswith(f"LastFM (seed 0): built at {cache / 'LastFM-seed0-'}")
    assert "loaded from cache" not in first
    assert "users 1,090  items 3,646  interactions 52,551" in first
    train, valid, test, dropped = map(int, SPLITS.search(first).groups())
    assert min(train, valid, test) >= 1
    assert train > test > 0 and train > valid
    assert train + valid + test + dropped == expected_lastfm_scenarios() == 114
    cache_dirs = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(cache_dirs) == 1 and (cache_dirs[0] / "manifest.json").is_file()

    assert main(argv) == 0
    second = capsys.readouterr().out
    assert second.splitlines()[0] == f"LastFM (seed 0): loaded from cache at {cache_dirs[0]}"
    # The summary is the same whether built or loaded.
    assert second.splitlines()[1:] == first.splitlines()[1:]

    # Another seed is another benchmark: built, not loaded.
    assert main([*argv, "--seed", "1"]) == 0
    third = capsys.readouterr().out
    assert third.splitlines()[0].startswith(f"LastFM (seed 1): built at {cache / 'LastFM-seed1-'}")


def test_prepare_unknown_data_path(tmp_path, capsys):
    missing = tmp_path / "no-such-data"
    cache = tmp_path / "cache"
    assert main(["prepare", "--data", str(missing), "--cache-dir", str(cache)]) == 2
    captured = capsys.readouterr()
    assert str(missing) in error_line(captured.err)
    assert captured.out == ""
    assert not cache.exists()


# ---------------------------------------------------------------------------- evaluate


def evaluate_argv(data: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["evaluate", "--data", str(data), "--out", str(out), "--cache-dir", str(cache), *extra]


def assert_counts(counts, seeds: int) -> None:
    """Counts are numbers, and per-seed counts (the key names are the evaluator's) have
    one positive entry per seed."""
    assert isinstance(counts, dict) and counts
    per_seed = {key: value for key, value in counts.items() if key.endswith("per_seed")}
    assert per_seed, counts
    for key, value in counts.items():
        if key in per_seed:
            assert len(value) == seeds and all(v > 0 for v in value), (key, value)
        else:
            assert isinstance(value, int | float) and value > 0, (key, value)


def test_evaluate_writes_results(lastfm_tabular, tmp_path, capsys):
    out = tmp_path / "out"
    argv = evaluate_argv(
        lastfm_tabular, out, tmp_path / "cache", "--seeds", "1", "--methods", ",".join(METHODS)
    )
    assert main(argv) == 0
    stdout = capsys.readouterr().out

    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"dataset", "seeds", "counts", "methods"}
    assert results["dataset"] == lastfm_tabular.name
    assert results["seeds"] == [0]
    assert_counts(results["counts"], seeds=1)

    assert list(results["methods"]) == METHODS
    for method, metrics in results["methods"].items():
        assert set(metrics) == METRIC_NAMES, method
        for name, value in metrics.items():
            mean, (lo, hi) = value["mean"], value["ci95"]
            assert isinstance(mean, float), (method, name)
            assert 0.0 <= lo <= mean <= hi <= 1.0, (method, name, value)
        # Recall can only grow with the cutoff.
        assert metrics["recall@10"]["mean"] <= metrics["recall@20"]["mean"]
        assert metrics["recall@20"]["mean"] <= metrics["recall@50"]["mean"]

    markdown = (out / "results.md").read_text()
    for method in METHODS:
        assert re.search(rf"^\| {method} \|", markdown, re.MULTILINE), method
    assert markdown in stdout
    assert str(out / "results.json") in stdout


def test_evaluate_seed_list(lastfm_tabular, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = evaluate_argv(lastfm_tabular, out, cache, "--seeds", "0,2", "--methods", "random")
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 2]
    assert_counts(results["counts"], seeds=2)
    assert list(results["methods"]) == ["random"]
    prepared = sorted(p.name.split("-")[2] for p in cache.iterdir() if not p.name.startswith("."))
    assert prepared == ["seed0", "seed2"]


# ---------------------------------------------------------------------------- bad input


def assert_rejected(argv: list[str], out: Path, capsys) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = error_line(captured.err)
    assert not (out / "results.json").exists()
    assert not (out / "results.md").exists()
    return line


def test_evaluate_unknown_data_path(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "LastFM"
    out = tmp_path / "out"
    line = assert_rejected(evaluate_argv(missing, out, tmp_path / "cache"), out, capsys)
    assert str(missing) in line


def test_evaluate_settings_leave_no_scenario(lastfm_tabular, tmp_path, capsys):
    out = tmp_path / "out"
    argv = evaluate_argv(
        lastfm_tabular, out, tmp_path / "cache", "--seeds", "1", "--min-interactions", "10000000"
    )
    line = assert_rejected(argv, out, capsys)
    assert "min_interactions" in line


def test_evaluate_min_pool_above_max_pool(lastfm_tabular, tmp_path, capsys):
    out = tmp_path / "out"
    argv = evaluate_argv(
        lastfm_tabular,
        out,
        tmp_path / "cache",
        "--min-pool-items",
        "500",
        "--max-pool-items",
        "100",
    )
    line = assert_rejected(argv, out, capsys)
    assert "min_pool_items" in line and "max_pool_items" in line


@pytest.mark.parametrize(
    ("flag", "setting"),
    [
        ("--support-size", "support_size"),
        ("--meta-steps", "iterations"),
        ("--adapt-max-steps", "learner.max_steps"),
    ],
)
def test_evaluate_invalid_setting_value(lastfm_tabular, tmp_path, capsys, flag, setting):
    out, cache = tmp_path / "out", tmp_path / "cache"
    line = assert_rejected(evaluate_argv(lastfm_tabular, out, cache, flag, "0"), out, capsys)
    assert setting in line
    assert not cache.exists()


@pytest.mark.parametrize("methods", ["random,bogus", ",", "MF_DOT"])
def test_evaluate_unknown_method(lastfm_tabular, tmp_path, capsys, methods):
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = evaluate_argv(lastfm_tabular, out, cache, "--seeds", "1", "--methods", methods)
    line = assert_rejected(argv, out, capsys)
    assert "--methods" in line
    for name in methods.split(","):
        if name and name != "random":
            assert name in line
    # Settings are checked before any (slow) preparation.
    assert not cache.exists()


@pytest.mark.parametrize("seeds", ["abc", "0", "-1", "1,1", "2.5", "0,-1", "0;1"])
def test_evaluate_bad_seeds(lastfm_tabular, tmp_path, capsys, seeds):
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = evaluate_argv(lastfm_tabular, out, cache, "--seeds", seeds, "--methods", "random")
    line = assert_rejected(argv, out, capsys)
    assert "--seeds" in line and repr(seeds) in line
    assert not cache.exists()


def test_evaluate_tabular_bad_timestamp(lastfm_tabular, tmp_path, capsys):
    # (An item named only in item_scenarios.csv is a cold item now, not an error.)
    data = tmp_path / "broken-tab"
    shutil.copytree(lastfm_tabular, data)
    interactions = data / "interactions.csv"
    with interactions.open("a", encoding="utf-8") as handle:
        handle.write("some-user,some-item,yesterday\n")
    bad_line = len(interactions.read_text(encoding="utf-8").splitlines())
    out = tmp_path / "out"
    line = assert_rejected(
        evaluate_argv(data, out, tmp_path / "cache", "--seeds", "1"), out, capsys
    )
    assert f"{interactions}:{bad_line}:" in line
    assert "yesterday" in line


def test_export_tabular_bad_input_writes_nothing(tmp_path, capsys):
    missing = tmp_path / "missing-stem"
    out = tmp_path / "out"
    assert main(["export-tabular", "--data", str(missing), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert str(missing) in error_line(captured.err)
    assert captured.out == ""
    assert not out.exists()


def test_evaluate_non_utf8_input(tmp_path, capsys):
    data = tmp_path / "latin1-tab"
    data.mkdir()
    (data / "interactions.csv").write_bytes("user,item\nu-a,café\n".encode("latin-1"))
    (data / "item_scenarios.csv").write_text("item,scenario\ncafé,s\n", encoding="utf-8")
    out = tmp_path / "out"
    line = assert_rejected(
        evaluate_argv(data, out, tmp_path / "cache", "--seeds", "1"), out, capsys
    )
    assert str(data / "interactions.csv") in line


# ---------------------------------------------------------------------------- step flags

COMMANDS = [["train", "--out", "artifact"], ["evaluate", "--out", "results"]]


def training_of(command: list[str], *flags: str) -> MetaTrainConfig:
    return _training(_parser().parse_args([*command, "--data", "LastFM", *flags]))


@pytest.mark.parametrize("command", COMMANDS)
def test_step_flags_set_meta_training_and_adaptation_steps(command, capsys):
    config = training_of(
        command, "--meta-steps", "7", "--adapt-max-steps", "9", "--adapt-min-steps", "2"
    )
    assert (config.iterations, config.valid_every) == (7, 7)
    assert (config.learner.max_steps, config.learner.min_steps) == (9, 2)
    assert training_of(command) == MetaTrainConfig()
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("command", COMMANDS)
def test_max_steps_is_a_deprecated_alias_of_meta_steps(command, capsys):
    config = training_of(command, "--max-steps", "7")
    assert config.iterations == 7
    assert config.learner.max_steps == MetaTrainConfig().learner.max_steps
    assert capsys.readouterr().err == (
        "s2meta: warning: --max-steps is deprecated, use --meta-steps\n"
    )


@pytest.mark.parametrize(
    "order", [["--meta-steps", "7", "--max-steps", "7"], ["--max-steps", "7", "--meta-steps", "8"]]
)
def test_meta_steps_and_its_alias_together_are_refused(order, capsys):
    with pytest.raises(SystemExit) as exit_info:
        training_of(COMMANDS[0], *order)
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
