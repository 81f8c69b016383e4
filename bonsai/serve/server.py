"""uvicorn wiring: a server whose shutdown drains the engine first, so in-flight requests get their image or a 503."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import uvicorn
from starlette.concurrency import run_in_threadpool

EXTRA_GRACE_S = 5.0  # after the engine's deadline, time for the last 503s to reach their clients


class Server(uvicorn.Server):
    """`uvicorn.Server` for an app of `create_app`: on shutdown (SIGINT/SIGTERM or `should_exit`) it stops
    accepting connections and, at the same time, closes the engine: queued and running requests finish within
    the app's `shutdown_timeout_s`, the rest are answered 503; uvicorn then waits for those answers to be sent."""

    def __init__(self, config: uvicorn.Config, engine, shutdown_timeout_s: float):
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout_s = shutdown_timeout_s

    async def shutdown(self, sockets=None) -> None:
        drain = asyncio.ensure_future(run_in_threadpool(self.engine.close, self.shutdown_timeout_s))
        try:
            await super().shutdown(sockets)
        finally:
            await drain


def server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> Server:
    """A `Server` for an app of `create_app` (call `.run()`, or `.run(sockets=[sock])` on a bound socket; tests
    run it in a thread and set `.should_exit`)."""
    timeout_s = app.state.config.shutdown_timeout_s
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=timeout_s + EXTRA_GRACE_S)
    return Server(config, app.state.engine, timeout_s)


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1", start_timeout_s: float = 30.0, log_level: str = "warning"):
    """Serve `app` from a background thread on a free port of `host`; yields (base_url, server). On exit the
    server shuts down as on SIGTERM (drain, then stop). For tests and notebooks."""
    sock = socket.socket(socket.AF_INET)  # an IPv4 address
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    http = server(app, host=host, port=port, log_level=log_level)
    thread = threading.Thread(target=http.run, kwargs={"sockets": [sock]}, name="bonsai-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not http.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port} within {start_timeout_s} s")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}", http
    finally:
        http.should_exit = True
        thread.join(timeout=app.state.config.shutdown_timeout_s + EXTRA_GRACE_S + 5)
        sock.close()
