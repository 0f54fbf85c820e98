"""Supervised fine-tuning data: JSONL of {"prompt", "completion"} or chat {"messages": [...]},
encoded with a loss mask (only completion / assistant tokens are learned) and batched padded
(the default) or packed.

Padded: each row is one example, right-padded to the longest row of its batch. Packed (`pack`):
whole examples, in a seeded shuffled order, are concatenated into rows of up to block_size + 1
tokens (an example never split across rows), so few positions are padding; each example ends
with <|endoftext|>, and attention crosses example boundaries within a row (no block-diagonal
mask, positions run on), as GPT-2's pre-training and TRL's default packing do. Either way
padding and prompt positions have target -1 (ignored by the loss), so only completion tokens
are learned. Batches are a pure function of (seed, step) (a seeded permutation per epoch), so
a resumed run sees the same batches as one that never stopped.

The chat template (how turns are rendered as text) is stored next to the weights as
chat_template.json and used by `llmclock chat`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import LLMClockError
from .records import field as record_field
from .records import read_jsonl

TEMPLATE_FILE = "chat_template.json"
TEMPLATE_FORMAT = "llmclock-chat-template-v1"


@dataclass
class ChatTemplate:
    """Turns as labelled paragraphs, `<label> <content><suffix>`: GPT-2 has no chat tokens."""

    labels: dict[str, str] = field(default_factory=lambda: {"system": "System:", "user": "User:",
                                                            "assistant": "Assistant:"})
    """Label in front of each role's turn."""
    suffix: str = "\n"
    """Text closing every turn (learned at the end of assistant turns)."""

    def __post_init__(self) -> None:
        if set(self.labels) != {"system", "user", "assistant"} or not all(isinstance(v, str) and v
                                                                          for v in self.labels.values()):
            raise LLMClockError("chat template: need a non-empty label for each of system, user, assistant")

    @property
    def stop(self) -> list[str]:
        """Where a reply ends: when the model starts another role's turn."""
        return [self.suffix + self.labels[r] for r in ("user", "system")]

    def segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """(text, learned) pieces of a conversation: assistant content and suffix are learned."""
        out = []
        for m in messages:
            out.append((self.labels[m["role"]], False))
            out.append((" " + m["content"].strip() + self.suffix, m["role"] == "assistant"))
        return out

    def render(self, messages: list[dict]) -> str:
        """The prompt for the next assistant turn: the conversation, then the assistant's label."""
        return "".join(text for text, _ in self.segments(messages)) + self.labels["assistant"]

    def save(self, directory: Path) -> None:
        (Path(directory) / TEMPLATE_FILE).write_text(
            json.dumps({"format": TEMPLATE_FORMAT, "labels": self.labels, "suffix": self.suffix}, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "ChatTemplate | None":
        """The template stored in a checkpoint or adapter directory, or None when there is none."""
        from .checkpoint import read_json

        path = Path(directory) / TEMPLATE_FILE
        if not path.is_file():
            return None
        d = read_json(path)
        if d.get("format") != TEMPLATE_FORMAT or not isinstance(d.get("labels"), dict) or not isinstance(
                d.get("suffix"), str):
            raise LLMClockError(f"{path}: not an llmclock chat template")
        return cls(labels=d["labels"], suffix=d["suffix"])


ROLES = ("system", "user", "assistant")


def _messages(path, lineno: int, obj: dict) -> list[dict]:
    msgs = record_field(path, lineno, obj, "messages", kind=list)
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise LLMClockError(f"{path}:{lineno}: messages[{i}] must be an object with a string 'content'")
        if m.get("role") not in ROLES:
            raise LLMClockError(f"{path}:{lineno}: messages[{i}] has unknown role {m.get('role')!r} "
                                f"(use {', '.join(ROLES)})")
    if not any(m["role"] == "assistant" for m in msgs):
        raise LLMClockError(f"{path}:{lineno}: no assistant message to learn from")
    return msgs


def load_examples(path: str | Path, tokenizer, template: ChatTemplate, *, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(token ids, loss mask) per example, every line checked; at most `max_len` tokens each.

    A prompt/completion example is prompt tokens (mask 0), then completion tokens and
    <|endoftext|> (mask 1). Too long: the prompt loses its oldest tokens; a completion that
    alone is longer than `max_len` is cut at its end.
    """
    out = []
    for lineno, obj in read_jsonl(path):
        if "messages" in obj:
            segs = template.segments(_messages(path, lineno, obj))
            eot = False
        else:
            prompt = record_field(path, lineno, obj, "prompt")
            completion = record_field(path, lineno, obj, "completion")
            if not completion:
                raise LLMClockError(f"{path}:{lineno}: empty 'completion' (nothing to learn)")
            segs, eot = [(prompt, False), (completion, True)], True
        ids, mask = [], []
        for (text, learned), enc in zip(segs, tokenizer.encode_batch([t for t, _ in segs])):
            ids += enc
            mask += [int(learned)] * len(enc)
        if eot:
            ids.append(tokenizer.eot_id)
            mask.append(1)
        if len(ids) > max_len:
            first = mask.index(1)
            cut = max(0, min(len(ids) - max_len, first))  # drop prompt tokens from the left first
            ids, mask = ids[cut:][:max_len], mask[cut:][:max_len]
        if not any(mask):
            raise LLMClockError(f"{path}:{lineno}: no completion tokens left within {max_len} tokens")
        out.append((ids, mask))
    return out


def pack(examples: list[tuple[list[int], list[int]]], max_len: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """Whole examples concatenated into rows of at most `max_len` tokens (ids and loss masks
    alike), taking them in a seeded shuffled order and starting a new row when the next one does
    not fit (next-fit)."""
    order = np.random.Generator(np.random.PCG64([seed, 11])).permutation(len(examples))
    rows: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    mask: list[int] = []
    for i in order:
        e_ids, e_mask = examples[i]
        if ids and len(ids) + len(e_ids) > max_len:
            rows.append((ids, mask))
            ids, mask = [], []
        ids, mask = ids + e_ids, mask + e_mask
    if ids:
        rows.append((ids, mask))
    return rows


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The examples of step `step`: consecutive slices of a seeded permutation per epoch."""
    start = step * batch_size
    idx = []
    while len(idx) < batch_size:
        epoch, off = divmod(start + len(idx), n)
        perm = np.random.Generator(np.random.PCG64([seed, epoch, 7])).permutation(n)
        idx += perm[off : off + batch_size - len(idx)].tolist()
    return np.array(idx)


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded (x, y) int64 tensors (B, T): y is x shifted by one, -1 where not learned."""
    import torch

    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -1, dtype=torch.long)
    for row, (ids, mask) in enumerate(examples):
        ids_t = torch.tensor(ids)
        x[row, : len(ids) - 1] = ids_t[:-1]
        y[row, : len(ids) - 1] = torch.where(torch.tensor(mask[1:]) == 1, ids_t[1:], -1)
    return x, y
