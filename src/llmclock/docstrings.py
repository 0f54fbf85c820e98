"""The summarization task, from code every Python install has: input = a function's source
without its docstring, reference = the docstring's first line.

`build` walks the standard library (or any .py files) and writes train / val / test JSONL split
by module, deterministically (a module's split is a function of its name, so no module is in
two splits and adding files does not move the others). `summarize_file` writes a one-line
summary of each function of a file with a fine-tuned model.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap
from dataclasses import dataclass
from pathlib import Path

from .errors import LLMClockError

PROMPT = "{source}\n# Summary:"
"""The task's prompt: the function, then a comment the model completes with one line."""
SPLITS = ("train", "val", "test")


@dataclass
class Function:
    name: str
    """Qualified name (Class.method)."""
    lineno: int
    source: str
    """Dedented source with the docstring removed."""
    summary: str | None
    """First line of the docstring, if it had one."""


def functions(text: str) -> list[Function]:
    """Every function and method of a module's source, in file order."""
    tree = ast.parse(text)
    lines = text.splitlines()
    out: list[Function] = []

    def visit(node, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append(_function(child, lines, prefix))
                visit(child, f"{prefix}{child.name}.")

    visit(tree, "")
    return out


def _function(node, lines: list[str], prefix: str) -> Function:
    doc = ast.get_docstring(node, clean=True)
    body = list(range(node.lineno - 1, node.end_lineno))
    first = node.body[0]
    if doc is not None:  # drop the docstring's lines (and a line it shares with nothing else)
        drop = set(range(first.lineno - 1, first.end_lineno))
        body = [i for i in body if i not in drop]
    source = textwrap.dedent("\n".join(lines[i] for i in body))
    summary = inspect.cleandoc(doc).strip().splitlines()[0].strip() if doc and doc.strip() else None
    return Function(prefix + node.name, node.lineno, source, summary)


def split_of(module: str, val_pct: int, test_pct: int) -> str:
    """A module's split: from a hash of its name, stable across runs and Python versions."""
    bucket = int.from_bytes(hashlib.sha256(module.encode()).digest()[:4], "big") % 100
    return "test" if bucket < test_pct else "val" if bucket < test_pct + val_pct else "train"


def examples(sources: list[str], root: Path | None, *, max_chars: int, val_pct: int, test_pct: int) -> dict:
    """{split: [record]} from .py files: functions with a docstring whose first line has 3+ words,
    a body beside it and at most `max_chars` of source."""
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for path in sources:
        try:
            text = Path(path).read_text(encoding="utf-8")
            fns = functions(text)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        module = str(Path(path).relative_to(root)) if root else str(path)
        split = split_of(module, val_pct, test_pct)
        for f in fns:
            if not f.summary or len(f.summary.split()) < 3 or len(f.summary) > 200 or len(f.source) > max_chars:
                continue
            if f.source.count("\n") < 1:
                continue  # nothing but the signature
            out[split].append({"prompt": PROMPT.format(source=f.source), "completion": " " + f.summary + "\n",
                               "input": f.source, "reference": f.summary, "module": module, "name": f.name})
    return out


def build(out_dir: str | Path, *, sources: list[str] | None = None, max_chars: int = 600, val_pct: int = 5,
          test_pct: int = 5) -> dict:
    """Write OUT/{train,val,test}.jsonl and OUT/manifest.json atomically; returns the manifest."""
    from .checkpoint import atomic_dir, write_json
    from .corpus import stdlib_root, stdlib_sources
    from .records import write_jsonl

    if val_pct < 0 or test_pct < 0 or val_pct + test_pct >= 100:
        raise LLMClockError("docstrings: validation and test percentages must be >= 0 and sum below 100")
    root = stdlib_root() if sources is None else None
    files = stdlib_sources() if sources is None else [str(p) for p in _py_files(sources)]
    split = examples(files, root, max_chars=max_chars, val_pct=val_pct, test_pct=test_pct)
    if not any(split.values()):
        raise LLMClockError("docstrings: no documented functions found")
    manifest = {"format": "llmclock-docstrings-v1", "source": str(root) if root else "files", "files": len(files),
                "max_chars": max_chars, "val_pct": val_pct, "test_pct": test_pct, "prompt": PROMPT,
                "splits": {s: {"examples": len(r), "modules": len({x["module"] for x in r})} for s, r in split.items()}}
    with atomic_dir(Path(out_dir)) as tmp:
        for s, rows in split.items():
            write_jsonl(tmp / f"{s}.jsonl", rows)
        write_json(tmp / "manifest.json", manifest)
    return manifest


def _py_files(sources: list[str]) -> list[Path]:
    from .corpus import expand_sources

    return [p for p in expand_sources(sources) if p.suffix == ".py"]


def summarize_file(engine, path: str | Path, *, max_new_tokens: int = 40) -> list[tuple[Function, str]]:
    """(function, one-line summary) for every function of a Python file, greedily decoded on the
    engine's slots."""
    from .engine import SamplingParams
    from .evalgen import generate_all

    path = Path(path)
    try:
        fns = functions(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LLMClockError(f"{path}: file not found") from None
    except (UnicodeDecodeError, SyntaxError, ValueError) as e:
        raise LLMClockError(f"{path}: not a Python source file ({e})") from None
    if not fns:
        raise LLMClockError(f"{path}: no functions found")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=["\n"])
    texts = generate_all(engine, [PROMPT.format(source=f.source) for f in fns], params)
    return [(f, t.strip()) for f, t in zip(fns, texts)]


def load_split(set_dir: str | Path, split: str, *, limit: int | None = None) -> list[dict]:
    """The first `limit` records of a built set's split."""
    from .records import read_jsonl

    rows = [obj for _, obj in read_jsonl(Path(set_dir) / f"{split}.jsonl")]
    return rows[:limit]


def score(model, tokenizer, rows: list[dict], *, slots: int = 8, max_new_tokens: int = 32, progress=None):
    """(metrics, outputs): greedy one-line summaries of `rows` on the engine, scored against their
    references (ROUGE, BLEU, chrF, exact match; see evalgen)."""
    from .engine import Engine, SamplingParams
    from .evalgen import GenExample, evaluate_generation

    engine = Engine(model, tokenizer, slots=slots)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=["\n"])
    examples = [GenExample(r["prompt"], [r["reference"]]) for r in rows]
    metrics, out = evaluate_generation(engine, examples, params, progress=progress)
    return metrics, [o["output"].strip() for o in out]
