"""A real uvicorn server on a free loopback port, in a thread, for the server and page tests."""

from __future__ import annotations

import contextlib
import threading
import time

import uvicorn

from ovd.serve.app import listen_socket


@contextlib.contextmanager
def running(app):
    """Serve ``app`` on 127.0.0.1:<free port> until the block ends; yields the base URL."""
    sock = listen_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
