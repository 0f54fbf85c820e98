"""The clocked engine: a preallocated KV cache in slots, prefill, then one tick per token."""

from .clock import Completion, Engine, Event, Probe, SeqState, Sequence, prefill, tick
from .kv_cache import KVCache
from .sampler import SamplingParams

__all__ = [
    "Completion", "Engine", "Event", "KVCache", "Probe", "SamplingParams", "SeqState", "Sequence", "prefill", "tick",
]
