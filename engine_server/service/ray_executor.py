"""The executor on a Ray cluster: one warm actor per GPU (or per CPU slot), the same runner as the local child.

:class:`RayExecutor` is the server's :class:`~engine_server.service.executor.Executor` for
``engine-server serve --executor ray``. The cluster is started with Ray's own commands
(``ray start --head``, ``ray start --address=...``); the server connects to it as a driver
and creates its actors, Ray places them. Each :class:`JobActor` holds an
:class:`~engine_server.service.runner.EngineRunner` whose priors stay loaded between jobs
and runs one job at a time through :func:`~engine_server.service.worker.run_job`, exactly
as the local child does, so the server cannot tell the two executors apart:

- events: :meth:`JobActor.run` is a streaming generator; each progress / preview /
  intermediate mesh it yields reaches the server as it happens (a reader thread per job
  takes them off the generator). Small arrays and PNGs travel through Ray's object
  store; the final result is written by the actor into the job folder
  (``write_result``) and the server reads it from there, as with the local worker.
- storage: job folders, checkpoints included, live in the server's job store folder,
  which every node must mount at the same path (NFS or similar): a job that resumes on
  another node reads the checkpoint its last attempt wrote there. A shared folder, not
  the object store, because a checkpoint must outlive the process (and node) that wrote
  it, and the object store loses what a dead node held.
- cancel: :meth:`JobActor.cancel` runs in its own concurrency group, so it is heard while
  a job runs in the default one; it sets the flag the runner reads between steps. A job
  not ended within ``cancel_grace_s`` has its actor killed (Ray restarts it) and is
  reported ``cancelled``.
- faults: actors are created with ``max_restarts=-1`` and no task retries. An actor (or
  node) that dies mid-job is reported ``lost``: the server queues the job again and it
  resumes from its checkpoint on the next free actor, while Ray restarts the dead one
  (it takes jobs again once it has warmed up). The actors belong to the server's driver:
  when the server dies Ray ends them, and the restarted server re-queues the jobs that
  were running (``JobStore.recover``) to resume from their checkpoints on fresh actors.
- capacity: only warm, idle actors take jobs; with none (all busy, or waiting for
  resources the cluster lacks) jobs wait ``queued``, as ``jobs list`` shows.

Progress events carry ``node`` (the host running the job), which the server stores in
the job's progress snapshot and so in every ``jobs`` listing.
"""
from __future__ import annotations

import logging
import os
import queue
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayError, RayTaskError

from engine_server.service.executor import WorkerEvent
from engine_server.service.jobs import Job
from engine_server.service.runner import EngineRunner, RunnerConfig
from engine_server.service.worker import JobEvents, run_job

logger = logging.getLogger(__name__)

NAMESPACE = "engine-server"
"""Ray namespace of the engine's actors (``engine-server info`` lists them there)."""
ACTOR_PREFIX = "engine-worker"
"""Actor names: ``<prefix>-<server session>-<index>``."""
ENDS = ("done", "failed", "cancelled")


class ClusterError(Exception):
    """The Ray executor cannot start: no cluster at the address, a bad actor count."""


@dataclass
class RayConfig:
    """How the server uses a Ray cluster."""

    address: str = "auto"
    """Cluster address: "auto" (the cluster started on this machine with ``ray start``), HOST:PORT of
    its head node, or "local" for a private cluster of this machine's CPUs and GPUs."""
    actors: int = 0
    """How many actors (one job each at a time); 0: one per GPU in the cluster, or one per CPU slot without GPUs."""
    cpus_per_actor: float = 1.0
    """CPUs each actor reserves (a CPU slot); also its torch threads unless ``runner.threads`` is set."""
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    """Models and device of the runner in each actor (device "auto": the actor's GPU when it has one)."""
    cancel_grace_s: float = 0.4
    """How long a cancelled job may take to stop by itself before its actor is killed."""
    log_level: str = "INFO"
    """Logging level in the actors (their log reaches the server's stderr through Ray)."""

    def __post_init__(self):
        if self.actors < 0:
            raise ClusterError(f"the actor count must be 0 (one per GPU or CPU slot) or more, got {self.actors}")
        if not self.cpus_per_actor > 0:
            raise ClusterError(f"CPUs per actor must be > 0, got {self.cpus_per_actor}")
        if self.cancel_grace_s < 0:
            raise ClusterError(f"the cancel grace must be >= 0 s, got {self.cancel_grace_s}")
        if not self.address:
            raise ClusterError("give a Ray address: auto, local or HOST:PORT of the head node")


def _host() -> dict[str, Any]:
    """Where this process runs: host name, node IP, Ray node id, pid."""
    ctx = ray.get_runtime_context()
    return {"node": socket.gethostname(), "node_ip": ray.util.get_node_ip_address(), "node_id": ctx.get_node_id(),
            "pid": os.getpid()}


# ----------------------------------------------------------------------------- the actor (on a cluster node)


@ray.remote(concurrency_groups={"control": 2}, max_restarts=-1, max_task_retries=0)
class JobActor:
    """A warm worker on a Ray node: one runner, its priors loaded, one job at a time (default group).

    Ray restarts it whenever it dies (``max_restarts=-1``) but never retries a job by itself
    (``max_task_retries=0``): the server resumes the job from its checkpoint and counts the attempt.
    """

    def __init__(self, runner: dict[str, Any], log_level: str = "INFO"):
        logging.basicConfig(level=log_level, format="%(levelname)s actor %(name)s: %(message)s")
        self.runner = EngineRunner(RunnerConfig(**runner))
        try:
            self.runner.warm_up()
        except Exception as exc:  # reported per job later; the actor stays up
            logger.warning("warm-up failed: %s", exc)
        self.cancel_flag = threading.Event()
        self.job_id: str | None = None
        self.cancelled: str | None = None  # the job last asked to stop (the ask may come before its run starts)
        self.jobs_run = 0

    def run(self, job_id: str, job_dir: str):
        """Run one job attempt; yields its events as (type, fields), the last one its end (done / failed / cancelled)."""
        folder = Path(job_dir)
        self.job_id = job_id  # set before reading ``cancelled``; cancel() does the reverse: one sees the other
        if self.cancelled == job_id:
            self.cancel_flag.set()
        else:
            self.cancel_flag.clear()
        if not (folder / "request.json").is_file():
            self.job_id = None
            yield "failed", {"code": "storage", "message": f"the job folder {folder} is not visible on node "
                             f"{socket.gethostname()}: serve --data must be a folder every node mounts at the same path"}
            return
        events: queue.Queue = queue.Queue()
        sink = JobEvents(folder, lambda kind, fields: events.put((kind, fields)))

        def work() -> None:  # in a thread of its own: the runner calls the sink, the generator yields
            end: tuple[str, dict] = ("failed", {"code": "internal", "message": "the job thread stopped"})
            try:
                end = run_job(self.runner, folder, sink, self.cancel_flag)
            finally:
                events.put(("end", end))

        threading.Thread(target=work, name=f"job-{job_id}", daemon=True).start()
        while True:
            kind, fields = events.get()
            if kind == "end":
                break
            yield kind, fields
        self.job_id = None
        self.jobs_run += 1
        yield fields
        self.runner.ctx.release()  # after the end is out: a cancel must not wait for the garbage collector

    @ray.method(concurrency_group="control")
    def cancel(self, job_id: str) -> bool:
        """Ask job ``job_id`` to stop between two steps (also when its run has not started yet); whether it was running."""
        self.cancelled = job_id
        if job_id != self.job_id:
            return False
        self.cancel_flag.set()
        return True

    @ray.method(concurrency_group="control")
    def info(self) -> dict[str, Any]:
        """Where the actor runs and what it does: node, node_ip, node_id, pid, device, job, jobs_run, gpus."""
        return {**_host(), "device": self.runner.ctx.device, "job": self.job_id, "jobs_run": self.jobs_run,
                "gpus": [str(g) for g in ray.get_gpu_ids()]}


# ----------------------------------------------------------------------------- the executor (in the server)


class _Actor:
    """One actor as the server sees it."""

    def __init__(self, name: str, handle: Any):
        self.name = name
        self.handle = handle
        self.state = "starting"
        """starting (placed, warming up) | idle | busy | failed (cannot start; ``error`` says why)."""
        self.info: dict[str, Any] = {}
        self.job_id: str | None = None
        self.run = 0  # serial of the current run: events of an abandoned run are ignored
        self.cancel_at: float | None = None
        self.error: str | None = None


class RayExecutor:
    """Executor over Ray actors (see the module docstring). ``data_dir``: the job store's folder, shared by every node."""

    def __init__(self, data_dir: str | os.PathLike, config: RayConfig | None = None):
        self.config = config or RayConfig()
        self.jobs_dir = Path(data_dir).expanduser().resolve() / "jobs"
        self._lock = threading.Lock()
        self._events: list[WorkerEvent] = []
        self._closed = False
        self.stats = {"actors_lost": 0, "cancel_kills": 0}
        """Counters: actors that died mid-job, cancels that needed a kill."""
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            connect(self.config.address)
        self.session = secrets.token_hex(4)
        self._actors = [self._create(f"{ACTOR_PREFIX}-{self.session}-{i}") for i in range(self._count())]

    def _count(self) -> int:
        resources = ray.cluster_resources()
        if self.config.actors:
            return self.config.actors
        gpus = int(resources.get("GPU", 0)) if self.config.runner.device != "cpu" else 0
        n = gpus or int(resources.get("CPU", 0) // self.config.cpus_per_actor)
        if n < 1:
            raise ClusterError(f"the Ray cluster has no GPU and {resources.get('CPU', 0):g} CPUs, fewer than one "
                               f"actor's {self.config.cpus_per_actor:g}: lower --ray-cpus-per-actor or add nodes")
        return n

    def _create(self, name: str) -> _Actor:
        c = self.config
        gpu = c.runner.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1
        threads = c.runner.threads or max(1, int(c.cpus_per_actor))
        handle = JobActor.options(name=name, namespace=NAMESPACE, num_cpus=c.cpus_per_actor, num_gpus=1 if gpu else 0,
                                  runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}}
                                  ).remote(asdict(c.runner), c.log_level)
        actor = _Actor(name, handle)
        self._watch(actor)
        logger.info("actor %s created (%g CPU%s)", name, c.cpus_per_actor, ", 1 GPU" if gpu else "")
        return actor

    def _watch(self, actor: _Actor, killed_pid: int | None = None) -> None:
        """Mark the actor idle once it answers (warm, placed, or restarted by Ray), on a thread of its own.

        ``killed_pid``: the process just killed, which may still answer before it dies: wait for another.
        """
        actor.state = "starting"

        def wait() -> None:
            while not self._closed:
                try:
                    info = ray.get(actor.handle.info.remote(), timeout=1.0)
                except (GetTimeoutError, ActorUnavailableError):
                    continue  # still warming up, waiting for resources, or being restarted by Ray
                except ActorDiedError as exc:
                    if not exc.actor_init_failed:  # the process asked was killed; Ray starts another
                        time.sleep(0.1)
                        continue
                    with self._lock:  # its constructor raised (the engine missing on its node...): no use retrying
                        actor.state, actor.error = "failed", str(exc)[-1000:]
                    logger.error("actor %s cannot start: %s", actor.name, actor.error)
                    return
                except Exception as exc:  # RayError, or Ray shutting down under this thread
                    if self._closed:
                        return
                    logger.warning("actor %s: %s; asking again", actor.name, str(exc)[:300])
                    time.sleep(1.0)
                    continue
                if info["pid"] == killed_pid:
                    time.sleep(0.05)
                    continue
                with self._lock:
                    if actor.state == "starting":
                        actor.state, actor.info = "idle", info
                logger.info("actor %s ready on %s (pid %s, %s)", actor.name, info["node"], info["pid"], info["device"])
                return

        threading.Thread(target=wait, name=f"watch-{actor.name}", daemon=True).start()

    # -- Executor

    def capacity(self) -> int:
        """Warm actors without a job."""
        with self._lock:
            return 0 if self._closed else sum(a.state == "idle" for a in self._actors)

    def start(self, job: Job) -> None:
        """Run ``job`` on an idle actor; its events come from a reader thread."""
        with self._lock:
            actor = next((a for a in self._actors if a.state == "idle"), None)
            if actor is None:
                raise RuntimeError("no idle actor: check capacity() before start()")
            actor.state, actor.job_id, actor.cancel_at = "busy", job.id, None
            actor.run += 1
            serial = actor.run
            node = actor.info.get("node", "?")
            self._events.append(WorkerEvent(job.id, "progress", {
                "stage": "starting", "state": "running", "node": node,
                "message": f"attempt {job.attempts} on {node} ({actor.name})"}))
        logger.info("job %s (attempt %d) runs on actor %s, node %s, pid %s", job.id, job.attempts, actor.name, node,
                    actor.info.get("pid"))
        stream = actor.handle.run.remote(job.id, str(self.jobs_dir / job.id))
        threading.Thread(target=self._read, args=(actor, serial, job.id, stream), name=f"read-{job.id}",
                         daemon=True).start()

    def _read(self, actor: _Actor, serial: int, job_id: str, stream: Any) -> None:
        """Take a job's events off its actor's generator until its end, or until the actor dies."""
        try:
            for ref in stream:
                kind, fields = ray.get(ref)
                if self._deliver(actor, serial, job_id, kind, fields):
                    return
            end, fields = "lost", {"code": "worker_died", "message": "the actor's job stream ended without the job's end"}
        except RayTaskError as exc:  # the actor's code raised: a bug, not a fault to resume from
            end, fields = "failed", {"code": "internal", "message": str(exc)[-2000:]}
        except Exception as exc:  # the actor or its node died (RayActorError, lost objects), or Ray is shutting down
            if self._closed:
                return
            end, fields = "lost", {"code": "worker_died", "message":
                                   f"the Ray actor {actor.name} on {actor.info.get('node', '?')} died while running the "
                                   f"job ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})"}
        self._deliver(actor, serial, job_id, end, fields)

    def _deliver(self, actor: _Actor, serial: int, job_id: str, kind: str, fields: dict[str, Any]) -> bool:
        """Queue one event of a run for poll(); True when it ended the run (the actor is free or restarting)."""
        with self._lock:
            if actor.run != serial or actor.job_id != job_id or self._closed:
                return True  # an abandoned run (cancelled by a kill, executor closed)
            if kind not in ENDS and kind != "lost":
                if actor.cancel_at is None:  # after a cancel only the end matters
                    if kind == "progress":
                        fields = {**fields, "node": actor.info.get("node", "?")}
                    self._events.append(WorkerEvent(job_id, kind, fields))
                return False
            if kind == "lost":
                if actor.cancel_at is not None:
                    kind, fields = "cancelled", {}
                else:
                    self.stats["actors_lost"] += 1
                    logger.error("job %s: %s", job_id, fields["message"])
            self._events.append(WorkerEvent(job_id, kind, fields))
            actor.job_id, actor.cancel_at = None, None
            if kind == "lost":
                self._watch(actor)  # Ray restarts it; it takes jobs once it answers again
            else:
                actor.state = "idle"
            return True

    def cancel(self, job_id: str) -> None:
        """Ask the job's actor to stop it; poll() kills the actor when it has not within the grace period."""
        with self._lock:
            actor = next((a for a in self._actors if a.job_id == job_id and a.cancel_at is None), None)
            if actor is None:
                return
            actor.cancel_at = time.monotonic()
        actor.handle.cancel.remote(job_id)

    def poll(self) -> list[WorkerEvent]:
        """Events since the last call (never blocks); kills the actors of cancelled jobs past their grace."""
        now = time.monotonic()
        with self._lock:
            late = [a for a in self._actors if a.job_id is not None and a.cancel_at is not None
                    and now - a.cancel_at >= self.config.cancel_grace_s]
            for actor in late:
                logger.info("job %s did not stop within %.2f s of its cancel: killing actor %s", actor.job_id,
                            self.config.cancel_grace_s, actor.name)
                self.stats["cancel_kills"] += 1
                ray.kill(actor.handle, no_restart=False)  # Ray restarts it, warm again before its next job
                self._events.append(WorkerEvent(actor.job_id, "cancelled", {}))
                actor.job_id, actor.cancel_at = None, None
                actor.run += 1  # what the killed run still sends is ignored
                self._watch(actor, killed_pid=actor.info.get("pid"))
            events, self._events = self._events, []
        return events

    def close(self) -> None:
        """End every actor (running jobs stay ``running`` in the store and resume at the next start)."""
        with self._lock:
            self._closed = True
            actors = list(self._actors)
        for actor in actors:
            try:
                ray.kill(actor.handle, no_restart=True)
            except RayError as exc:
                logger.warning("could not kill actor %s: %s", actor.name, exc)
        if self._owns_ray:
            ray.shutdown()

    def actors(self) -> list[dict[str, Any]]:
        """Each actor: name, state, job, node, pid, device, error (for tests and logs)."""
        with self._lock:
            return [{"name": a.name, "state": a.state, "job": a.job_id, **a.info, "error": a.error}
                    for a in self._actors]


# ----------------------------------------------------------------------------- the cluster, for info


def connect(address: str) -> None:
    """Join the Ray cluster at ``address`` ("local": start a private one) as a driver in the engine's namespace."""
    try:
        if address == "local":
            ray.init(namespace=NAMESPACE, include_dashboard=False)
        else:
            ray.init(address=address, namespace=NAMESPACE)
    except ConnectionError as exc:
        raise ClusterError(f"no Ray cluster at {address!r} ({exc}); start one with `ray start --head` "
                           "(and `ray start --address=HEAD:6379` on the other machines)") from None


def cluster_info(address: str, timeout_s: float = 2.0) -> dict[str, Any]:
    """The cluster at ``address`` as plain data: its nodes and the engine's actors with the job each runs.

    ``nodes``: host, ip, alive, CPUs, GPUs, object store MiB; ``actors``: name, node, pid, device,
    job (None when idle), jobs_run, or state "starting" when it does not answer within ``timeout_s``.
    """
    owns = not ray.is_initialized()
    if owns:
        connect(address)
    try:
        nodes = [{"node": n.get("NodeManagerHostname", "?"), "ip": n.get("NodeManagerAddress", "?"),
                  "alive": bool(n.get("Alive")), "cpus": n.get("Resources", {}).get("CPU", 0),
                  "gpus": n.get("Resources", {}).get("GPU", 0),
                  "object_store_mib": round(n.get("Resources", {}).get("object_store_memory", 0) / 2**20)}
                 for n in ray.nodes()]
        names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                       if a["namespace"] == NAMESPACE and a["name"].startswith(ACTOR_PREFIX + "-"))
        pending = {}
        for name in names:
            try:
                pending[name] = ray.get_actor(name, namespace=NAMESPACE).info.remote()
            except ValueError:  # gone since it was listed
                continue
        actors = []
        for name, ref in pending.items():
            try:
                info = ray.get(ref, timeout=timeout_s)
                actors.append({"name": name, "state": "busy" if info["job"] else "idle", **info})
            except (GetTimeoutError, ActorUnavailableError):
                actors.append({"name": name, "state": "starting"})
            except RayError:
                actors.append({"name": name, "state": "dead"})
        resources = ray.cluster_resources()
        return {"address": address, "cpus": resources.get("CPU", 0), "gpus": resources.get("GPU", 0),
                "nodes": nodes, "actors": actors}
    finally:
        if owns:
            ray.shutdown()
