"""Which of the project's endpoints answered a request, read from its reply.

A client pointed at the wrong port often gets an answer, just not the one it
wanted: the agent's labeled socket nacks an ``infer`` request, a server
refuses ``list_versions`` with ``bad_kind``. Each endpoint answers in its own
recognisable way, so the client can say which endpoint it reached and which
config key names the one it needs, instead of "expected prediction, got nack".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Role:
    """One kind of endpoint: how to name it, its config key and its default port."""

    name: str
    key: str
    port: int

    def __str__(self) -> str:
        return f"{self.name} ({self.key}, default port {self.port})"


LABELED = Role("the agent's labeled endpoint", "ingest.labeled_endpoint", 5555)
FRAME = Role("the agent's frame endpoint", "ingest.frame_endpoint", 5556)
INFERENCE = Role("a server's inference endpoint", "serve.endpoint", 5558)
CONTROL = Role("the agent's control endpoint", "ingest.control_endpoint", 5559)
FETCH = Role("the agent's fetch endpoint", "repository.fetch_endpoint", 5560)


def answering_role(header: dict) -> Role | None:
    """The endpoint a reply header comes from, when its kind or refusal gives it away; None when unsure."""
    kind, detail = header.get("kind"), str(header.get("detail", ""))
    if kind == "nack":  # only the agent's ingestion sockets nack; their unexpected_kind nack names the socket
        return CONTROL if "on the control socket" in detail else LABELED
    if kind == "ack":
        return LABELED
    if kind in ("versions", "manifest", "model_chunk"):
        return FETCH
    if kind == "prediction":
        return INFERENCE
    if kind == "status":  # the server's status names its model version; the agent's control status has only counters
        return INFERENCE if "model_version" in header else CONTROL
    if kind == "error" and header.get("reason") == "bad_kind":
        if detail.startswith("expected 'infer'"):
            return INFERENCE
        if detail.startswith("expected list_versions"):
            return FETCH
    return None


def wrong_endpoint(endpoint: str, header: dict, wanted: Role) -> str | None:
    """Why ``endpoint`` is not ``wanted``, when its reply ``header`` shows another role; None otherwise."""
    role = answering_role(header)
    if role is None or role == wanted:
        return None
    refusal = ""
    if header.get("kind") in ("nack", "error"):
        refusal = f" ({header.get('reason', '?')}: {str(header.get('detail', ''))[:200]})"
    return (
        f"{endpoint} answered with {header.get('kind')!r}{refusal}: it answers as {role}, "
        f"not {wanted.name}; point this at {wanted.key} (default port {wanted.port})"
    )
