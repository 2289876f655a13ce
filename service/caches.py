"""What a replica holds between requests: which scenario revisions are current without asking
the store (`RevisionWatch`), and the adapted recommenders by revision (`RecommenderCache`)."""

import threading
from collections import OrderedDict

from service.recommenders import AdaptedRecommender


class RevisionWatch:
    """Which scenarios' current revisions this replica knows without asking the store.

    Only while the store's event subscription is live: a revision read after it went live
    stays current until the store announces a write or delete of that scenario (the store
    announces each in the same atomic step as the write). A read that an announcement
    overtook is not recorded. While the subscription is down nothing is known, and every
    request asks the store. Used from the event loop only.
    """

    def __init__(self) -> None:
        self._epoch = 0  # changes whenever the subscription goes live or is lost
        self._live = False
        self._announcements: dict[str, int] = {}  # per scenario, in this epoch
        self._known: dict[str, int] = {}

    def went_live(self) -> None:
        self._epoch += 1
        self._live = True
        self._announcements.clear()
        self._known.clear()

    def lost(self) -> None:
        self._epoch += 1
        self._live = False
        self._known.clear()

    def announced(self, scenario_id: str) -> None:
        self._announcements[scenario_id] = self._announcements.get(scenario_id, 0) + 1
        self._known.pop(scenario_id, None)

    def before_read(self, scenario_id: str) -> tuple[int, int]:
        """A ticket to pass to `read` with the revision then read from the store."""
        return self._epoch, self._announcements.get(scenario_id, 0)

    def read(self, scenario_id: str, ticket: tuple[int, int], revision: int) -> None:
        if self._live and ticket == self.before_read(scenario_id):
            self._known[scenario_id] = revision

    def current(self, scenario_id: str) -> int | None:
        return self._known.get(scenario_id) if self._live else None


class RecommenderCache:
    """Adapted recommenders by (scenario, revision), least recently used dropped first.
    A new revision is a new key, so a replica never serves a stale one once it has read the
    revision from the store."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, int], AdaptedRecommender] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, scenario_id: str, revision: int) -> AdaptedRecommender | None:
        with self._lock:
            entry = self._entries.get((scenario_id, revision))
            if entry is not None:
                self._entries.move_to_end((scenario_id, revision))
            return entry

    def put(self, recommender: AdaptedRecommender) -> None:
        with self._lock:
            held = [k for k in self._entries if k[0] == recommender.scenario_id]
            if any(revision > recommender.revision for _, revision in held):
                return  # built from a read that a newer revision has overtaken
            for key in held:
                del self._entries[key]
            self._entries[(recommender.scenario_id, recommender.revision)] = recommender
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def latest(self, scenario_id: str) -> AdaptedRecommender | None:
        """The newest revision held for a scenario, if any."""
        with self._lock:
            held = [entry for key, entry in self._entries.items() if key[0] == scenario_id]
        return max(held, key=lambda entry: entry.revision, default=None)

    def drop(self, scenario_id: str) -> None:
        with self._lock:
            for key in [k for k in self._entries if k[0] == scenario_id]:
                del self._entries[key]

    def versions(self) -> set[str]:
        with self._lock:
            return {entry.meta_learner for entry in self._entries.values()}
