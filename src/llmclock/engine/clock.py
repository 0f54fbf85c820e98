"""The clock: prefill, then one tick per token for every active slot.

    state (KV cache) + one token per slot  --tick-->  next state + one token per slot

`prefill` and `tick` are small top-level functions (so `tick` can be compiled); the Engine
around them keeps the slots, schedules each cycle (admit waiting sequences into free slots and
prefill them, else tick the running ones), samples, and yields one Event per sequence per cycle.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F

from ..errors import LLMClockError
from .detok import Detokenizer, StopMatcher
from .kernels import make_attend, make_linear
from .kv_cache import KVCache
from .sampler import SamplingParams, apply_penalties, draw, filter_logits


class SeqState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    state: SeqState = SeqState.WAITING
    slot: int | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    seed: int | None = None
    """The seed this sequence sampled with (drawn at random when the params gave none)."""
    generator: torch.Generator | None = None
    detok: Detokenizer | None = None
    stopper: StopMatcher | None = None
    seen: torch.Tensor | None = None  # (V,) counts in prompt + output, for penalties
    generated: torch.Tensor | None = None  # (V,) counts in output only

    @property
    def position(self) -> int:
        """Position of the next token fed to the model (the last one sampled)."""
        return len(self.prompt_ids) + len(self.output_ids) - 1


@dataclass
class Event:
    """One sequence's output in one clock cycle."""

    request_id: str
    cycle: int
    slot: int
    position: int
    """Position the new token will occupy in the sequence."""
    token_id: int
    text: str
    """Text released this cycle (may be empty while a character or a possible stop string is pending)."""
    logprob: float
    top: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    """None while running; 'stop' (end-of-text, stop token or string) or 'length' when done."""


@dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float]


class Probe:
    """Tracing hook interface: the engine calls these only when a probe is attached."""

    def begin(self, kind: str, slots: list[int]) -> None: ...
    def mark(self, stage: str) -> None: ...
    def residual(self, layer: int, x: torch.Tensor) -> None: ...
    def end(self, events: list[Event], logits: torch.Tensor, logprobs: torch.Tensor) -> None: ...


class DecodePlan:
    """The model's weights laid out for `tick`: plain tuples, packed linears, no module lookups.

    Each nn.Linear becomes a function f(x, *, gelu=False, out=None, accumulate=False): by default
    its weight is packed once into the panel layout of kernels.py, whose compiled GEMV streams it
    at memory speed with bias, GELU and the residual add fused; `packed=False` keeps plain torch
    ops (what torch.compile traces). A tick on a 12-layer model makes ~200 calls, so resolving
    `block.attn.c_attn` (~2 us per nn.Module attribute here) once at construction matters. The
    packed copies are taken now: an engine serves frozen weights.
    """

    def __init__(self, model, *, packed: bool = True):
        tr, cfg = model.transformer, model.config
        lin = {m: _linear(m, packed, cfg.gelu_approximate)
               for m in model.modules() if isinstance(m, torch.nn.Linear) or hasattr(m, "decode_linear")}
        self.n_head, self.shape = cfg.n_head, (cfg.n_embd,)
        self.wte, self.wpe = tr.wte.weight, tr.wpe.weight
        self.layers = [
            (b.ln_1.weight, b.ln_1.bias, b.ln_1.eps, lin[b.attn.c_attn], lin[b.attn.c_proj],
             b.ln_2.weight, b.ln_2.bias, b.ln_2.eps, lin[b.mlp.c_fc], lin[b.mlp.c_proj])
            for b in tr.h
        ]
        self.ln_f = (tr.ln_f.weight, tr.ln_f.bias, tr.ln_f.eps)
        self.head = lin[model.lm_head]


def _linear(m, packed: bool, approximate: str):
    """make_linear for an nn.Linear; a layer with its own `decode_linear` (llmclock.compress's
    quantized layers) brings its own kernel with the same signature."""
    if hasattr(m, "decode_linear"):
        return m.decode_linear(packed=packed, approximate=approximate)
    return make_linear(m.weight, m.bias, packed=packed, approximate=approximate)


def tick(plan: DecodePlan, cache: KVCache, tokens, pos, L: int, mask, probe: Probe | None = None, attend=None):
    """One decode cycle for slots 0..n-1: tokens (n,), positions (n,) -> next-token logits (n, V).

    Writes each slot's key/value at its own position, then attends over its history: with the
    compiled `attend` (kernels.make_attend) each row over exactly its own positions; otherwise
    by index writes and SDPA over the first L positions (mask: (n, 1, 1, L), or None when every
    row may see all L).
    """
    n, nh, shape = tokens.size(0), plan.n_head, plan.shape
    C = shape[0]
    x = F.embedding(tokens, plan.wte) + F.embedding(pos, plan.wpe)  # (n, C)
    rows = torch.arange(n, device=x.device) if attend is None else None  # slot index of each row, for cache writes
    if probe is not None:
        probe.mark("embed")
    for i, (w1, b1, e1, attn, proj, w2, b2, e2, fc, mproj) in enumerate(plan.layers):
        qkv = attn(F.layer_norm(x, shape, w1, b1, e1))  # (n, 3C)
        kc, vc = cache.k[i], cache.v[i]
        if attend is not None:
            y = attend(qkv, kc, vc, pos)  # (n, C)
        else:
            q, k, v = qkv.view(n, 3, nh, C // nh).unbind(1)  # 3 x (n, nh, hs)
            kc[rows, :, pos] = k
            vc[rows, :, pos] = v
            y = F.scaled_dot_product_attention(q.unsqueeze(2), kc[:n, :, :L], vc[:n, :, :L], attn_mask=mask)  # (n, nh, 1, hs)
        proj(y.view(n, C), out=x, accumulate=True)  # x += c_proj(y), fused
        mproj(fc(F.layer_norm(x, shape, w2, b2, e2), gelu=True), out=x, accumulate=True)  # x += mlp(ln_2(x))
        if probe is not None:
            probe.residual(i, x)
            probe.mark(f"block{i}")
    logits = plan.head(F.layer_norm(x, shape, *plan.ln_f))  # (n, V)
    if probe is not None:
        probe.mark("head")
    return logits


def prefill(model, cache: KVCache, slot: int, ids: torch.Tensor, probe: Probe | None = None):
    """Run a prompt (1, T) through the model in one forward, filling `slot`; -> last logits (1, V)."""
    T = ids.size(1)
    views = cache.prefill_views(slot, 0, T)
    mask = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()  # (T, T) causal
    x = model.embed(ids, torch.arange(T, device=ids.device))
    if probe is not None:
        probe.mark("embed")
    for i, block in enumerate(model.transformer.h):
        x = block(x, views[i], mask)
        if probe is not None:
            probe.residual(i, x[:, -1])
            probe.mark(f"block{i}")
    logits = model.head(x[:, -1])  # (1, V)
    if probe is not None:
        probe.mark("head")
    return logits


class Engine:
    """Slots of a preallocated cache, each running one sequence that starts and stops on its own.

    With tokenizer=None the engine works on token ids alone (events carry no text).
    """

    def __init__(self, model, tokenizer, *, slots: int = 1, max_len: int | None = None, compile: bool = False):
        if slots < 1:
            raise LLMClockError(f"engine: slots must be >= 1, got {slots}")
        cfg = model.config
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_len = min(max_len or cfg.block_size, cfg.block_size)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cache = KVCache(
            cfg.n_layer, slots, cfg.n_head, self.max_len, cfg.head_size, dtype=p.dtype, device=p.device
        )
        self.plan = DecodePlan(model, packed=not compile)
        self.attend = None if compile else make_attend(self.cache.k[0])
        self.compiled = compile
        self._tick = torch.compile(tick, dynamic=False) if compile else tick
        self.free = list(range(slots))
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}
        self.cycle = 0
        self.probe: Probe | None = None
        self._ids = itertools.count()

    @property
    def slots(self) -> int:
        return self.cache.slots

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
        if params.needs_counts:
            V = self.model.config.vocab_size
            seq.seen = torch.bincount(torch.tensor(ids), minlength=V).to(self.device)
            seq.generated = torch.zeros(V, dtype=torch.long, device=self.device)
        self.waiting.append(seq)
        return seq

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> None:
        """Drop a sequence (waiting or running), freeing its slot."""
        self.waiting = deque(s for s in self.waiting if s.request_id != request_id)
        for slot, s in list(self.running.items()):
            if s.request_id == request_id:
                self._finish(s, "abort")

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One clock cycle: prefill newly admitted sequences, or tick every running one."""
        if not self.has_work():
            return []
        self.cycle += 1
        probe = self.probe
        if self.waiting and self.free:
            seqs = []
            while self.waiting and self.free:
                seq = self.waiting.popleft()
                seq.slot, seq.state = self.free.pop(0), SeqState.RUNNING
                self.running[seq.slot] = seq
                seqs.append(seq)
            if probe is not None:
                probe.begin("prefill", [s.slot for s in seqs])
            logits = torch.cat([
                prefill(self.model, self.cache, s.slot, torch.tensor([s.prompt_ids], device=self.device), probe)
                for s in seqs
            ])
            for s in seqs:
                self.cache.lengths[s.slot] = len(s.prompt_ids)
            return self._postprocess(seqs, logits)
        n = max(self.running) + 1
        if probe is not None:
            probe.begin("tick", sorted(self.running))
        tokens = [0] * n
        pos = [0] * n
        for slot, s in self.running.items():
            tokens[slot], pos[slot] = s.output_ids[-1], s.position
        if self.compiled:
            L, n_rows = self.max_len, self.slots  # fixed shapes: one compiled graph
            tokens += [0] * (n_rows - n)
            pos += [0] * (n_rows - n)
        else:
            L, n_rows = max(pos) + 1, n
        pos_t = torch.tensor(pos, device=self.device)
        mask = None
        if self.attend is None and (n_rows > 1 or self.compiled):
            mask = (torch.arange(L, device=self.device)[None, :] <= pos_t[:, None]).view(n_rows, 1, 1, L)
        logits = self._tick(self.plan, self.cache, torch.tensor(tokens, device=self.device), pos_t, L, mask, probe,
                            self.attend)
        for slot, s in self.running.items():
            self.cache.lengths[slot] = s.position + 1
        seqs = [self.running[slot] for slot in sorted(self.running)]
        return self._postprocess(seqs, logits[[s.slot for s in seqs]] if n_rows != len(seqs) else logits)

    def _postprocess(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Event]:
        """Sample one token per sequence, release text, detect stops, free finished slots."""
        probe = self.probe
        logits = logits.float()
        raw_lp = torch.log_softmax(logits, dim=-1)  # (n, V): the model's own distribution
        params = [s.params for s in seqs]
        if any(p.logit_bias or p.needs_counts for p in params):
            logits = logits.clone()
            for i, s in enumerate(seqs):
                for t, b in s.params.logit_bias.items():
                    logits[i, t] += b
                if s.params.needs_counts:
                    apply_penalties(logits[i], s.params, s.seen, s.generated)
        if all(p.greedy for p in params):
            chosen = logits.argmax(-1)
        else:
            chosen = draw(filter_logits(logits, params), params, [s.generator for s in seqs])
        n_top = max(p.logprobs for p in params)
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
            if s.generated is not None:
                s.generated[tok] += 1
                s.seen[tok] += 1
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
        s.state, s.finish_reason = SeqState.FINISHED, reason
        del self.running[s.slot]
        self.cache.lengths[s.slot] = 0
        self.free.append(s.slot)
        self.free.sort()

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

