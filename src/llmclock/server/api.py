"""The OpenAI-compatible routes: request -> sampling params and token ids -> a Job on the engine loop
-> a JSON response or a stream of server-sent events (`data: {chunk}` ... `data: [DONE]`)."""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..chat import render as render_chat
from ..errors import LLMClockError
from .errors import APIError
from .loop import Busy, Job, choice_params
from .schemas import ChatRequest, ChatResponse, CompletionRequest, CompletionResponse, ErrorResponse, ModelList
from .security import redact

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)}


def build_router(auth) -> APIRouter:
    router = APIRouter(dependencies=[Depends(auth)], responses=ERRORS)

    @router.get("/v1/models", response_model=ModelList)
    def models(request: Request):
        s = request.app.state.server
        s.require_ready()
        return {"object": "list", "data": [{"id": s.config.model_name, "object": "model", "created": s.created,
                                            "owned_by": "llmclock", "context_length": s.max_len}]}

    @router.post("/v1/completions", response_model=CompletionResponse)
    async def completions(body: CompletionRequest, request: Request):
        s = request.app.state.server
        prompts = body.prompt if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else [body.prompt]

        def prepare():
            texts = [p if isinstance(p, str) else None for p in prompts]
            given = [redact(p) if isinstance(p, str) and s.config.redact_prompts else p for p in prompts]
            return s.encode(given), texts

        size = sum(len(p) for p in prompts if isinstance(p, str))
        return await _serve(request, body, "completion", len(prompts), prepare, size,
                            body.max_tokens or min(16, s.config.max_tokens or 16), [], body.logprobs is not None,
                            body.logprobs or 0)

    @router.post("/v1/chat/completions", response_model=ChatResponse)
    async def chat(body: ChatRequest, request: Request):
        s = request.app.state.server

        def prepare():
            """Messages -> the prompt in the checkpoint's (or its adapter's) chat template."""
            messages = []
            for m in body.messages:
                content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
                if s.config.redact_prompts:
                    content = redact(content)
                messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
            prompt = render_chat(messages, s.template)
            return s.encode([prompt]), [prompt]

        max_tokens = body.max_completion_tokens or body.max_tokens
        size = sum(len(m.content) if isinstance(m.content, str) else sum(len(p.text) for p in m.content or [])
                   for m in body.messages)
        return await _serve(request, body, "chat", 1, prepare, size, max_tokens, list(s.template.stop), body.logprobs,
                            (body.top_logprobs or 0) if body.logprobs else 0)

    return router


def retry_after(seconds: float) -> dict:
    """The Retry-After header: whole seconds, at least 1."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


INLINE_CHARS = 8192
"""Prompts up to this many characters are prepared on the event loop (tens of microseconds: less than
the hand-off to a worker thread); longer ones on a worker thread."""


async def _serve(request: Request, body, kind: str, n_prompts: int, prepare, size: int, max_tokens: int | None,
                 extra_stop: list[str], want_logprobs: bool, top: int):
    """`prepare()` -> (token ids of each prompt, prompt texts for the log): redaction, the chat template
    and tokenisation; for prompts of more than INLINE_CHARS characters (`size`) on a worker thread, so
    that a huge prompt does not hold up other streams' events."""
    s = request.app.state.server
    s.require_ready()
    if body.model is not None and body.model != s.config.model_name:
        raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{s.config.model_name}'",
                       type="invalid_request_error", param="model", code="model_not_found")
    choices = n_prompts * body.n
    if choices > s.config.max_n:
        raise APIError(400, f"n x prompts = {choices} choices; this server allows at most {s.config.max_n}", param="n")
    if size <= INLINE_CHARS:
        ids, texts = prepare()
    else:
        ids, texts = await asyncio.get_running_loop().run_in_executor(s.workers, prepare)
    V, ctx, cap = s.vocab_size, s.max_len, s.config.max_tokens
    if cap and max_tokens and max_tokens > cap:
        raise APIError(400, f"max_tokens is {max_tokens}; this server generates at most {cap} tokens per choice",
                       param="max_tokens")
    for p in ids:
        if not p:
            raise APIError(400, "the prompt is empty after tokenisation", param="prompt")
        if any(t >= V for t in p):
            raise APIError(400, f"the prompt has token ids outside the vocabulary (0..{V - 1})", param="prompt")
        need = len(p) + (max_tokens or 1)
        if need > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{need} tokens ({len(p)} in the prompt, {max_tokens or 1} for the completion). "
                                "Please reduce the prompt or max_tokens.", param="max_tokens",
                           code="context_length_exceeded")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    params = []
    try:
        for p in ids:
            base = s.sampling(body, max_tokens or min(cap or ctx, ctx - len(p)), stop + extra_stop, top)
            params += choice_params(base, body.n)
    except LLMClockError as e:
        raise APIError(400, str(e).removeprefix("sampling: ")) from None
    job = Job([p for p in ids for _ in range(body.n)], params, trace=bool(body.llmclock and body.llmclock.trace))
    key = request.state.key or f"addr-{request.client.host if request.client else '?'}"
    usage_budget = sum(len(p) for p in job.prompts) + sum(x.max_new_tokens for x in params)
    wait = s.limiter.acquire(key, usage_budget)
    if wait:
        s.metrics.rejected.labels("rate_limit").inc()
        if wait == float("inf"):
            raise APIError(429, f"this request needs {usage_budget} tokens, more than the {s.config.tpm} tokens per "
                                "minute allowed", type="rate_limit_exceeded", code="rate_limit_exceeded")
        raise APIError(429, "rate limit reached for this key; retry later", type="rate_limit_exceeded",
                       code="rate_limit_exceeded", headers=retry_after(wait))
    try:
        s.loop.submit(job)
    except Busy as e:
        s.metrics.rejected.labels("draining" if e.draining else "queue_full").inc()
        if e.draining:
            raise APIError(503, "the server is shutting down", type="server_unavailable",
                           headers=retry_after(e.retry_after)) from None
        raise APIError(429, "the server is at capacity (admission queue full); retry later",
                       type="server_busy", code="queue_full", headers=retry_after(e.retry_after)) from None
    out = Output(s, kind, job, [len(p) for p in ids], body.n, want_logprobs)
    request.state.usage = out.usage_log
    if s.config.log_prompts:
        request.state.prompt = texts
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(s, job, out, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _collect(request, s, job, out)


async def _collect(request: Request, s, job: Job, out: Output) -> JSONResponse:
    """Wait for every choice to finish; abort if the client goes away meanwhile."""
    try:
        while job.open:
            try:
                items = await asyncio.wait_for(job.queue.get(), 0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    s.loop.abort(job)
                    return JSONResponse({}, status_code=499)
                continue
            out.feed(items)
    except asyncio.CancelledError:
        s.loop.abort(job)
        raise
    return JSONResponse(out.response())


async def _stream(s, job: Job, out: Output, include_usage: bool):
    """SSE frames, one per token event that carries something; the job is aborted if the client leaves."""
    try:
        for chunk in out.opening():
            yield _sse(chunk, include_usage)
        while job.open:
            items = await job.queue.get()
            try:
                chunks = out.feed(items)
            except APIError as e:  # headers are gone: say it in the stream, as OpenAI does
                yield f"data: {json.dumps(e.body())}\n\n"
                return
            if chunks:  # one write for what one cycle brought (n > 1: a token per choice)
                yield "".join(_sse(chunk, include_usage) for chunk in chunks)
        if include_usage:
            yield _sse(out.chunk([], usage=out.usage()), True)
        yield "data: [DONE]\n\n"
    finally:
        if job.open:
            s.loop.abort(job)


def _sse(chunk: dict, include_usage: bool) -> str:
    if include_usage:
        chunk.setdefault("usage", None)
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


class Output:
    """Turns engine events into OpenAI chunks (streaming) or a whole response; counts usage."""

    def __init__(self, s, kind: str, job: Job, prompt_lens: list[int], n: int, want_logprobs: bool):
        self.kind, self.job, self.tok = kind, job, s.tokenizer
        self.model, self.created = s.config.model_name, int(time.time())
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.prompt_tokens = sum(prompt_lens)
        k = len(job.prompts)
        self.text = [""] * k
        self.tokens = [0] * k
        self.finish: list[str | None] = [None] * k
        self.logprobs = [[] for _ in range(k)] if want_logprobs else None
        self.trace: list[dict] = []
        self.usage_log: dict = {}
        self.metrics = s.metrics

    def opening(self) -> list[dict]:
        if self.kind != "chat":
            return []
        return [self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]) for i in range(len(self.text))]

    def feed(self, items: list) -> list[dict]:
        """One cycle's items for this job -> the chunks to stream (also accumulates the whole response)."""
        chunks = []
        for item in items:
            if item[0] == "error":
                self.job.open = 0
                raise APIError(item[2], item[1], type="server_error" if item[2] >= 500 else "invalid_request_error")
            _, i, ev, rec = item
            self.text[i] += ev.text
            self.tokens[i] += 1
            lp = self._logprob(ev, len(self.text[i]) - len(ev.text)) if self.logprobs is not None else None
            if lp is not None:
                self.logprobs[i].append(lp)
            if rec is not None:
                self.trace.append(rec)
            if ev.finish_reason is not None:
                self.finish[i] = ev.finish_reason
                self.job.open -= 1
            self.usage_log.update(self.usage())
            if not (ev.text or ev.finish_reason or lp is not None or rec is not None):
                continue
            c = {"index": i, "logprobs": self._pack([lp]) if lp is not None else None,
                 "finish_reason": ev.finish_reason}
            if self.kind == "chat":
                c["delta"] = {"content": ev.text} if ev.text else {}
            else:
                c["text"] = ev.text
            chunk = self.chunk([c])
            if rec is not None:
                chunk["llmclock"] = {"trace": [rec]}
            chunks.append(chunk)
        return chunks

    def chunk(self, choices: list[dict], **extra) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices, **extra}

    def usage(self) -> dict:
        done = sum(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done, "total_tokens": self.prompt_tokens + done}

    def response(self) -> dict:
        choices = []
        for i, text in enumerate(self.text):
            lp = self._pack(self.logprobs[i]) if self.logprobs is not None else None
            if self.kind == "chat":
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                                "finish_reason": self.finish[i]})
            else:
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": self.finish[i]})
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
               "usage": self.usage()}
        if self.job.trace:
            out["llmclock"] = {"trace": self.trace}
        return out

    # ---------------------------------------------------------------- logprobs in OpenAI's two shapes

    def _piece(self, t: int) -> str:
        return self.tok.decode([t])

    def _logprob(self, ev, offset: int) -> dict:
        top = [(self._piece(t), lp) for t, lp in (ev.top or [])]
        return {"token": self._piece(ev.token_id), "logprob": ev.logprob, "top": top, "offset": offset}

    def _pack(self, lps: list[dict]) -> dict:
        if self.kind == "chat":
            def entry(tok, lp):
                return {"token": tok, "logprob": lp, "bytes": list(tok.encode())}

            return {"content": [{**entry(x["token"], x["logprob"]), "top_logprobs": [entry(t, v) for t, v in x["top"]]}
                                for x in lps]}
        return {"tokens": [x["token"] for x in lps], "token_logprobs": [x["logprob"] for x in lps],
                "top_logprobs": [dict(x["top"]) for x in lps], "text_offset": [x["offset"] for x in lps]}
