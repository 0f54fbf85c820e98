import json
import os

import pytest
import torch

from llmclock.adapters import AdapterConfig, apply_adapter, guard_fused, load_adapted, merge
from llmclock.checkpoint import load_checkpoint, write_checkpoint
from llmclock.config import TrainConfig
from llmclock.errors import LLMClockError
from llmclock.sft import ChatTemplate, collate, load_examples

from conftest import requires

peft = requires("peft")

PAIRS = [("First Citizen:\n", "Speak, speak."), ("All:\n", "Resolved. resolved."), ("You are all ", "resolved rather"),
         ("First, you know ", "Caius Marcius is chief enemy"), ("Before we proceed ", "any further, hear me speak.")]


@pytest.fixture
def base_ckpt(tmp_path, tiny_model, char_tok):
    """A tiny random base whose embeddings are large enough (std 0.5, not 0.02) for frozen-weight
    methods to sharpen its predictions: with std 0.02 the tied head caps every logit near 0.6."""
    path = tmp_path / "base"
    with torch.no_grad():
        tiny_model.transformer.wte.weight.mul_(25)
    write_checkpoint(path, tiny_model, char_tok)
    return path


@pytest.fixture
def train_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS))
    return path


def _recipe(**kw):
    base = dict(max_steps=30, batch_size=4, block_size=64, learning_rate=3e-3, min_lr=3e-4, warmup_steps=2,
                weight_decay=0.0, eval_interval=0, seed=3, device="cpu")
    return TrainConfig(**{**base, **kw})


def test_prompt_tokens_are_masked_and_get_no_gradient(tiny_model, char_tok, train_file):
    ex = load_examples(train_file, char_tok, ChatTemplate(), max_len=65)
    ids, mask = ex[0]
    assert mask == [0] * len(PAIRS[0][0]) + [1] * (len(PAIRS[0][1]) + 1) and ids[-1] == char_tok.eot_id
    x, y = collate(ex[:2], char_tok.eot_id)
    emb = tiny_model.transformer.wte(x).detach().requires_grad_(True)
    # the loss through the model, with the embeddings as a leaf: d loss / d logits at masked rows is 0
    logits, _ = tiny_model(x)
    logits.retain_grad()
    torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1).backward()
    g = logits.grad.abs().sum(-1)  # (B, T)
    assert (g[y < 0] == 0).all() and (g[y >= 0] > 0).all()
    assert (y[0, : len(PAIRS[0][0]) - 1] == -1).all()  # every prompt position predicts nothing learned
    del emb


def test_packed_rows_keep_whole_examples_and_learn_completions_only(char_tok, train_file):
    from llmclock.sft import pack

    ex = load_examples(train_file, char_tok, ChatTemplate(), max_len=65) * 3  # 15 examples
    rows = pack(ex, 65, seed=5)
    assert len(rows) < len(ex) and all(len(ids) <= 65 and len(ids) == len(m) for ids, m in rows)
    # every example exactly once, whole, each ending in <|endoftext|>
    pieces = []
    for ids, mask in rows:
        ends = [i + 1 for i, t in enumerate(ids) if t == char_tok.eot_id]
        assert ends[-1] == len(ids)
        pieces += [(ids[a:b], mask[a:b]) for a, b in zip([0] + ends, ends)]
    assert sorted(map(str, pieces)) == sorted(map(str, ex))
    assert pack(ex, 65, seed=5) == rows and pack(ex, 65, seed=6) != rows  # seeded
    x, y = collate(rows, char_tok.eot_id)
    for row, (ids, mask) in enumerate(rows):
        learned = [ids[i + 1] for i in range(len(ids) - 1) if mask[i + 1]]
        assert y[row][y[row] >= 0].tolist() == learned  # completions (and their <|endoftext|>) only
        assert (y[row, len(ids) - 1:] == -1).all()  # padding learns nothing
    assert int((y >= 0).sum()) == sum(sum(m) for _, m in ex) == 3 * sum(len(c) + 1 for _, c in PAIRS)


def test_chat_messages_learn_assistant_turns_only(tmp_path):
    from llmclock.tokenizer import Tokenizer

    char_tok = Tokenizer.train_char(["System: User: Speak\nAssistant: Resolved\n"])
    path = tmp_path / "chat.jsonl"
    msgs = [{"role": "user", "content": "Speak"}, {"role": "assistant", "content": "Resolved"}]
    path.write_text(json.dumps({"messages": msgs}) + "\n")
    t = ChatTemplate()
    (ids, mask), = load_examples(path, char_tok, t, max_len=200)
    learned = char_tok.decode([i for i, m in zip(ids, mask) if m])
    assert learned == " Resolved\n"
    assert char_tok.decode(ids) == "User: Speak\nAssistant: Resolved\n"
    assert t.render(msgs[:1]) == "User: Speak\nAssistant:"


@pytest.mark.parametrize("content,match", [
    ('{"prompt": "a", "completion": "b"}\nnot json\n', r"train.jsonl:2: not valid JSON"),
    ("\n\n", "empty"),
    ('{"prompt": "a"}\n', r":1: missing field 'completion'"),
    ('{"messages": [{"role": "wizard", "content": "x"}]}\n', r":1: messages\[0\] has unknown role 'wizard'"),
    ('{"messages": [{"role": "user", "content": "x"}]}\n', "no assistant message"),
    ('{"messages": "hi"}\n', "must be a list"),
])
def test_bad_finetune_data_gets_one_clear_error(tmp_path, char_tok, content, match):
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(LLMClockError, match=match):
        load_examples(path, char_tok, ChatTemplate(), max_len=64)


def _randomize_lora(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "adapter.up" in n or "lora_E" in n:
                p.normal_(0, 0.2)


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_adapter_weights_get_gradients_and_change_the_loss_with_fused_kernels(tiny_model, method):
    from llmclock.config import preset
    from llmclock.fused import fuse_cpu_ops, get_lib
    from llmclock.model import GPT

    if get_lib() is None:
        if os.environ.get("CI"):
            pytest.fail("the fused kernels did not build in CI")
        pytest.skip("no C++ compiler: no fused kernels to guard against")
    torch.manual_seed(0)
    model = GPT(preset("test", vocab_size=64, n_embd=64, n_head=2)).train()  # head size 32: the block kernel applies
    x = torch.randint(64, (2, 16))
    plain_loss = model(x, x)[1].item()
    assert fuse_cpu_ops(model)
    wrapped = apply_adapter(model, AdapterConfig(method=method, r=4, bottleneck=8))
    assert guard_fused(wrapped) == 2  # both blocks hold an adapter, and neither is taken for a plain block
    _randomize_lora(wrapped)
    _, loss = wrapped(x, x)
    assert abs(loss.item() - plain_loss) > 1e-3  # the adapter is in the forward
    loss.backward()
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0]
    assert any("lora_A" in n or "adapter.down" in n for n in names)
    # the same adapter without any fused kernel gives the same loss
    torch.manual_seed(0)
    ref = apply_adapter(GPT(preset("test", vocab_size=64, n_embd=64, n_head=2)).train(),
                        AdapterConfig(method=method, r=4, bottleneck=8))
    ref.load_state_dict(wrapped.state_dict())
    assert ref(x, x)[1].item() == pytest.approx(loss.item(), rel=1e-4)


def _kernels_or_skip():
    from llmclock.fused import get_lib

    if get_lib() is None:
        if os.environ.get("CI"):
            pytest.fail("the fused kernels did not build in CI")
        pytest.skip("no C++ compiler: no fused kernels")


@pytest.mark.parametrize("method,dropout", [("lora", 0.0), ("adalora", 0.0), ("lora", 0.1)])
def test_lora_blocks_take_the_block_kernel_with_peft_s_loss_and_gradients(method, dropout, monkeypatch):
    """A block whose Linears carry LoRA (AdaLoRA) runs the whole-block kernel on W + s*B@A; its loss
    and the gradients of A, B (and E) equal peft's own op-by-op forward and backward. With dropout
    on the LoRA input the block runs op by op (no kernel call) and still matches in eval mode."""
    from llmclock import fused
    from llmclock.config import preset
    from llmclock.model import GPT

    _kernels_or_skip()
    cfg = AdapterConfig(method=method, r=4, init_r=4, dropout=dropout, total_step=20, tfinal=2)

    def build(fuse: bool):
        torch.manual_seed(0)
        model = GPT(preset("test", vocab_size=64, n_embd=64, n_head=2)).train()  # head size 32
        if fuse:
            assert fused.fuse_cpu_ops(model)
        return apply_adapter(model, cfg)

    fast, ref = build(True), build(False)
    _randomize_lora(fast)
    ref.load_state_dict(fast.state_dict())
    calls = []
    apply = fused._Block.apply
    monkeypatch.setattr(fused._Block, "apply", lambda *a: calls.append(1) or apply(*a))
    x = torch.randint(64, (3, 16))
    if dropout:  # training with dropout: op by op
        fast(x, x)[1].backward()
        assert calls == []
        fast.eval(), ref.eval()  # dropout off: the kernel applies again, and matches
    loss = fast(x, x)[1]
    assert len(calls) == 2  # both blocks in one kernel call each
    want = ref(x, x)[1]
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    fast.zero_grad(), ref.zero_grad()
    loss.backward()
    want.backward()
    got = {n: p.grad for n, p in fast.named_parameters() if p.requires_grad}
    assert got and all(g is not None and g.abs().sum() > 0 for g in got.values())
    for n, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert all(p.grad is None for p in fast.parameters() if not p.requires_grad)  # frozen W gets none


def test_lora_merge_gives_base_plus_adapter_logits(tmp_path, base_ckpt, train_file):
    from llmclock.finetune import finetune, merge_adapter

    r = finetune(base_ckpt, train_file, tmp_path / "ft", _recipe(max_steps=2), AdapterConfig(method="lora", r=4),
                 progress=False)
    adapted, _ = load_adapted(base_ckpt, r.ckpt)
    x = torch.randint(20, (2, 12))
    with torch.no_grad():
        want = adapted(x)[0]
        merged = merge_adapter(base_ckpt, r.ckpt, tmp_path / "merged")
        got = load_checkpoint(merged)[0](x)[0]
        base = load_checkpoint(base_ckpt)[0](x)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - base).abs().max() > 1e-3  # the adapter did something
    assert sorted(p.name for p in r.ckpt.resolve().iterdir()) == [
        "adapter.safetensors", "adapter_config.json", "chat_template.json", "optimizer.safetensors",
        "tokenizer.json", "train_state.json"]


@pytest.mark.parametrize("method", ["lora", "lora-packed", pytest.param("full", marks=pytest.mark.slow),
                                    pytest.param("adapter", marks=pytest.mark.slow)])
def test_finetune_lowers_the_loss_on_a_tiny_set(tmp_path, base_ckpt, train_file, char_tok, method):
    from llmclock.finetune import finetune, masked_loss

    ex = load_examples(train_file, char_tok, ChatTemplate(), max_len=65)
    before = masked_loss(load_checkpoint(base_ckpt)[0], ex, char_tok.eot_id, 8)
    lr = 1e-2 if method != "full" else 3e-3
    method, packed = method.removesuffix("-packed"), method.endswith("-packed")
    r = finetune(base_ckpt, train_file, tmp_path / "ft", _recipe(max_steps=15, learning_rate=lr, min_lr=lr / 10),
                 AdapterConfig(method=method, r=8), progress=False, val_path=train_file, pack=packed)
    assert r.val_loss < before * 0.85
    assert (r.trainable == r.total) == (method == "full")
    assert (tmp_path / "ft" / "metrics.jsonl").is_file() and r.plot is not None


@pytest.mark.slow
def test_adalora_trains_and_merges(tmp_path, base_ckpt, train_file):
    from llmclock.finetune import finetune, merge_adapter

    r = finetune(base_ckpt, train_file, tmp_path / "ft", _recipe(max_steps=12),
                 AdapterConfig(method="adalora", r=2, init_r=4, tinit=2, tfinal=3, delta_t=2), progress=False)
    model, _ = load_adapted(base_ckpt, r.ckpt)
    x = torch.randint(20, (1, 10))
    with torch.no_grad():
        want = model(x)[0]
        got = load_checkpoint(merge_adapter(base_ckpt, r.ckpt, tmp_path / "m"))[0](x)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, base_ckpt, train_file):
    """Stopped by Ctrl-C after step 4 (a checkpoint is saved), then resumed: the same losses."""
    from llmclock.finetune import finetune

    losses = {"a": [], "b": []}

    def interrupt_at_4(step, loss):
        losses["b"].append(loss)
        if step == 4:
            raise KeyboardInterrupt

    cfg = AdapterConfig(method="lora", r=4, dropout=0.1)  # dropout: the RNG state must resume too
    recipe = _recipe(max_steps=7)
    finetune(base_ckpt, train_file, tmp_path / "a", recipe, cfg, progress=False,
             on_step=lambda s, loss: losses["a"].append(loss))
    with pytest.raises(KeyboardInterrupt):
        finetune(base_ckpt, train_file, tmp_path / "b", recipe, cfg, progress=False, on_step=interrupt_at_4)
    finetune(base_ckpt, train_file, tmp_path / "b", recipe, cfg, progress=False, resume=True,
             on_step=lambda s, loss: losses["b"].append(loss))
    assert losses["a"] == losses["b"] and len(losses["a"]) == 7


def test_adapter_on_the_wrong_base_is_refused(tmp_path, base_ckpt, train_file, char_tok):
    from llmclock.config import preset
    from llmclock.finetune import finetune
    from llmclock.model import GPT

    r = finetune(base_ckpt, train_file, tmp_path / "ft", _recipe(max_steps=2), AdapterConfig(method="lora", r=4),
                 progress=False)
    torch.manual_seed(99)
    write_checkpoint(tmp_path / "other", GPT(preset("test", vocab_size=char_tok.vocab_size)), char_tok)
    with pytest.raises(LLMClockError, match="other base weights"):
        load_adapted(tmp_path / "other", r.ckpt)
    load_adapted(base_ckpt, r.ckpt)  # the right base is accepted


def test_bottleneck_adapter_cannot_merge():
    from llmclock.config import preset
    from llmclock.model import GPT

    model = apply_adapter(GPT(preset("test", vocab_size=32)), AdapterConfig(method="adapter", bottleneck=4))
    with pytest.raises(LLMClockError, match="cannot be folded"):
        merge(model)


@pytest.mark.slow
def test_wandb_offline_run_writes_its_files(tmp_path, base_ckpt, train_file, monkeypatch):
    requires("wandb")
    from llmclock.finetune import finetune

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    finetune(base_ckpt, train_file, tmp_path / "ft", _recipe(max_steps=3), AdapterConfig(method="lora", r=2),
             progress=False, log_interval=1, wandb={"project": "llmclock-test"})
    runs = list((tmp_path / "ft" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_bottleneck_adapter_runs_on_the_engine_as_its_full_forward(tmp_path, base_ckpt, char_tok):
    """A bottleneck adapter cannot fold into the weights; the engine runs its adapted Linears as
    modules (the rest on its kernels): greedy output == argmax of the adapted model's full forward."""
    from llmclock.adapters import base_weights_hash, write_adapter
    from llmclock.checkpoint import atomic_dir, model_state
    from llmclock.engine import Engine, SamplingParams

    cfg = AdapterConfig(method="adapter", bottleneck=8)
    base, _ = load_checkpoint(base_ckpt)
    keys = set(model_state(base))
    model = apply_adapter(base, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapter." in n:
                p.normal_(0, 1.0)
    with atomic_dir(tmp_path / "ad") as tmp:
        write_adapter(tmp, model, cfg, base_hash=base_weights_hash(base_ckpt), base_config=base.config.to_dict(),
                      base_keys=keys)
    adapted, tok = load_adapted(base_ckpt, tmp_path / "ad", merged=True)
    plain = load_checkpoint(base_ckpt)[0]
    prompts = [p for p, _ in PAIRS[:3]]
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    got = Engine(adapted, tok, slots=2).complete(prompts, [params] * 3)
    for prompt, c in zip(prompts, got):
        out = []
        for _ in range(12):
            with torch.no_grad():
                out.append(int(adapted(torch.tensor([tok.encode(prompt) + out]))[0][0, -1].argmax()))
        assert c.token_ids == out
    assert [c.token_ids for c in got] != [c.token_ids for c in Engine(plain, tok, slots=2).complete(prompts, [params] * 3)]
