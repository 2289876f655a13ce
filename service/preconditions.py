"""Conditional requests on a scenario (RFC 9110, 13.1.1): its ETag is its revision, and
`If-Match` on a write holds the write to the revisions it names."""

from dataclasses import dataclass

from service.errors import RevisionMismatchError


def etag(revision: int) -> str:
    """A scenario revision's strong entity tag."""
    return f'"{revision}"'


@dataclass(frozen=True)
class IfMatch:
    """A parsed If-Match header: `revisions` None for `*` (any stored revision)."""

    header: str
    revisions: frozenset[int] | None

    def require(self, current: int | None) -> None:
        """Raise RevisionMismatchError unless the scenario's current revision (None: absent)
        satisfies the header."""
        if current is not None and (self.revisions is None or current in self.revisions):
            return
        stored = "absent" if current is None else f"at revision {current}"
        raise RevisionMismatchError(f"If-Match {self.header}: the scenario is {stored}")


def parse_if_match(header: str | None) -> IfMatch | None:
    """None without the header. A tag that is not a quoted revision (a weak tag, say) matches
    nothing: If-Match compares strongly, and this server issues no other tags."""
    if header is None:
        return None
    if header.strip() == "*":
        return IfMatch(header, None)
    revisions = set()
    for tag in header.split(","):
        tag = tag.strip()
        if len(tag) > 2 and tag[0] == tag[-1] == '"' and tag[1:-1].isdigit():
            revisions.add(int(tag[1:-1]))
    return IfMatch(header, frozenset(revisions))
