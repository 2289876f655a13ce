"""The compiled adaptation step in the service: compiled in the background once a meta learner
loads, while the eager step serves, so that no request waits for a compile and readiness
does not wait for one either (docs/performance.md).

Compiled graphs belong to a learner configuration (its recommender, controllers and step
bounds), not to a version's weights: a version whose configurations are already warm
adapts compiled at once. A graph is specialised to the scenario batch (torch's vmap fixes
it) and to torch's thread count, so adaptations run in batches of the sizes warmed, 1 and
S2META_READAPT_BATCH (`chunks`), each on the thread count it was warmed with; the tables' row
counts are dynamic (model/inner_loss.py).
"""

import gc
import logging
import threading
import time
from collections.abc import Sequence
from typing import TypeVar

import torch

from model.learner_config import LearnerConfig
from model.warm_up import warm_up_adaptation
from service.learners import LoadedVersion
from service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

T = TypeVar("T")


class StepCompiler:
    """Which learner configurations adapt compiled, and their warm-up on a thread of its own
    (one version at a time, in the order loaded). Thread-safe."""

    def __init__(
        self,
        enabled: bool,
        batch_size: int,
        threads: tuple[int, int],
        metrics: ServiceMetrics,
    ) -> None:
        """threads: torch's thread count of a request's adaptation and of a re-adaptation
        batch; a graph is compiled for each (batch size, thread count) the service runs."""
        self.enabled = enabled
        self.batch_size = batch_size
        request, reload = threads
        # A request adapts one scenario; a re-adaptation full batches and single remainders.
        self.plan = sorted({(1, request), (1, reload), (batch_size, reload)})
        self.metrics = metrics
        self._warm: set[LearnerConfig] = set()
        self._failed: set[LearnerConfig] = set()
        self._queue: list[LoadedVersion] = []
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._shown: LoadedVersion | None = None  # the version the gauge describes

    def compiled(self, config: LearnerConfig) -> bool:
        """Whether adaptations of `config` run the compiled step (warmed up)."""
        with self._lock:
            return config in self._warm

    def settled(self, loaded: LoadedVersion) -> bool:
        """Every configuration of `loaded` is warm, failed, or will not be compiled."""
        if not self.enabled:
            return True
        with self._lock:
            return all(
                learner.config in self._warm or learner.config in self._failed
                for learner in loaded.artifact.learners.values()
            )

    def warm(self, loaded: LoadedVersion) -> None:
        """Compile `loaded`'s configurations in the background (those not yet warm); the
        s2meta_adaptation_compiled gauge says, per variant of the latest version given, when
        each is."""
        self._shown = loaded
        self._show()
        if not self.enabled or self.settled(loaded):
            return
        with self._lock:
            if self._stopping:
                return
            self._queue.append(loaded)
            self._idle.clear()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="compile-adaptation", daemon=True
                )
                self._thread.start()

    def wait(self, timeout_s: float) -> bool:
        """Block until no warm-up is queued or running; False on timeout."""
        return self._idle.wait(timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Start no more warm-ups; give a running one `timeout_s` to end (a compile cannot be
        interrupted: the thread is a daemon, and exits with the process)."""
        with self._lock:
            self._stopping = True
            self._queue.clear()
            thread = self._thread
        self._idle.set()  # wakes whoever waits
        if thread is not None:
            thread.join(timeout_s)

    def chunks(self, config: LearnerConfig, items: Sequence[T]) -> list[tuple[bool, list[T]]]:
        """`items` (scenarios of one learner) in the batches they adapt in, each with whether
        it runs compiled: eager, all at once; compiled, batches of `batch_size` and a
        remainder padded to it with repeats of its last item when it is over half of it
        (the caller drops the repeats' results), else adapted one at a time."""
        if not self.compiled(config):
            return [(False, list(items))]
        size = self.batch_size
        full = len(items) - len(items) % size
        batches = [(True, list(items[start : start + size])) for start in range(0, full, size)]
        rest = list(items[full:])
        if len(rest) * 2 > size:
            batches.append((True, rest + [rest[-1]] * (size - len(rest))))
        else:
            batches.extend((True, [item]) for item in rest)
        return batches

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._queue or self._stopping:
                    self._idle.set()
                    self._thread = None
                    return
                loaded = self._queue.pop(0)
            self._warm_up(loaded)

    def _warm_up(self, loaded: LoadedVersion) -> None:
        # The default variant first: most adaptations use it.
        learners = sorted(
            loaded.artifact.learners.items(),
            key=lambda pair: pair[0] != loaded.artifact.default_variant,
        )
        for variant, learner in learners:
            with self._lock:
                if self._stopping:
                    return
                if learner.config in self._warm or learner.config in self._failed:
                    continue
            start = time.perf_counter()
            try:
                for size, threads in self.plan:
                    torch.set_num_threads(threads)  # this thread's own (OpenMP's is per thread)
                    warm_up_adaptation(learner.meta, learner.config, loaded.tables, [size])
            except Exception:
                # No compiler in the image, say: the eager step goes on serving, said once.
                logger.exception(
                    "compiling the adaptation step of %s (%s) failed: it adapts eagerly",
                    loaded.version,
                    variant,
                )
                with self._lock:
                    self._failed.add(learner.config)
                self.metrics.adaptation_compile_failures.labels(variant=variant).inc()
                continue
            with self._lock:
                self._warm.add(learner.config)
            logger.info(
                "adaptation step of %s (%s) compiled in %.1f s",
                loaded.version,
                variant,
                time.perf_counter() - start,
            )
            self._show()
        # The compiled graphs live as long as the process: out of the collector's sight, as
        # start-up's objects are (service/app.py).
        gc.freeze()

    def _show(self) -> None:
        loaded = self._shown
        if loaded is None:
            return
        for variant, learner in loaded.artifact.learners.items():
            self.metrics.adaptation_compiled.labels(variant=variant).set(
                1 if self.compiled(learner.config) else 0
            )
