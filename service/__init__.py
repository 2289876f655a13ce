"""The online service (FastAPI) that adapts and serves scenarios from a published artifact."""
