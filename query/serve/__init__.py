"""``zeropass serve``: a read-only web explorer with a JSON API over one dataset (docs/EXPLORER.md).

>>> from query.serve import create_app, serve          # doctest: +SKIP
>>> serve("zeropass-db", port=8765)                     # blocks; Ctrl-C stops

Needs the ``serve`` extra (starlette, uvicorn, jinja2); the rest of ``query`` does not.
"""
from __future__ import annotations

import socket
import sys
import threading
import time
from contextlib import contextmanager

from ..errors import QueryError

SERVE_DEPS = ("starlette", "uvicorn", "jinja2")
MAX_REQUEST_LINE = 2**20


class ServeUnavailable(QueryError, ImportError):
    """The web stack of the ``serve`` extra is not installed."""


class PortUnavailable(QueryError, OSError):
    """The explorer cannot listen on the address asked for."""


def _need_deps() -> None:
    import importlib

    missing = []
    for name in SERVE_DEPS:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ServeUnavailable(f"zeropass serve needs the serve extra ({', '.join(missing)} not installed): "
                               f"pip install 'zeropass[serve]'")


def create_app(ds, **kw):
    """The Starlette app over an open ``query.Dataset`` (see ``query.serve.app.create_app``)."""
    _need_deps()
    from .app import create_app as _create

    return _create(ds, **kw)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); PortUnavailable with the fix when it cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise PortUnavailable(f"cannot resolve host {host!r} ({e.strerror}): use an address such as 127.0.0.1") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise PortUnavailable(f"cannot listen on {host}:{port} ({e.strerror}): pick another with --port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def make_server(ds, sock: socket.socket, *, host: str = "127.0.0.1", log_level: str = "warning", **kw):
    """A uvicorn Server for the app over ``ds``; run it with ``server.run(sockets=[sock])``."""
    app = create_app(ds, host=host, **kw)
    import uvicorn

    # A request line may be as long as a token set's file may be (query.enrich.MAX_FILE_BYTES): a set
    # past enrich's bound then gets the page's one-line answer, not h11's bare 400 (its default is 16 KB).
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off", http="h11",
                            h11_max_incomplete_event_size=MAX_REQUEST_LINE)
    return uvicorn.Server(config)


@contextmanager
def running(db, *, host: str = "127.0.0.1", port: int = 0, **kw):
    """The explorer over dataset ``db`` (a directory, a URL or an open Dataset) in a background
    thread (a notebook, a test); yields its base URL.

    >>> with running("zeropass-db") as url:                # doctest: +SKIP
    ...     urllib.request.urlopen(url + "/api/models").read()
    """
    from ..dataset import Dataset

    _need_deps()
    ds = db if isinstance(db, Dataset) else Dataset(db)
    sock = bind(host, port)
    server = make_server(ds, sock, host=host, **kw)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="zeropass-serve")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            sock.close()
            ds.close()
            raise PortUnavailable(f"the explorer did not start on {host}:{sock.getsockname()[1]}")
        time.sleep(0.02)
    shown = f"[{host}]" if ":" in host else host
    try:
        yield f"http://{shown}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        server.config.app.state.explorer.close()
        ds.close()


def serve(db, *, host: str = "127.0.0.1", port: int = 8765, echo=None) -> None:
    """Serve the explorer over dataset ``db`` (a directory, a URL or an open Dataset) on
    http://HOST:PORT until interrupted."""
    from ..dataset import Dataset

    _need_deps()
    ds = db if isinstance(db, Dataset) else Dataset(db)
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    say = echo or (lambda m: print(m, file=sys.stderr))
    say(f"zeropass explorer on http://{shown}:{sock.getsockname()[1]}/ over {ds.root} (Ctrl-C stops)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        say(f"note: listening on {host}, not only this machine: anyone who can reach it can read the dataset")
    server = make_server(ds, sock, host=host)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn stops gracefully on Ctrl-C, then re-raises the signal: that is the normal way out.
        say("stopped")
    finally:
        sock.close()
        server.config.app.state.explorer.close()
        ds.close()
