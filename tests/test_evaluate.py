import json
import math

import pytest
import torch
import torch.nn.functional as F

from llmclock.config import preset
from llmclock.errors import LLMClockError
from llmclock.evaluate import evaluate_texts, format_table, sliding_windows, token_byte_lengths
from llmclock.model import GPT
from llmclock.tokenizer import Tokenizer

HYPS = ["the cat sat on the mat", "a quick brown fox", "hello there general kenobi", "exactly this"]
REFS = [["the cat is on the mat", "there is a cat on the mat"], ["the quick brown fox jumps"],
        ["hello there"], ["exactly this"]]


def test_generation_metrics_equal_the_libraries_called_directly():
    from conftest import requires

    sacrebleu = requires("sacrebleu")
    rouge_scorer = requires("rouge_score.rouge_scorer")
    from llmclock.evalgen import generation_metrics

    m = generation_metrics(HYPS, REFS)
    streams = [[r[0] for r in REFS], [r[1] if len(r) > 1 else None for r in REFS]]
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, streams).score)
    assert m["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, streams).score)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        want = 100 * sum(max(scorer.score(r, h)[key].fmeasure for r in refs) for h, refs in zip(HYPS, REFS)) / 4
        assert m[key] == pytest.approx(want)
    assert m["exact_match"] == 25.0 and m["examples"] == 4
    # one reference each: sacrebleu's plain single-stream call
    one = generation_metrics(HYPS, [[r[0]] for r in REFS])
    assert one["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [[r[0] for r in REFS]]).score)


def _uniform_model(vocab_size: int) -> GPT:
    """Zero embeddings -> zero logits -> every token has probability 1/V: loss is exactly ln V."""
    torch.manual_seed(0)
    model = GPT(preset("test", vocab_size=vocab_size)).eval()
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
    return model


def test_perplexity_is_exp_mean_loss_and_bits_per_byte_on_multibyte_text():
    text = "héllo wörld ✓ naïve café ∑ — ok"
    tok = Tokenizer.train_char([text])
    model = _uniform_model(tok.vocab_size)
    r = evaluate_texts(model, tok, [text], block_size=8, stride=8)
    V = tok.vocab_size
    assert r["tokens"] == len(text)  # every character scored once, the first one too
    assert r["loss"] == pytest.approx(math.log(V), rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(r["loss"])) and r["ppl"] == pytest.approx(V, rel=1e-4)
    assert r["bytes"] == len(text.encode("utf-8")) > len(text)
    assert r["bits_per_byte"] == pytest.approx(len(text) * math.log2(V) / len(text.encode("utf-8")), rel=1e-5)


def test_bpe_token_bytes_sum_to_the_utf8_length():
    text = "naïve café — ∑ größer 日本語 " * 20
    tok = Tokenizer.train_bpe([text, "plain ascii words here"], 300)
    ids = tok.encode(text)
    assert int(token_byte_lengths(tok)[ids].sum()) == len(text.encode("utf-8"))
    assert token_byte_lengths(tok)[tok.eot_id] == 0


@pytest.mark.parametrize("n,block,stride", [(1, 4, 4), (10, 4, 4), (10, 4, 1), (37, 8, 3), (8, 8, 5)])
def test_sliding_windows_score_each_target_once_with_full_context(n, block, stride):
    scored = []
    for start, end, first in sliding_windows(n, block, stride):
        assert end - start <= block and start <= first < end
        scored += range(first + 1, end + 1)  # target t is predicted from stream[:t]
        if start > 0:  # a later window keeps at least block - stride tokens of context
            assert first - start >= block - stride
    assert scored == list(range(1, n + 1))


def test_sliding_window_loss_equals_a_direct_forward(tiny_model, char_tok):
    from conftest import CORPUS

    text = CORPUS[:50]
    stream = torch.tensor([[char_tok.eot_id] + char_tok.encode(text)])
    with torch.no_grad():
        logits, _ = tiny_model(stream[:, :-1])
    want = F.cross_entropy(logits[0], stream[0, 1:]).item()
    assert evaluate_texts(tiny_model, char_tok, [text], block_size=64)["loss"] == pytest.approx(want, rel=1e-5)
    # longer than the context: windows with overlap give a lower (better-informed) loss than none
    long = CORPUS[:400]
    strided = evaluate_texts(tiny_model, char_tok, [long], block_size=16, stride=4)
    plain = evaluate_texts(tiny_model, char_tok, [long], block_size=16)
    assert strided["tokens"] == plain["tokens"] == len(long)
    with pytest.raises(LLMClockError, match="stride"):
        evaluate_texts(tiny_model, char_tok, [long], block_size=16, stride=17)


def test_generate_all_batched_equals_one_at_a_time(tiny_model, char_tok):
    from llmclock.engine import Engine, SamplingParams
    from llmclock.evalgen import generate_all

    prompts = ["First Citizen:\n", "All:\nSpeak", "You are all", "Resolved"]
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    done = []
    batched = generate_all(Engine(tiny_model, char_tok, slots=3), prompts, params, progress=done.append)
    single = [generate_all(Engine(tiny_model, char_tok, slots=1), [p], params)[0] for p in prompts]
    assert batched == single and done == [1, 2, 3, 4]


@pytest.mark.parametrize("content,match", [
    ('{"prompt": "a", "reference": "b"}\n{"prompt": "a", "reference": \n', r":2: not valid JSON"),
    ("", "empty"),
    ('{"prompt": "a"}\n', r":1: missing field 'references' or 'reference'"),
    ('{"reference": "a"}\n', r":1: missing field 'prompt' or 'input'"),
    ('{"prompt": "a", "references": []}\n', "non-empty list"),
    ('{"prompt": 3, "reference": "x"}\n', "must be a str"),
    ("[1, 2]\n", "expected a JSON object"),
])
def test_bad_generation_sets_get_one_clear_error(tmp_path, content, match):
    from llmclock.evalgen import load_examples

    path = tmp_path / "set.jsonl"
    path.write_text(content)
    with pytest.raises(LLMClockError, match=match):
        load_examples(path)


def test_table_puts_bits_per_byte_first_when_asked():
    results = {"a": {"text": {"loss": 1.0, "bits_per_byte": 0.5}}, "b": {"text": {"loss": 2.0, "bits_per_byte": 0.7}}}
    lines = format_table(results, bpb_first=True).splitlines()
    assert lines[1].startswith("text bits_per_byte") and "0.5000" in lines[1] and "0.7000" in lines[1]
    assert format_table(results).splitlines()[1].startswith("text loss")
    json.dumps(results)
