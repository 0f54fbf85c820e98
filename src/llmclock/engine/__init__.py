"""The clocked engine: a preallocated KV cache in slots, prefill, then one tick per token.

    sequence.py   a request's state (WAITING -> RUNNING -> FINISHED), Event, Completion
    scheduler.py  which sequences run this cycle, in which slot
    runner.py     the decode plan, the KV cache, `prefill` and `tick`
    engine.py     the loop: schedule -> run -> postprocess (sampling, detokenising, stops)
"""

from .engine import Engine
from .kv_cache import KVCache
from .runner import DecodePlan, LayerPlan, ModelRunner, Probe, prefill, tick
from .sampler import SamplingParams
from .scheduler import Scheduler
from .sequence import Completion, Event, SeqState, Sequence

__all__ = [
    "Completion", "DecodePlan", "Engine", "Event", "KVCache", "LayerPlan", "ModelRunner", "Probe", "SamplingParams",
    "Scheduler", "SeqState", "Sequence", "prefill", "tick",
]
