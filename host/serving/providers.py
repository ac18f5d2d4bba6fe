"""The provider registry: RDMA providers by name.

It sits above the interface (:mod:`.rdma`) and the implementations (:mod:`.tcp_provider`,
:mod:`.verbs_provider`), so none of them imports the others' factory: no import circle.
``verbs`` imports pyverbs only when it is asked for.
"""
from __future__ import annotations

from .rdma import Provider

__all__ = ["PROVIDERS", "get_provider"]

PROVIDERS = ("tcp", "verbs")


def get_provider(name: str, **kwargs) -> Provider:
    """Instantiate a provider by name (``tcp`` or ``verbs``)."""
    if name == "tcp":
        from .tcp_provider import TcpProvider
        return TcpProvider(**kwargs)
    if name == "verbs":
        from .verbs_provider import VerbsProvider
        return VerbsProvider(**kwargs)
    raise ValueError(f"unknown RDMA provider {name!r}; choose one of {PROVIDERS}")
