"""The executor interface: how the server runs jobs without knowing where (local child processes, Ray actors).

The server marks a job running and calls :meth:`Executor.start`; the executor reports what
happens as :class:`WorkerEvent` objects from :meth:`Executor.poll`, which the server
stores and fans out to subscribed clients.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from engine_server.service.jobs import Job


@dataclass
class WorkerEvent:
    """Something an executor reports about a job: a protocol event plus its fields.

    ``type``: progress | preview | mesh (fields as the protocol message: stage, step,
    total, loss, eta_s / image / vertices, faces, uvs, texture, final) or the end:
    done (the result is already stored with ``JobStore.write_result``), failed (code,
    message), cancelled; or ``lost`` (code, message): the process running the job died
    (killed, out of host memory, crashed), so the job did not end by itself. The server
    then queues it again to resume from its checkpoint, up to its attempt limit, and
    fails it with the code and message after that; ``lost`` never reaches a client.
    """

    job_id: str
    """The job."""
    type: str
    """Event type (protocol.EVENT_TYPES)."""
    fields: dict[str, Any] = field(default_factory=dict)
    """Event fields, blobs as protocol Array / Image or numpy arrays."""


class Executor(Protocol):
    """What the server needs from the worker side: :class:`~engine_server.service.worker.LocalWorker` (child
    processes) or :class:`~engine_server.service.ray_executor.RayExecutor` (actors on a Ray cluster)."""

    def capacity(self) -> int:
        """How many more jobs could start now (0 while every device is busy)."""

    def start(self, job: Job) -> None:
        """Begin running a job the server has just marked running; returns at once."""

    def cancel(self, job_id: str) -> None:
        """End a running job within a second (its ``cancelled`` event follows); returns at once."""

    def poll(self) -> list[WorkerEvent]:
        """Events since the last call, without blocking."""

    def close(self) -> None:
        """Stop every job (they resume from their checkpoints at the next start)."""
