"""The engine as a service: the ZeroMQ server loop, the job store, and the executors that run jobs.

- :mod:`~engine_server.service.server`: one ROUTER socket, one loop, many clients;
- :mod:`~engine_server.service.jobs`: the durable job store (SQLite + one folder per job);
- :mod:`~engine_server.service.executor`: the interface the server runs jobs through;
- :mod:`~engine_server.service.worker`: the local executor, one supervised child process per device;
- :mod:`~engine_server.service.runner`: inside a worker, a job's request -> its pipeline -> its result;
- :mod:`~engine_server.service.bench`: ``engine-server bench server``.
"""
