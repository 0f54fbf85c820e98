"""Multi-turn chat on the engine: a plain-text template and a history that fits the context.

GPT-2-style models have no chat tokens, so turns are rendered as labelled paragraphs (the
checkpoint's chat_template.json when fine-tuning stored one, else `System:` / `User:` /
`Assistant:`; see sft.ChatTemplate) and the assistant's turn ends at end-of-text or when the
model starts the next turn. With retrieval (`--docs`), each user turn's best passages go in a
system message in front of the conversation.
"""

from __future__ import annotations

from .errors import LLMClockError
from .sft import ROLES, ChatTemplate

DEFAULT = ChatTemplate()
STOP = DEFAULT.stop


def template_for(ckpt, adapter=None) -> ChatTemplate:
    """The chat template a model speaks: its adapter's (fine-tuned on chat), else its checkpoint's,
    else the default labels."""
    return (ChatTemplate.load(adapter) if adapter else None) or ChatTemplate.load(ckpt) or DEFAULT


def render(messages: list[dict], template: ChatTemplate = DEFAULT) -> str:
    """Messages [{'role', 'content'}] -> the prompt text, ending where the assistant speaks."""
    for m in messages:
        if m.get("role") not in ROLES:
            raise LLMClockError(f"chat: unknown role {m.get('role')!r} (use system, user or assistant)")
    return template.render([{"role": m["role"], "content": str(m.get("content", ""))} for m in messages])


def _fits(messages: list[dict], tokenizer, budget: int, template: ChatTemplate) -> bool:
    return len(tokenizer.encode(render(messages, template))) <= budget


def fit_history(messages: list[dict], tokenizer, budget: int, template: ChatTemplate = DEFAULT) -> list[dict]:
    """Drop the oldest non-system turns until the rendered prompt is at most `budget` tokens."""
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    while turns:
        msgs = system + turns
        if _fits(msgs, tokenizer, budget, template):
            return msgs
        turns = turns[1:]
    raise LLMClockError(f"chat: the message does not fit in the context ({budget} tokens for the prompt)")


def chat_loop(engine, params, *, system: str = "", echo=print, read=input, template: ChatTemplate | None = None,
              retrieve=None) -> list[dict]:
    """Read user lines until EOF or '/exit'; stream each reply. Returns the conversation.

    `retrieve(text)` -> passages (retrieval.Passage) for a user turn: those that fit the context
    go in front of the conversation and are listed after the reply.

    Ctrl-C while a reply streams stops that reply (what was said stays in the history) and
    returns to the prompt; Ctrl-C at the prompt propagates. A line that was not valid UTF-8
    (undecodable bytes arrive as surrogates) is refused with a note.
    """
    from .retrieval import with_passages

    template = template or DEFAULT
    params.stop = list(dict.fromkeys(list(params.stop) + template.stop))
    budget = engine.max_len - min(params.max_new_tokens, engine.max_len // 4)  # a reply gets >= 1/4 of the context
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    echo("chat: type a message, /reset to forget, /exit or Ctrl-D to leave; Ctrl-C stops a reply")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            echo()
            return history
        except UnicodeDecodeError:
            line = "\udcff"  # a strict stdin: same note as below
        if any("\udc80" <= ch <= "\udcff" for ch in line):
            echo("(that line is not valid UTF-8 text; type it again)")
            continue
        if line.strip() in ("/exit", "/quit"):
            return history
        if line.strip() == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": line})
        history = fit_history(history, engine.tokenizer, budget, template)
        prompt_msgs, used = history, []
        if retrieve is not None:
            prompt_msgs, used = with_passages(history, retrieve(line),
                                              lambda m: _fits(m, engine.tokenizer, budget, template))
        echo("bot> ", end="")
        reply = _reply(engine, render(prompt_msgs, template), params, echo)
        if retrieve is not None:
            echo("sources: " + ("; ".join(f"[{i + 1}] {p.path}#{p.n}" for i, p in enumerate(used)) or "none found"))
        history.append({"role": "assistant", "content": reply.strip()})


def _reply(engine, prompt: str, params, echo) -> str:
    """Stream one reply; Ctrl-C ends it early (the sequence is aborted, its slot freed)."""
    seq = engine.add(prompt, params)
    reply = ""
    try:
        while engine.has_work():
            for ev in engine.step():
                echo(ev.text, end="")
                reply += ev.text
        echo()
    except KeyboardInterrupt:
        engine.abort(seq.request_id)
        echo(" [stopped]")
    return reply
