"""gunicorn settings for production: `gunicorn -c python:marketplace.gunicorn_conf marketplace.wsgi`.

With PROMETHEUS_MULTIPROC_DIR set (an empty directory, the same one for the Celery workers on this host),
every worker process writes its metrics there and /metrics adds them up; a worker that exits is marked dead so
its live gauges stop counting. Everything else comes from GUNICORN_CMD_ARGS or the command line.
"""

import os

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))


def child_exit(server, worker):
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
