"""A webhook receiver for tests: an HTTP server on 127.0.0.1 that records every request."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    """An HTTP server on 127.0.0.1 that records every request and answers ``statuses`` in turn (then
    ``default``); with ``hold`` set, it answers only once the event is set."""

    def __init__(self, statuses=(), default: int = 200, hold: threading.Event | None = None):
        self.requests: list[dict] = []
        self.statuses = list(statuses)
        self.default = default
        self.hold = hold
        self._arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver._arrived:
                    receiver.requests.append({"headers": dict(self.headers), "body": body,
                                              "path": self.path, "at": time.monotonic()})
                    status = receiver.statuses.pop(0) if receiver.statuses else receiver.default
                    receiver._arrived.notify_all()
                if receiver.hold is not None:
                    receiver.hold.wait(30)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/headshots?token=t"

    def wait_for(self, count: int, timeout_s: float = 10.0) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        with self._arrived:
            while len(self.requests) < count:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"{len(self.requests)} request(s) arrived, {count} expected"
                self._arrived.wait(remaining)
            return list(self.requests)

    def events(self) -> list[dict]:
        """Each event once, in arrival order: delivery is at-least-once (an attempt whose answer timed out
        on a loaded machine is sent again, with the same event id), so a receiver dedupes by id."""
        unique: dict[str, dict] = {}
        for request in self.requests:
            event = json.loads(request["body"])
            unique.setdefault(event["id"], event)
        return list(unique.values())

    def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()
