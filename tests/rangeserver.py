"""A loopback HTTP server for the remote-dataset tests and benchmark: serves a directory with
Range support and counts the bytes and requests it serves. Stops itself when the test ends.

>>> with RangeServer(root) as srv:                 # doctest: +SKIP
...     Dataset(srv.url + "/db"); srv.bytes_served
"""
from __future__ import annotations

import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class RangeServer:
    """Serves ``root`` on 127.0.0.1 (a free port). ``deny`` (path prefixes) answer 403;
    ``ignore_range`` makes it answer 200 with the whole file, like a server without Range.

    Hostile modes, for paths matching ``hostile_paths`` (suffixes; every path when empty):
    ``trickle`` sends each body one byte per ``trickle_s`` seconds; ``endless`` ignores Range and
    sends the file followed by zeros without a Content-Length (``endless_cap`` bytes in all, so a
    reader that holds it all fails a test instead of the machine); ``redirect`` answers 302 to
    ``redirect_to``.
    """

    def __init__(self, root: Path, deny: tuple[str, ...] = (), ignore_range: bool = False, hostile: str | None = None,
                 hostile_paths: tuple[str, ...] = (), trickle_s: float = 0.2, endless_cap: int = 400 << 20,
                 redirect_to: str = "ftp://ftp.invalid/x"):
        self.root = Path(root).resolve()
        self.deny = deny
        self.ignore_range = ignore_range
        self.hostile, self.hostile_paths, self.trickle_s = hostile, hostile_paths, trickle_s
        self.endless_cap, self.redirect_to = endless_cap, redirect_to
        self.bytes_served = 0
        self.requests: list[tuple[str, str, str | None]] = []   # (method, path, Range)
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _file(self):
                path = unquote(urlsplit(self.path).path)
                with server._lock:
                    server.requests.append((self.command, path, self.headers.get("Range")))
                if any(path.startswith(d) for d in server.deny):
                    self.send_error(403)
                    return None
                real = os.path.realpath(server.root / path.lstrip("/"))
                if os.path.commonpath([real, str(server.root)]) != str(server.root) or not os.path.isfile(real):
                    self.send_error(404)
                    return None
                return real

            def do_HEAD(self):
                real = self._file()
                if real:
                    self.send_response(200)
                    self.send_header("Content-Length", str(os.path.getsize(real)))
                    self.send_header("Accept-Ranges", "bytes")
                    self.end_headers()

            def _hostile(self) -> str | None:
                path = unquote(urlsplit(self.path).path)
                if server.hostile and (not server.hostile_paths or path.endswith(server.hostile_paths)):
                    return server.hostile
                return None

            def do_GET(self):
                mode = self._hostile()
                if mode == "redirect":
                    self.send_response(302)
                    self.send_header("Location", server.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                real = self._file()
                if not real:
                    return
                if mode == "endless":
                    self.send_response(200)
                    self.end_headers()  # no Content-Length: the body ends when the connection does
                    sent = 0
                    try:
                        with open(real, "rb") as f:
                            self.wfile.write(f.read())
                        while sent < server.endless_cap:
                            self.wfile.write(bytes(1 << 20))
                            sent += 1 << 20
                    except OSError:  # the reader hung up: what a careful reader does
                        pass
                    self.close_connection = True
                    return
                size = os.path.getsize(real)
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
                start, end = 0, size
                if m and not server.ignore_range:
                    start = int(m.group(1))
                    end = min(size, int(m.group(2)) + 1) if m.group(2) else size
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
                else:
                    self.send_response(200)
                with open(real, "rb") as f:
                    f.seek(start)
                    data = f.read(end - start)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if mode == "trickle":
                    try:
                        for i in range(len(data)):
                            self.wfile.write(data[i:i + 1])
                            self.wfile.flush()
                            time.sleep(server.trickle_s)
                    except OSError:
                        pass
                    return
                self.wfile.write(data)
                with server._lock:
                    server.bytes_served += len(data)

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # DuckDB's threads connect at once; the default 5 drops SYNs (1 s retries)

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # serve_forever checks for shutdown() every poll_interval (0.5 s by default): each server's
        # stop waited 0.25 s on average, and the remote tests start and stop dozens of them.
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def reset(self) -> None:
        with self._lock:
            self.bytes_served = 0
            self.requests.clear()

    def __enter__(self) -> "RangeServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()
