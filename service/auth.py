"""Bearer-token checks of the routes: the admin token for writes, the optional read token for
reads. Tokens are compared in constant time and never logged."""

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

bearer = HTTPBearer(
    auto_error=False,
    description="the admin token (S2META_ADMIN_TOKEN), or for the read routes the read token "
    "(S2META_READ_TOKEN) when one is set",
)


def _authorise(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None,
    accepted: list[SecretStr],
    role: str,
) -> None:
    """Let the request through if it carries one of the accepted bearer tokens; count and
    refuse it otherwise."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        request.app.state.metrics.auth_failures.labels(role=role, reason="missing").inc()
        raise HTTPException(
            401,
            f"{role} token required (Authorization: Bearer <token>)",
            {"WWW-Authenticate": "Bearer"},
        )
    given = credentials.credentials.encode()
    # Every token is compared (no early exit), so timing says nothing about which matched.
    matches = [
        secrets.compare_digest(given, token.get_secret_value().encode()) for token in accepted
    ]
    if not any(matches):
        request.app.state.metrics.auth_failures.labels(role=role, reason="wrong").inc()
        raise HTTPException(403, f"{role} token not accepted")


# The dependencies are coroutines although they do no I/O: FastAPI runs a plain function
# dependency on a worker thread, a thread hop per request for nothing.
async def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    token = request.app.state.settings.admin_token
    if token is not None:
        _authorise(request, credentials, [token], "admin")


async def require_reader(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """The read routes are open unless a read token is set; the admin token reads too."""
    settings = request.app.state.settings
    if settings.read_token is not None:
        accepted = [settings.read_token, *([settings.admin_token] if settings.admin_token else [])]
        _authorise(request, credentials, accepted, "read")


admin = [Depends(require_admin)]
reader = [Depends(require_reader)]
# The read routes need a token only when S2META_READ_TOKEN is set: in OpenAPI terms the bearer
# scheme or nothing (an empty requirement), appended to the one FastAPI derives from `bearer`.
optional_auth = {"security": [{}]}
