import pytest
import torch

from llmclock.config import preset
from llmclock.engine import Engine, SamplingParams
from llmclock.errors import LLMClockError
from llmclock.model import GPT
from tests.conftest import full_forward_greedy as _full_forward_greedy

PROMPTS = ["First Citizen:\n", "All:\nSpeak", "You are all resolved rather to die"]




def test_cached_decoding_equals_full_forward_across_slot_reuse(tiny_model, char_tok):
    """Every cycle's logits (prefill and ticks) match a full forward, also in a reused slot."""
    eng = Engine(tiny_model, char_tok, slots=2)
    seen = {}

    class Check:
        def begin(self, kind, slots): ...
        def mark(self, stage): ...
        def residual(self, layer, x): ...

        def end(self, events, logits, logprobs):
            for ev, row in zip(events, logits):
                seq = seen[ev.request_id]
                ids = seq.prompt_ids + seq.output_ids[:-1]
                with torch.no_grad():
                    ref, _ = tiny_model(torch.tensor([ids]))
                torch.testing.assert_close(row, ref[0, -1], atol=1e-4, rtol=1e-4)
                self.n += 1

    check = Check()
    check.n = 0
    eng.probe = check
    params = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (5, 30, 12)]
    for p, sp in zip(PROMPTS, params):
        seq = eng.add(p, sp)
        seen[seq.request_id] = seq
    while eng.has_work():
        eng.step()
    assert check.n == 5 + 30 + 12
    assert all(s.slot is not None for s in seen.values())
    assert seen["2"].slot == 0  # the third sequence reused the first one's slot


def test_greedy_equals_full_forward_and_batch_invariance(tiny_model, char_tok):
    params = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (7, 25, 16)]
    batch = Engine(tiny_model, char_tok, slots=3).complete(PROMPTS, params)
    for prompt, p, c in zip(PROMPTS, params, batch):
        alone = Engine(tiny_model, char_tok, slots=1).complete([prompt], [p])[0]
        assert c.token_ids == alone.token_ids
        assert c.token_ids == _full_forward_greedy(tiny_model, char_tok.encode(prompt), p.max_new_tokens)
        assert c.finish_reason == "length"


def test_seeded_sampling_is_batch_invariant_and_reproducible(tiny_model, char_tok):
    params = [SamplingParams(max_new_tokens=20, temperature=1.2, top_k=20, top_p=0.95, min_p=0.01, seed=s,
                             ignore_eos=True) for s in (11, 12, 13)]
    batch = Engine(tiny_model, char_tok, slots=2).complete(PROMPTS, params)  # 2 slots: the third waits
    for prompt, p, c in zip(PROMPTS, params, batch):
        assert Engine(tiny_model, char_tok, slots=1).complete([prompt], [p])[0].token_ids == c.token_ids
    again = Engine(tiny_model, char_tok, slots=3).complete(PROMPTS, params)
    assert [c.token_ids for c in again] == [c.token_ids for c in batch]
    other = SamplingParams(max_new_tokens=20, temperature=1.2, top_k=20, top_p=0.95, min_p=0.01, seed=99, ignore_eos=True)
    assert Engine(tiny_model, char_tok).complete([PROMPTS[0]], [other])[0].token_ids != batch[0].token_ids


def test_top_k_1_is_greedy_and_logit_bias_forces_a_token(tiny_model, char_tok):
    g = Engine(tiny_model, char_tok).complete([PROMPTS[0]], SamplingParams(max_new_tokens=10, temperature=0))[0]
    k1 = Engine(tiny_model, char_tok).complete(
        [PROMPTS[0]], SamplingParams(max_new_tokens=10, temperature=1.0, top_k=1, seed=5))[0]
    assert g.token_ids == k1.token_ids
    z = char_tok.encode("z")[0]
    forced = Engine(tiny_model, char_tok).complete(
        [PROMPTS[0]], SamplingParams(max_new_tokens=5, temperature=0, logit_bias={z: 100.0}))[0]
    assert forced.text == "zzzzz"


def test_penalties_change_output(tiny_model, char_tok):
    base = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    plain = Engine(tiny_model, char_tok).complete([PROMPTS[1]], base)[0]
    assert len(set(plain.token_ids)) < 10  # a random tiny model repeats itself
    for kw in (dict(repetition_penalty=5.0), dict(frequency_penalty=2.0), dict(presence_penalty=2.0)):
        p = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True, **kw)
        pen = Engine(tiny_model, char_tok).complete([PROMPTS[1]], p)[0]
        assert len(set(pen.token_ids)) > len(set(plain.token_ids)), kw


def test_stop_string_across_token_boundaries_is_not_included(tiny_model, char_tok):
    p = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    full = Engine(tiny_model, char_tok).complete([PROMPTS[0]], p)[0].text
    stop = full[10:13]  # three characters = three tokens of this char-level vocab
    stopped = Engine(tiny_model, char_tok).complete(
        [PROMPTS[0]], SamplingParams(max_new_tokens=40, temperature=0, stop=[stop]))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full[: full.index(stop)]
    assert stop not in stopped.text


def test_stop_token_ids_and_eos(tiny_model, char_tok):
    p = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    full = Engine(tiny_model, char_tok).complete([PROMPTS[0]], p)[0]
    t = full.token_ids[3]
    c = Engine(tiny_model, char_tok).complete(
        [PROMPTS[0]], SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=[t]))[0]
    assert c.finish_reason == "stop" and c.token_ids == full.token_ids[: full.token_ids.index(t) + 1]
    eot = char_tok.eot_id
    e = Engine(tiny_model, char_tok).complete(
        [PROMPTS[0]], SamplingParams(max_new_tokens=40, temperature=0, logit_bias={eot: 100.0}))[0]
    assert e.token_ids == [eot] and e.text == "" and e.finish_reason == "stop"


def test_incremental_detokenisation_never_splits_a_character():
    from llmclock.tokenizer import Tokenizer

    tok = Tokenizer.train_bpe(["plain ascii text only, nothing else"], 300)
    torch.manual_seed(0)
    model = GPT(preset("test", vocab_size=tok.vocab_size)).eval()
    text = "héllo 🙂 wörld 日本"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # multi-byte characters span several byte tokens
    # Force the model to emit exactly these ids, one per cycle, through logit bias changes.
    eng = Engine(model, tok)
    seq = eng.add("a", SamplingParams(max_new_tokens=len(ids), temperature=0, ignore_eos=True))
    pieces = []
    for t in ids:
        seq.params.logit_bias = {t: 1e4}
        pieces += [ev.text for ev in eng.step()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_logprobs_and_alternatives(tiny_model, char_tok):
    eng = Engine(tiny_model, char_tok)
    evs = list(eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=4, temperature=0, logprobs=3)))
    for ev in evs:
        assert len(ev.top) == 3 and ev.top[0][0] == ev.token_id  # greedy picks the most likely
        assert ev.logprob == pytest.approx(ev.top[0][1]) and ev.logprob <= 0
        assert ev.top[0][1] >= ev.top[1][1] >= ev.top[2][1]


def test_prompt_longer_than_context(tiny_model, char_tok):
    long = "x" * 0 + PROMPTS[2] * 3  # > 64 tokens
    eng = Engine(tiny_model, char_tok)
    with pytest.raises(LLMClockError, match="context holds 64"):
        eng.add(long)
    c = eng.complete([long], SamplingParams(max_new_tokens=5, temperature=0), truncate=True)[0]
    assert len(c.prompt_ids) == 64
    assert c.finish_reason == "length" and len(c.token_ids) == 1  # the context is full after one token


@pytest.mark.parametrize("kw, msg", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(min_p=2), "min_p"), (dict(max_new_tokens=0), "max_new_tokens"), (dict(repetition_penalty=0), "repetition"),
    (dict(presence_penalty=3), "presence"), (dict(stop=[""]), "stop"), (dict(seed=-1), "seed"), (dict(logprobs=50), "logprobs"),
])
def test_sampling_validation(kw, msg):
    with pytest.raises(LLMClockError, match=msg):
        SamplingParams(**kw)


def test_out_of_vocab_ids_rejected(tiny_model, char_tok):
    eng = Engine(tiny_model, char_tok)
    with pytest.raises(LLMClockError, match="outside the vocabulary"):
        eng.add("hi", SamplingParams(logit_bias={10_000: 1.0}))
    with pytest.raises(LLMClockError, match="outside the vocabulary"):
        eng.add([1, 2, 99_999])


def test_greedy_tokens_equal_hugging_face_generate(tmp_path, char_tok):
    """Same weights in transformers' GPT2LMHeadModel: `generate` picks the same tokens."""
    transformers = pytest.importorskip("transformers")
    from llmclock.checkpoint import write_checkpoint
    from llmclock.hf import export_hf

    torch.manual_seed(4)
    model = GPT(preset("test", vocab_size=char_tok.vocab_size, n_head=3, n_embd=48)).eval()
    write_checkpoint(tmp_path / "ck", model, char_tok)
    export_hf(tmp_path / "ck", tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    for prompt in PROMPTS:
        ids = char_tok.encode(prompt)
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                          pad_token_id=char_tok.eot_id)[0, len(ids):].tolist()
        ours = Engine(model, char_tok).complete([prompt], SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True))
        assert ours[0].token_ids == ref


def test_compiled_tick_and_bf16_match_eager(tiny_model, char_tok):
    p = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    ref = Engine(tiny_model, char_tok, slots=2).complete(PROMPTS[:2], p)
    compiled = Engine(tiny_model, char_tok, slots=2, compile=True).complete(PROMPTS[:2], p)
    assert [c.token_ids for c in compiled] == [c.token_ids for c in ref]
    bf16 = GPT(tiny_model.config).eval()
    bf16.load_state_dict(tiny_model.state_dict())
    out = Engine(bf16.to(torch.bfloat16), char_tok, slots=2).complete(PROMPTS[:2], p)
    assert all(len(c.token_ids) == 12 for c in out)  # runs end to end in bf16 (tokens may differ slightly)


def test_exact_gelu_and_no_bias_variant_decodes_like_full_forward(char_tok):
    """nanoGPT's variant (exact GELU, no biases): the decode plan's unfused path matches too."""
    torch.manual_seed(5)
    model = GPT(preset("test", vocab_size=char_tok.vocab_size, activation="gelu", bias=False)).eval()
    c = Engine(model, char_tok, slots=2).complete(PROMPTS[:2], SamplingParams(max_new_tokens=15, temperature=0,
                                                                               ignore_eos=True))
    for prompt, comp in zip(PROMPTS, c):
        assert comp.token_ids == _full_forward_greedy(model, char_tok.encode(prompt), 15)


def test_short_prefill_on_the_decode_kernels_equals_the_torch_forward(tiny_model, char_tok, monkeypatch):
    """A cycle of at most KERNEL_PREFILL_ROWS prompt tokens runs them as rows of the decode kernels (each
    at its own position, rows of one slot attending causally); its logits and KV cache equal the torch
    prefill's, also with chunks of two prompts in one cycle."""
    from llmclock.engine import kernels, runner
    from tests.conftest import requires_kernels

    requires_kernels(kernels)
    calls = []
    torch_prefill = runner.prefill
    monkeypatch.setattr(runner, "prefill", lambda *a, **k: calls.append(1) or torch_prefill(*a, **k))

    def run(limit):
        monkeypatch.setattr(runner, "KERNEL_PREFILL_ROWS", limit)
        eng = Engine(tiny_model, char_tok, slots=3)
        eng.add("First Cit", SamplingParams(max_new_tokens=1, temperature=0))
        eng.add("All:\nSp", SamplingParams(max_new_tokens=1, temperature=0))
        plan = eng.scheduler.schedule()
        logits = eng.runner.run(plan.prefill, [], None)
        n = sum(c.end - c.start for c in plan.prefill)
        return logits, [k.clone() for k in eng.cache.k], [v.clone() for v in eng.cache.v], n

    fast, kf, vf, n = run(16)
    assert calls == [] and n == len("First Cit") + len("All:\nSp")
    slow, ks, vs, _ = run(0)
    assert calls == [1]
    assert fast.shape == slow.shape == (2, tiny_model.config.vocab_size)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    for a, b in zip(kf + vf, ks + vs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
