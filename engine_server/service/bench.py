"""``engine-server bench server``: the engine server on loopback, measured with a real client in one process."""
from __future__ import annotations

import threading
import time
from pathlib import Path

from engine_server.service.server import EngineServer, ServerConfig
from engine_server.wire import protocol


def bench_result(n_faces: int, texture: int):
    """A synthetic engine result for benchmarks: a wavy grid of ``n_faces`` triangles with per-vertex UVs and a
    ``texture``-pixel random-noise PNG (incompressible) -> vertices (V, 3) float32, faces (F, 3) int32, uvs (V, 2)
    float32, PNG bytes. The add-on's import benchmark times the same object."""
    import io

    import numpy as np
    from PIL import Image as PILImage

    side = int(np.ceil(np.sqrt(n_faces / 2)))
    g = np.linspace(-0.5, 0.5, side + 1, dtype=np.float32)
    xx, yy = np.meshgrid(g, g, indexing="ij")
    vertices = np.stack([xx.ravel(), yy.ravel(), 0.1 * np.sin(6 * xx.ravel())], 1).astype(np.float32)
    i, j = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    a = (i * (side + 1) + j).ravel()
    faces = np.concatenate([np.stack([a, a + side + 1, a + 1], 1), np.stack([a + 1, a + side + 1, a + side + 2], 1)])
    faces = faces[:n_faces].astype(np.int32)
    uvs = (vertices[:, :2] + 0.5).astype(np.float32)
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (texture, texture, 3), dtype=np.uint8)
    PILImage.fromarray(noise).save(buf, "PNG", compress_level=1)
    return vertices, faces, uvs, buf.getvalue()


def run(args) -> dict:
    """``engine-server bench server``: ping round trip, event throughput, delivery of a 100k-face textured mesh.

    A real server (in a thread of this process) and a real client on loopback, with
    signing on. Options read from ``args``: repeat, pings (1000), seconds of event
    streaming (2.0), faces (100000), texture (1024).
    """
    import statistics
    import tempfile

    from engine_server.wire.client import EngineClient

    repeat = max(1, int(getattr(args, "repeat", 5)))
    n_pings = int(getattr(args, "pings", 1000))
    seconds = float(getattr(args, "seconds", 2.0))
    n_faces = int(getattr(args, "faces", 100_000))
    tex = int(getattr(args, "texture", 1024))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        server = EngineServer(ServerConfig(bind="tcp://127.0.0.1:*", data_dir=Path(tmp) / "data",
                                           key_file=Path(tmp) / "key"))
        endpoint = server.bind()
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        client = EngineClient(endpoint, Path(tmp) / "key", timeout=60.0)
        try:
            client.hello()
            for _ in range(50):
                client.ping()
            rtt = sorted(client.ping() * 1e3 for _ in range(n_pings))
            rows.append({"measure": "ping round trip", "n": n_pings, "median_ms": statistics.median(rtt),
                         "p99_ms": rtt[min(len(rtt) - 1, int(0.99 * len(rtt)))], "rate_per_s": 1e3 / statistics.mean(rtt)})

            job = client.submit("text", "bench", preset="draft")
            server.store.claim_next()
            posted = received = 0
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:  # a producer faster than any client
                for _ in range(50):
                    server.post(job, "progress", stage="bench", step=posted, total=2**31, loss=0.1)
                    posted += 1
                received += sum(e.type == "progress" for e in client.poll_events(0.0))
            last = posted - 1
            server.post(job, "progress", stage="bench", step=posted, total=2**31, loss=0.1)
            t_last = time.perf_counter()
            while last < posted:
                for event in client.poll_events(1.0):
                    if event.type == "progress":
                        received, last = received + 1, event["step"]
            end = time.perf_counter()
            rows.append({"measure": "progress events posted", "n": posted + 1, "median_ms": float("nan"),
                         "p99_ms": float("nan"), "rate_per_s": (posted + 1) / (t_last - start)})
            rows.append({"measure": "progress events delivered (latest wins)", "n": received,
                         "median_ms": (end - t_last) * 1e3, "p99_ms": float("nan"), "rate_per_s": received / (end - start)})
            vertices, faces, uvs, png = bench_result(n_faces, tex)
            texture = protocol.Image.from_png(png)
            size = vertices.nbytes + faces.nbytes + uvs.nbytes + len(texture.data)
            times = []
            for r in range(repeat):
                start = time.perf_counter()
                server.post(job, "mesh", stage="bench", step=r, vertices=vertices, faces=faces, uvs=uvs,
                            texture=texture)
                got = None
                while got is None:
                    got = next((e for e in client.poll_events(1.0) if e.type == "mesh" and e["step"] == r), None)
                times.append((time.perf_counter() - start) * 1e3)
                assert got["faces"].shape == (len(faces), 3) and got["texture"].width == tex
            times.sort()
            rows.append({"measure": f"mesh {len(faces)} faces + {tex}^2 PNG texture", "n": repeat,
                         "median_ms": statistics.median(times), "p99_ms": times[-1],
                         "rate_per_s": size / 2**20 / (statistics.median(times) / 1e3)})
        finally:
            client.close()
            server.stop()
            thread.join(10)
            server.close()
    return {
        "title": "engine server on loopback (HMAC signing on, server and client in one process)",
        "rows": rows,
        "notes": [
            "ping: full request/reply through the ROUTER loop, signed and verified both ways",
            "progress: one thread posts as fast as it can and polls the client between bursts (the GIL is "
            "shared with the server thread); the server keeps only the latest value per job, so 'delivered' is "
            "the client's refresh rate; its median_ms is the time for the very last value to arrive",
            f"mesh: {size / 2**20:.1f} MiB message (random-noise texture, PNG cannot compress it); "
            "rate_per_s is MiB/s there; p99_ms is the max over repeats",
        ],
    }


CLUSTER_JOB = {"coarse_steps": 4, "tet_resolution": 24, "texture_size": 64, "preview_every": 1000}
"""The bench's tiny job (draft preset, bundled prior): seconds on one CPU thread."""


def run_cluster(args) -> dict:
    """``engine-server bench cluster``: jobs per hour with one and with two Ray actors, side by side.

    A private local Ray cluster of 2 CPUs (1 CPU and 1 torch thread per actor), a real server
    in a thread of this process and a real client. Per actor count: the actors warm up, each
    runs one untimed job (first-call costs), then ``args.jobs`` (4) tiny jobs are submitted at
    once and timed from the submit to the last ``done``.
    """
    import statistics
    import tempfile

    import ray

    from engine_server.service.ray_executor import NAMESPACE, RayConfig, RayExecutor
    from engine_server.service.runner import RunnerConfig
    from engine_server.wire.client import EngineClient

    n_jobs = max(1, int(getattr(args, "jobs", 4)))
    ray.init(num_cpus=2, object_store_memory=100_000_000, include_dashboard=False, namespace=NAMESPACE,
             log_to_driver=False)
    rows: list[dict] = []
    try:
        for actors in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                server = EngineServer(ServerConfig(bind="tcp://127.0.0.1:*", data_dir=Path(tmp) / "data",
                                                   key_file=Path(tmp) / "key", max_queued=max(16, n_jobs)))
                endpoint = server.bind()
                start = time.perf_counter()
                server.executor = RayExecutor(server.store.root, RayConfig(
                    actors=actors, runner=RunnerConfig(device="cpu", threads=1)))
                thread = threading.Thread(target=server.serve_forever, daemon=True)
                thread.start()
                client = EngineClient(endpoint, Path(tmp) / "key", timeout=60.0)
                try:
                    client.hello()
                    while server.executor.capacity() < actors:
                        time.sleep(0.1)
                    warm_s = time.perf_counter() - start
                    _run_all(client, actors)
                    start = time.perf_counter()
                    seconds = _run_all(client, n_jobs)
                    wall = time.perf_counter() - start
                finally:
                    client.close()
                    server.stop()
                    thread.join(10)
                    server.close()
            rows.append({"actors": actors, "jobs": n_jobs, "warm_up_s": warm_s, "wall_s": wall,
                         "jobs_per_hour": n_jobs / wall * 3600, "mean_job_s": statistics.mean(seconds)})
    finally:
        ray.shutdown()
    return {
        "title": "jobs per hour on a local Ray cluster (2 CPUs), one vs two actors",
        "rows": rows,
        "notes": [
            f"job: text 'a red cube', draft preset with {CLUSTER_JOB}, bundled prior, one torch thread per actor",
            "warm_up_s: actors created until both answer (torch imported, prior loaded); not in wall_s",
            "wall_s: submit of all jobs to the last done, after one untimed job per actor; "
            f"speed-up two vs one actor: {rows[0]['wall_s'] / rows[1]['wall_s']:.2f}x",
        ],
    }


def _run_all(client, n: int) -> list[float]:
    """Submit ``n`` tiny jobs at once and wait for all; the runner's seconds per job (raises when one fails)."""
    jobs = [client.submit("text", "a red cube", seed=i, options=CLUSTER_JOB) for i in range(n)]
    pending = set(jobs)
    while pending:
        for event in client.poll_events(0.1):
            if event.job_id in pending and event.type in ("done", "failed", "cancelled"):
                if event.type != "done":
                    raise RuntimeError(f"bench job {event.job_id} ended {event.type}: {event.fields}")
                pending.discard(event.job_id)
    return [client.result(job, glb=False).meta["seconds"] for job in jobs]
