"""The FastAPI app: a factory with no module state, so one process may hold several (tests, Ray Serve).

    create_app(ServerConfig(ckpt="runs/demo/ckpt"))      # loads the checkpoint in the background
    create_app(config, model=model, tokenizer=tok)       # serves a model already in memory
    run_server(config)                                   # uvicorn on config.host:config.port, SIGTERM drains
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ..errors import LLMClockError
from .config import ServerConfig
from .errors import APIError, install
from .loop import EngineLoop, load_engine
from .metrics import Metrics
from .security import KeyChecker, RateLimiter, redact

ACCESS_LOG = "llmclock.server.access"
ROUTES = ("/", "/health", "/ready", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
          "/openapi.json", "/docs")


class Server:
    """What the routes share: config, engine loop, metrics, key checker, rate limiter."""

    def __init__(self, config: ServerConfig, model=None, tokenizer=None, access_log: logging.Logger | None = None,
                 template=None):
        from concurrent.futures import ThreadPoolExecutor

        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.template = template
        """The chat template (sft.ChatTemplate): given, else the adapter's or the checkpoint's, else the default."""
        self.workers = ThreadPoolExecutor(2, thread_name_prefix="llmclock-prompt")
        """Redaction, chat templates and tokenisation run here, off the event loop."""
        self.keys = KeyChecker(config.keys())
        self.limiter = RateLimiter(config.rpm, config.tpm)
        self.metrics = Metrics()
        self.engine = self.loop = None
        """The engine loop, once the model is loaded and runs; `engine` too when it runs in this process."""
        self.max_len = self.vocab_size = None
        self.load_error: str | None = None
        """Why the model cannot serve (it failed to load, or its engine process died), once it cannot."""
        self.created = int(time.time())
        self.access = access_log or logging.getLogger(ACCESS_LOG)
        self.gather_metrics = None
        """Set on Ray Serve replicas: an async function returning every replica's metrics (Prometheus text)."""
        self.on_fail = None
        """Called (from the loading thread) when the model cannot be loaded; run_server stops uvicorn."""

    def load(self) -> None:
        """Load the checkpoint (unless given a model), build the engine and start its loop: a checkpoint
        in an engine process of its own (config.engine_process), a model given on a thread of this one."""
        try:
            if self.template is None:
                from ..chat import DEFAULT, template_for

                self.template = template_for(self.config.ckpt, self.config.adapter) if self.config.ckpt else DEFAULT
            if self.model is None and self.config.engine_process:
                from ..checkpoint import load_tokenizer, read_config

                ckpt = Path(self.config.ckpt)
                self.tokenizer = load_tokenizer(ckpt, read_config(ckpt))  # to encode prompts and show tokens
                loop = EngineLoop.in_process(self.config, self.metrics)
                self.max_len, self.vocab_size = loop.info["max_len"], loop.info["vocab_size"]
            else:
                loop = self._thread_loop()
            loop.start(on_dead=self._engine_died)
            self.loop = loop
            self.metrics.ready.set(1)
        except (LLMClockError, OSError, RuntimeError) as e:
            self._failed(f"cannot load the model: {e}")

    def _thread_loop(self) -> EngineLoop:
        self.engine = load_engine(self.config, self.model, self.tokenizer)
        self.model, self.tokenizer = self.engine.model, self.engine.tokenizer
        self.max_len, self.vocab_size = self.engine.max_len, self.model.config.vocab_size
        return EngineLoop.in_thread(self.engine, self.metrics, queue=self.config.queue, threads=self.config.threads)

    def _engine_died(self, message: str) -> None:
        self.metrics.ready.set(0)
        self._failed(message)

    def _failed(self, why: str) -> None:
        """The model cannot serve: say so, and stop the server (run_server then exits non-zero)."""
        self.load_error = why
        logging.getLogger("llmclock.server").error("%s", why)
        if self.on_fail is not None:
            self.on_fail()

    def encode(self, prompts: list) -> list[list[int]]:
        """Token ids of each prompt (texts encoded in one batch, which releases the GIL; id lists kept)."""
        texts = [p for p in prompts if isinstance(p, str)]
        encoded = iter(self.tokenizer.encode_batch(texts) if texts else [])
        return [next(encoded) if isinstance(p, str) else p for p in prompts]

    def require_ready(self) -> None:
        if self.loop is None or self.load_error is not None:
            raise APIError(503, "the model is still loading" if self.load_error is None
                           else self.load_error, headers={"Retry-After": "2"})

    def sampling(self, body, max_tokens: int, stop: list[str], top: int):
        from ..engine import SamplingParams

        bias = {}
        for k, v in (body.logit_bias or {}).items():
            try:
                bias[int(k)] = float(v)
            except ValueError:
                raise APIError(400, f"logit_bias: key {k[:32]!r} is not a token id", param="logit_bias") from None
        params = SamplingParams(
            max_new_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
            min_p=body.min_p, repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, logit_bias=bias, stop=stop, seed=body.seed, logprobs=top,
        )
        params.check_vocab(self.vocab_size)
        return params

    def authorize(self, request: Request) -> None:
        """The routes' dependency: 401 unless a configured key is presented (no keys: everyone)."""
        request.state.key = None
        if not self.keys.enabled:
            return
        key = self.keys.check(request.headers.get("authorization"))
        if key is None:
            self.metrics.rejected.labels("auth").inc()
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        request.state.key = key


class Gate:
    """Pure ASGI middleware around every request: body cap (413), metrics, one JSON access-log line."""

    def __init__(self, app, server: Server):
        self.app, self.s = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s, t0, status = self.s, time.perf_counter(), [0]
        state = scope.setdefault("state", {})

        async def send_status(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        body, too_big = await self._read_body(scope, receive)
        if too_big:
            state["error"] = f"request body larger than {s.config.max_body} bytes"
            await APIError(413, state["error"]).response()(scope, receive, send_status)
        else:
            sent = [body is None]

            async def replay():
                if not sent[0]:
                    sent[0] = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_status)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        dt = time.perf_counter() - t0
        s.metrics.requests.labels(route, str(status[0])).inc()
        s.metrics.request_seconds.labels(route).observe(dt)
        if route not in ("/metrics", "/health", "/ready"):
            self._log(scope, state, status[0], dt)

    async def _read_body(self, scope, receive) -> tuple[bytes | None, bool]:
        """The whole body, up to the cap (requests are small; streaming bodies are not accepted)."""
        cap = self.s.config.max_body
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            return None, True
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return None, False
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                break
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > cap:
                return None, True
            if not msg.get("more_body"):
                break
        return b"".join(chunks), False

    def _log(self, scope, state: dict, status: int, dt: float) -> None:
        client = scope.get("client")
        rec = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), "method": scope["method"],
               "path": scope["path"], "status": status, "ms": round(dt * 1000, 2),
               "client": client[0] if client else None, "key": state.get("key")}
        rec.update(state.get("usage") or {})
        if state.get("error"):
            rec["error"] = state["error"]
        if state.get("prompt") is not None:
            rec["prompt"] = state["prompt"]
        line = json.dumps(rec, ensure_ascii=False)
        self.s.access.info(redact(line) if self.s.config.redact else line)


def create_app(config: ServerConfig | None = None, *, model=None, tokenizer=None,
               access_log: logging.Logger | None = None, template=None) -> FastAPI:
    """A new app with its own engine, metrics and limits. Give `model` and `tokenizer`, or config.ckpt
    (and config.adapter). Chat uses `template` (an sft.ChatTemplate), else the one config.adapter or
    config.ckpt stores, else the default. Access-log lines (JSON) go to `access_log`, by default the
    logger named llmclock.server.access."""
    config = config or ServerConfig()
    if model is None and not config.ckpt:
        raise LLMClockError("serve: give a checkpoint (--ckpt) or a model")
    server = Server(config, model, tokenizer, access_log, template)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=server.load, name="llmclock-load", daemon=True).start()
        yield
        if server.loop is not None:
            server.loop.stop()
        server.workers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="llmclock", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible completions on llmclock's clocked engine, with per-cycle traces.")
    app.state.server = server
    install(app)
    from .api import build_router

    app.include_router(build_router(server.authorize))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def playground():
        return HTMLResponse(resources.files(__package__).joinpath("static/index.html").read_text())

    @app.get("/health")
    def health():
        """The process is up (no key needed)."""
        return {"status": "ok"}

    @app.get("/ready")
    def ready():
        """The model is loaded and the server accepts requests (no key needed)."""
        if server.loop is None or server.loop.draining or server.load_error:
            why = "failed" if server.load_error else "draining" if server.loop is not None else "loading"
            return JSONResponse({"status": why, "error": server.load_error}, status_code=503)
        return {"status": "ready", "model": config.model_name, "slots": config.slots}

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        data, ctype = server.metrics.render()
        if server.gather_metrics is not None:  # a Ray Serve replica: every replica's, labelled
            data = await server.gather_metrics()
        return Response(data, media_type=ctype)

    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Gate, server=server)
    return app


def _version() -> str:
    from .. import __version__

    return __version__
