"""The Lattice checkpoint service: an HTTP server storing checkpoints per job under one root.

``lattice checkpoint-service serve --root DIR --token-file F`` runs it (:mod:`.cli`); the API
is in :mod:`.server` and ``docs/service-openapi.yaml``, the on-disk layout in :mod:`.layout`,
name validation in :mod:`.names`. Clients use the ``lattice://host:port/job`` store.
"""

from __future__ import annotations

__all__ = ["ServiceConfig", "create_app"]


def __getattr__(name: str) -> object:  # aiohttp is imported only when the service is used
    if name in __all__:
        from . import server

        return getattr(server, name)
    raise AttributeError(name)
