"""run_server: the app under uvicorn, JSON access logs on stderr, SIGTERM drains in-flight requests."""

from __future__ import annotations

import logging
import socket
import sys

from ..errors import LLMClockError
from .app import ACCESS_LOG, create_app
from .config import ServerConfig
from .security import redact


class RedactFilter(logging.Filter):
    """Masks personal data and secrets in every record of the loggers it is attached to."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


def configure_logging(config: ServerConfig, stream=None, access: logging.Logger | None = None) -> None:
    """Access log lines (already JSON) as they are; the rest as JSON too, masked when config.redact."""
    stream = stream or sys.stderr
    access = access or logging.getLogger(ACCESS_LOG)
    access.handlers[:] = [logging.StreamHandler(stream)]
    access.setLevel(logging.INFO)
    access.propagate = False
    fmt = logging.Formatter('{"ts": "%(asctime)s", "level": "%(levelname)s", "logger": "%(name)s", "msg": %(jmsg)s}')
    other = logging.StreamHandler(stream)
    other.setFormatter(fmt)
    other.addFilter(_JSONMessage())
    for name in ("llmclock.server", "uvicorn.error"):
        log = logging.getLogger(name)
        log.handlers[:] = [other]
        log.setLevel(logging.INFO)
        log.propagate = False
        if config.redact:
            log.filters[:] = [RedactFilter()]


class _JSONMessage(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        import json

        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        record.jmsg = json.dumps(msg)
        return True


def listen(host: str, port: int) -> socket.socket:
    """Bind now, so a taken port is one clear error rather than a log line from deep inside uvicorn."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LLMClockError(f"serve: cannot listen on {host}:{port} ({e.strerror})") from None
    sock.set_inheritable(True)
    return sock


def run_server(config: ServerConfig, *, model=None, tokenizer=None, echo=None) -> None:
    """Serve until SIGINT/SIGTERM; on either, stop taking requests and finish those in flight. A
    checkpoint's engine runs in a spawned process (config.engine_process), which imports the caller's
    main module again: call this from a script under `if __name__ == "__main__":`."""
    import uvicorn

    if model is None:
        config.check_files()  # a missing or broken checkpoint, or a wrong adapter, fails here in one line
    app = create_app(config, model=model, tokenizer=tokenizer)
    server_state = app.state.server
    configure_logging(config)
    sock = listen(config.host, config.port)
    uv = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=config.drain_timeout,
                        timeout_keep_alive=5)
    server = draining_server(uv, server_state)
    server_state.on_fail = server.stop_now
    if echo is not None:
        host, port = sock.getsockname()[:2]
        echo(f"llmclock: serving {config.model_name} on http://{host}:{port} (playground at /, API at /v1)")
    server.run(sockets=[sock])
    if server_state.load_error:
        raise LLMClockError(f"serve: {server_state.load_error}")


def draining_server(config, server_state):
    """A uvicorn.Server whose exit signal first marks the engine loop draining (new requests: 503,
    /ready: 503), then lets uvicorn wait for the open requests, up to config.drain_timeout."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if server_state.loop is not None:
                server_state.loop.draining = True
            super().handle_exit(sig, frame)
            getattr(self, "_captured_signals", []).clear()  # drained: exit 0 rather than re-raise the signal afterwards

        def stop_now(self):
            self.should_exit = True

    return DrainingServer(config)
