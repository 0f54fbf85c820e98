"""`llmclock serve`: the OpenAI-compatible HTTP server (llmclock.server) on a checkpoint."""

from __future__ import annotations

from ..errors import LLMClockError
from ..server.config import KEYS_ENV, ServerConfig
from ..server.replicas import ReplicaConfig
from . import options
from .common import add_adapter, add_device_flags, echo
from .options import add_config_flags, config_from_args, explicit_fields

SERVER_FLAGS = {name: None for name in (
    "host", "port", "slots", "queue", "max_n", "max_tokens", "rpm", "tpm", "max_body", "drain_timeout",
    "redact", "redact_prompts", "log_prompts", "engine_process")}


REPLICA_FLAGS = {"min_replicas": None, "max_replicas": None, "target_ongoing_requests": None,
                 "upscale_delay_s": "--upscale-delay", "downscale_delay_s": "--downscale-delay",
                 "num_cpus": "--cpus-per-replica", "address": "--ray-address"}


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over HTTP: OpenAI-compatible API, playground, metrics",
                       description="OpenAI-compatible completions and chat on the clocked engine, with continuous "
                       "batching, the per-cycle trace, API keys, rate limits, Prometheus /metrics and a playground "
                       "at /. Binds 127.0.0.1 unless --host says otherwise.")
    p.add_argument("--ckpt", required=True, type=options.nonempty)
    add_adapter(p)
    p.add_argument("--model-name", dest="model_name", type=options.nonempty,
                   help="the model id clients send (default: the run directory's name)")
    g = p.add_argument_group("server")
    add_config_flags(g, ServerConfig, SERVER_FLAGS, types={"host": options.nonempty})
    s = p.add_argument_group("security")
    s.add_argument("--api-key", dest="api_keys", action="append", default=[], type=options.nonempty, metavar="KEY",
                   help=f"accept this bearer key (repeatable; also --api-keys-file and ${KEYS_ENV}); none = no auth")
    s.add_argument("--api-keys-file", type=options.nonempty, metavar="FILE", help="one key per line, # comments")
    s.add_argument("--cors-origin", dest="cors_origins", action="append", default=[], type=options.nonempty,
                   metavar="ORIGIN", help="allow browser calls from this origin (repeatable; default: no CORS)")
    add_device_flags(p)
    r = p.add_argument_group("replicas on Ray Serve (pip install 'llmclock[ray]')")
    r.add_argument("--ray", action="store_true", help="serve through Ray Serve's proxy on --host/--port: one "
                   "engine per replica, replicas added and removed with the load")
    add_config_flags(r, ReplicaConfig, REPLICA_FLAGS, types={"address": options.nonempty})
    p.set_defaults(fn=cmd_serve)


def cmd_serve(a) -> None:
    from ..server import run_server

    config = config_from_args(ServerConfig, a, ckpt=a.ckpt, adapter=a.adapter, model_name=a.model_name, api_keys=a.api_keys,
                              api_keys_file=a.api_keys_file, cors_origins=a.cors_origins, device=a.device,
                              threads=a.threads or 0)
    keys = config.keys()  # a bad keys file is an error now, not at the first request
    if not keys and config.host not in ("127.0.0.1", "localhost", "::1"):
        echo(f"llmclock: warning: serving on {config.host} without API keys: anyone who can reach it may use it")
    given = explicit_fields(ReplicaConfig, a, list(REPLICA_FLAGS))
    if a.ray:
        from ..server.replicas import serve_forever

        serve_forever(config, config_from_args(ReplicaConfig, a), echo=echo)
        return
    if given:
        flags = ", ".join(REPLICA_FLAGS[n] or "--" + n.replace("_", "-") for n in given)
        raise LLMClockError(f"{flags}: only with --ray")
    run_server(config, echo=echo)
