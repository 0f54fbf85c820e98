"""An OpenAI-compatible HTTP server on the clocked engine (FastAPI + uvicorn; `pip install 'llmclock[serve]'`).

    from llmclock.server import ServerConfig, create_app, run_server
    app = create_app(ServerConfig(ckpt="runs/demo/ckpt", api_keys=["..."]))   # any ASGI host
    run_server(ServerConfig(ckpt="runs/demo/ckpt", port=8000))                 # uvicorn, SIGTERM drains
"""

from .config import ServerConfig


def create_app(*args, **kwargs):
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


def run_server(*args, **kwargs):
    from .run import run_server as _run_server

    return _run_server(*args, **kwargs)


__all__ = ["ServerConfig", "create_app", "run_server"]
