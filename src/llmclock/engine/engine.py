"""The engine loop: each cycle is schedule -> run -> postprocess.

    schedule     the Scheduler picks the sequences (and their slots) that run this cycle
    run          the ModelRunner prefills them or ticks them: one next-token row of logits each
    postprocess  sample, release text, detect stops, free finished slots; one Event per sequence

Sequences start and stop on their own; `generate` yields every event cycle by cycle, `complete`
collects them.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Iterator

import torch

from ..errors import LLMClockError
from .detok import Detokenizer, StopMatcher
from .runner import ModelRunner, Probe
from .sampler import SamplingParams, TokenCounts, apply_bias_and_penalties, draw, filter_logits
from .scheduler import Scheduler
from .sequence import Completion, Event, Sequence


DEFAULT_BATCHED_TOKENS = 128
"""Tokens per cycle (ticks + prompt chunks) unless the engine is given another budget. It trades a
new prompt's time to first token (a prompt over the budget takes several cycles) against how long
a cycle with a prompt in it keeps the running sequences waiting (bench/batching.py measures both)."""


class Engine:
    """Slots of a preallocated cache, each running one sequence that starts and stops on its own.

    With tokenizer=None the engine works on token ids alone (events carry no text).
    `max_batched_tokens` bounds a cycle's work, as in vLLM: one token per ticking sequence plus
    prompt tokens, so a long prompt is prefilled in chunks while the others keep ticking.
    """

    def __init__(self, model, tokenizer, *, slots: int = 1, max_len: int | None = None, compile: bool = False,
                 max_batched_tokens: int | None = None):
        if slots < 1:
            raise LLMClockError(f"engine: slots must be >= 1, got {slots}")
        max_batched_tokens = max_batched_tokens or max(DEFAULT_BATCHED_TOKENS, slots + 1)
        if max_batched_tokens <= slots:
            raise LLMClockError(f"engine: max_batched_tokens ({max_batched_tokens}) must exceed slots ({slots}), "
                                "so that prompts progress while every other slot ticks")
        cfg = model.config
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_len = min(max_len or cfg.block_size, cfg.block_size)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.runner = ModelRunner(model, slots=slots, max_len=self.max_len, compile=compile)
        self.scheduler = Scheduler(slots, max_batched_tokens)
        self.counts = TokenCounts(slots, cfg.vocab_size, self.device)
        self.cache, self.compiled = self.runner.cache, compile
        self.max_batched_tokens = max_batched_tokens
        self.cycle = 0
        self.probe: Probe | None = None
        self._ids = itertools.count()

    @property
    def slots(self) -> int:
        return self.cache.slots

    @property
    def running(self) -> dict[int, Sequence]:
        """slot -> the sequence running in it."""
        return self.scheduler.running

    @property
    def waiting(self):
        return self.scheduler.waiting

    def add(self, prompt: str | list[int], params: SamplingParams | None = None, *, request_id: str | None = None,
            truncate: bool = False) -> Sequence:
        """Queue a sequence; it is prefilled at the next cycle with a free slot."""
        params = params or SamplingParams()
        params.check_vocab(self.model.config.vocab_size)
        if isinstance(prompt, str) and self.tokenizer is None:
            raise LLMClockError("this engine has no tokenizer: give prompts as token ids")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise LLMClockError("prompt is empty (give at least one token)")
        if any(not 0 <= t < self.model.config.vocab_size for t in ids):
            raise LLMClockError("prompt has token ids outside the vocabulary")
        if len(ids) > self.max_len:
            if not truncate:
                raise LLMClockError(
                    f"prompt has {len(ids)} tokens but the context holds {self.max_len}; shorten it or truncate from the left"
                )
            ids = ids[-self.max_len :]
        seq = Sequence(str(request_id if request_id is not None else next(self._ids)), ids, params)
        if not params.greedy:
            seq.seed = params.seed if params.seed is not None else int(torch.randint(2**62, (1,)).item())
            seq.generator = torch.Generator(device=self.device).manual_seed(seq.seed)
        seq.detok, seq.stopper = Detokenizer(self.tokenizer), StopMatcher(params.stop)
        self.scheduler.add(seq)
        return seq

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def abort(self, request_id: str) -> None:
        """Drop a sequence (waiting or running), freeing its slot."""
        self.scheduler.drop_waiting(request_id)
        for s in list(self.running.values()):
            if s.request_id == request_id:
                self._finish(s, "abort")

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One clock cycle: schedule, run (prefill prompt chunks, tick the running sequences), postprocess.

        Events come in the order the sequences ran: those whose prompt finished prefilling this
        cycle, then the ticked ones in slot order. A cycle that only advances a long prompt's
        prefill emits no event."""
        if not self.has_work():
            return []
        self.cycle += 1
        probe = self.probe
        plan = self.scheduler.schedule()
        for c in plan.prefill:
            if c.start == 0 and c.seq.params.needs_counts:
                self.counts.admit(c.seq.slot, c.seq.prompt_ids)
        if probe is not None:
            probe.begin(plan.kind, plan.slots)
        logits = self.runner.run(plan.prefill, plan.decode, probe)
        seqs = [c.seq for c in plan.prefill if c.last] + plan.decode
        return self._postprocess(seqs, logits)

    def _postprocess(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Event]:
        """Sample one token per sequence, release text, detect stops, free finished slots."""
        probe = self.probe
        logits = logits.float()
        raw_lp = torch.log_softmax(logits, dim=-1)  # (n, V): the model's own distribution
        params = [s.params for s in seqs]
        slots = [s.slot for s in seqs]
        logits = apply_bias_and_penalties(logits, params, slots, self.counts)
        if all(p.greedy for p in params):
            chosen = logits.argmax(-1)
        else:
            chosen = draw(filter_logits(logits, params), params, [s.generator for s in seqs])
        self.counts.add(slots, chosen)
        n_top = max((p.logprobs for p in params), default=0)
        top_v = top_i = None
        if n_top:
            top_v, top_i = torch.topk(raw_lp, n_top, dim=-1)
            top_v, top_i = top_v.tolist(), top_i.tolist()
        chosen_lp = raw_lp.gather(1, chosen[:, None]).squeeze(1).tolist()
        chosen = chosen.tolist()
        if probe is not None:
            probe.mark("sample")
        events = []
        eot = self.tokenizer.eot_id if self.tokenizer is not None else None
        for i, (s, tok) in enumerate(zip(seqs, chosen)):
            p = s.params
            s.output_ids.append(tok)
            ev = Event(s.request_id, self.cycle, s.slot, s.position, tok, "", chosen_lp[i])
            if n_top and p.logprobs:
                ev.top = list(zip(top_i[i][: p.logprobs], top_v[i][: p.logprobs]))
            if tok in p.stop_token_ids or (tok == eot and not p.ignore_eos):
                ev.text = s.stopper.feed(s.detok.flush())[0] + s.stopper.flush()
                reason = "stop"
            else:
                piece, stopped = s.stopper.feed(s.detok.push(tok))
                ev.text, reason = piece, "stop" if stopped else None
                if reason is None and (len(s.output_ids) >= p.max_new_tokens or s.position >= self.max_len):
                    tail, stopped = s.stopper.feed(s.detok.flush())
                    ev.text += tail + ("" if stopped else s.stopper.flush())
                    reason = "stop" if stopped else "length"
            s.text += ev.text
            if reason is not None:
                self._finish(s, reason)
                ev.finish_reason = reason
            events.append(ev)
        if probe is not None:
            probe.end(events, logits, raw_lp)
        return events

    def _finish(self, s: Sequence, reason: str) -> None:
        self.scheduler.finish(s, reason)
        self.runner.release(s.slot)

    def generate(self, prompts: Iterable[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 *, truncate: bool = False) -> Iterator[Event]:
        """Queue the prompts and yield every event, cycle by cycle, until all have finished."""
        self._add_all(prompts, params, truncate)
        while self.has_work():
            yield from self.step()

    def _add_all(self, prompts, params, truncate: bool) -> list[Sequence]:
        prompts = list(prompts)
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise LLMClockError("give one SamplingParams per prompt, or one for all")
        return [self.add(pr, pa, truncate=truncate) for pr, pa in zip(prompts, plist)]

    def complete(self, prompts, params=None, *, truncate: bool = False) -> list[Completion]:
        """Run prompts to completion; results in prompt order."""
        seqs = self._add_all(prompts, params, truncate)
        logprobs: dict[str, list[float]] = {s.request_id: [] for s in seqs}
        while self.has_work():
            for ev in self.step():
                logprobs.setdefault(ev.request_id, []).append(ev.logprob)
        return [
            Completion(s.request_id, s.prompt_ids, s.output_ids, s.text, s.finish_reason, logprobs[s.request_id])
            for s in seqs
        ]
