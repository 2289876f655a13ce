"""`s2meta serve`: the service from settings (environment, prefix S2META_)."""

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from service.app import create_app
from service.learners import resolve_device
from service.metrics import MULTIPROC_DIR
from service.observability import logging_config
from service.retrieval import make_retriever
from service.settings import Settings
from service.tracing import require_sdk

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="s2meta serve",
        description="Serve adapt/recommend over HTTP. Settings come from the environment: "
        "S2META_REGISTRY (registry directory), S2META_REDIS_URL (unset: in-process store), "
        "S2META_ADMIN_TOKEN (unset: admin routes open), and the others in docs/configuration.md.",
    )
    parser.add_argument("--host", help="bind address (default $S2META_HOST, else 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default $S2META_PORT, else 8000)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as error:
        problems = "; ".join(
            f"S2META_{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in error.errors()
        )
        print(f"s2meta serve: error: invalid settings: {problems}", file=sys.stderr)
        return EXIT_USAGE
    try:
        device = resolve_device(settings.device)
        make_retriever(
            settings.faiss_index, settings.faiss_search, settings.faiss_min_pool, device
        ).check()
        require_sdk(settings.otel_exporter)
    except (ValueError, RuntimeError) as error:
        print(f"s2meta serve: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if not settings.registry.is_dir():
        print(
            f"s2meta serve: error: S2META_REGISTRY={settings.registry}: not a directory",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if settings.workers > 1 and settings.redis_url is None:
        print(
            f"s2meta serve: error: S2META_WORKERS={settings.workers} needs S2META_REDIS_URL: "
            "worker processes share scenarios through Redis only",
            file=sys.stderr,
        )
        return EXIT_USAGE
    # uvicorn applies it (dictConfig) in this process and in each worker process.
    log_config = logging_config(settings.log_format, args.log_level)
    made_metrics_dir = settings.workers > 1 and prepare_multiprocess_metrics()
    try:
        # An import string and a factory: with several workers each process builds its own
        # app (its own event loop, store connections and cache) from the same settings.
        uvicorn.run(
            "service.cli:worker_app",
            factory=True,
            workers=settings.workers,
            host=args.host or settings.host,
            port=args.port or settings.port,
            log_level=args.log_level,
            log_config=log_config,
            access_log=settings.access_log,
        )
    finally:
        if made_metrics_dir:
            shutil.rmtree(os.environ.pop(MULTIPROC_DIR))
    return 0


def prepare_multiprocess_metrics() -> bool:
    """Where the workers write their metrics: PROMETHEUS_MULTIPROC_DIR if set (emptied of a
    previous run's files, as prometheus_client requires), else a new temporary directory.
    Set in the environment before the workers start, which read it when they import
    prometheus_client. True if the directory was made here (and is to be removed)."""
    if MULTIPROC_DIR in os.environ:
        where = Path(os.environ[MULTIPROC_DIR])
        where.mkdir(parents=True, exist_ok=True)
        for stale in where.glob("*.db"):
            stale.unlink()
        return False
    os.environ[MULTIPROC_DIR] = tempfile.mkdtemp(prefix="s2meta-metrics-")
    return True


def worker_app() -> FastAPI:
    """The app of one server process (uvicorn's factory), from the environment's settings,
    which `main` has checked."""
    settings = Settings()
    # Splitting a recommend's small products over threads costs more than it saves, and the
    # threads contend with the event loop (docs/performance.md).
    torch.set_num_threads(settings.torch_threads)
    return create_app(settings)
