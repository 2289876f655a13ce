"""Typed errors of the model package; callers map them to exit codes or HTTP statuses."""


class RecommenderError(Exception):
    """Base class for errors the model package raises on bad input or bad artifacts."""


class ArtifactError(RecommenderError):
    """A meta-learner artifact is missing, partial, corrupt or of an unknown format."""
