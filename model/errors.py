"""Typed errors of the model package; callers map them to exit codes or HTTP statuses."""

from pydantic import ValidationError


class RecommenderError(Exception):
    """Base class for errors the model package raises on bad input or bad artifacts."""


class ArtifactError(RecommenderError):
    """A meta-learner artifact is missing, partial, corrupt or of an unknown format."""


def settings_problems(error: ValidationError) -> str:
    """What a command line says of invalid settings: each field's path and message."""
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors()
    )
