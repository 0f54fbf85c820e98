"""Multi-turn chat on the engine: a plain-text template and a history that fits the context.

GPT-2-style models have no chat tokens, so turns are rendered as labelled paragraphs and the
assistant's turn ends at end-of-text or when the model starts the user's next line.
"""

from __future__ import annotations

from .errors import LLMClockError

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
STOP = ["\nUser:", "\nSystem:"]


def render(messages: list[dict]) -> str:
    """Messages [{'role', 'content'}] -> the prompt text, ending where the assistant speaks."""
    parts = []
    for m in messages:
        role = m.get("role")
        if role not in ROLES:
            raise LLMClockError(f"chat: unknown role {role!r} (use system, user or assistant)")
        parts.append(f"{ROLES[role]}: {str(m.get('content', '')).strip()}\n")
    return "".join(parts) + "Assistant:"


def fit_history(messages: list[dict], tokenizer, budget: int) -> list[dict]:
    """Drop the oldest non-system turns until the rendered prompt is at most `budget` tokens."""
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    while turns:
        msgs = system + turns
        if len(tokenizer.encode(render(msgs))) <= budget:
            return msgs
        turns = turns[1:]
    raise LLMClockError(f"chat: the message does not fit in the context ({budget} tokens for the prompt)")


def chat_loop(engine, params, *, system: str = "", echo=print, read=input) -> list[dict]:
    """Read user lines until EOF or '/exit'; stream each reply. Returns the conversation.

    Ctrl-C while a reply streams stops that reply (what was said stays in the history) and
    returns to the prompt; Ctrl-C at the prompt propagates. A line that was not valid UTF-8
    (undecodable bytes arrive as surrogates) is refused with a note.
    """
    params.stop = list(dict.fromkeys(list(params.stop) + STOP))
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
        history = fit_history(history, engine.tokenizer, budget)
        echo("bot> ", end="")
        reply = _reply(engine, render(history), params, echo)
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
