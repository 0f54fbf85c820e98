"""`llmclock serve` on a checkpoint from disk: `--adapter` (a LoRA adapter folded in, as `generate
--adapter` does) and the chat template the checkpoint or its adapter stores."""

from __future__ import annotations

import contextlib
import copy
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("peft")

from llmclock.adapters import AdapterConfig, apply_adapter, base_weights_hash, write_adapter  # noqa: E402
from llmclock.checkpoint import model_state, write_checkpoint  # noqa: E402
from llmclock.engine import Engine, SamplingParams  # noqa: E402
from llmclock.sft import ChatTemplate  # noqa: E402

from test_server import KEY, bpe_tok, model, serving  # noqa: E402,F401  (fixtures)

PROMPT = "First Citizen:\n"
TEMPLATE = ChatTemplate(labels={"system": "<<SYS>>", "user": "[INST]", "assistant": "[/INST]"}, suffix="\n\n")
ADAPTER_TEMPLATE = ChatTemplate(labels={"system": "### System:", "user": "### Human:", "assistant": "### Bot:"})


@pytest.fixture(scope="module")
def base(tmp_path_factory, model, bpe_tok):
    """A base checkpoint (with a chat template of its own) and a LoRA adapter for it (with another)."""
    root = tmp_path_factory.mktemp("serve_ckpt")
    base_model = copy.deepcopy(model)
    with torch.no_grad():
        base_model.transformer.wte.weight.mul_(25)  # sharper predictions: the adapter visibly changes them
    write_checkpoint(root / "base", base_model, bpe_tok)
    TEMPLATE.save(root / "base")
    cfg = AdapterConfig(method="lora", r=4)
    wrapped = apply_adapter(copy.deepcopy(base_model), cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    (root / "lora").mkdir()
    write_adapter(root / "lora", wrapped, cfg, base_hash=base_weights_hash(root / "base"),
                  base_config=base_model.config.to_dict(), base_keys=set(model_state(base_model)))
    ADAPTER_TEMPLATE.save(root / "lora")
    return root


def _generate(capsys, *argv) -> str:
    from llmclock.cli import main

    assert main(["generate", *argv, "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(PROMPT) and out.endswith("\n")
    return out[len(PROMPT):-1]


def test_serve_adapter_equals_generate_adapter(base, capsys):
    with_adapter = _generate(capsys, "--ckpt", str(base / "base"), "--adapter", str(base / "lora"))
    without = _generate(capsys, "--ckpt", str(base / "base"))
    assert with_adapter != without  # the adapter changes the greedy output
    with serving(None, None, ckpt=str(base / "base"), adapter=str(base / "lora"), api_keys=[KEY]) as s:
        c = s.client()
        r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0)
        assert r.choices[0].text == with_adapter
        streamed = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stream=True)
        assert "".join(ch.choices[0].text for ch in streamed) == with_adapter
    from llmclock.server import ServerConfig

    assert ServerConfig(ckpt=str(base / "base"), adapter=str(base / "lora")).model_name == "lora"  # the adapter's name


def test_serve_refuses_an_adapter_for_another_base_at_start_up(base, tmp_path, model, bpe_tok, capsys):
    from llmclock.cli import main

    torch.manual_seed(99)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.transformer.wte.weight.add_(0.01)
    write_checkpoint(tmp_path / "other", other, bpe_tok)
    bottleneck = apply_adapter(copy.deepcopy(model), AdapterConfig(method="adapter", bottleneck=4))
    (tmp_path / "bn").mkdir()
    write_adapter(tmp_path / "bn", bottleneck, AdapterConfig(method="adapter", bottleneck=4),
                  base_hash=base_weights_hash(tmp_path / "other"), base_config=model.config.to_dict(),
                  base_keys=set(model_state(model)))
    for ckpt, adapter, why in ((tmp_path / "other", base / "lora", "trained on other base weights"),
                               (base / "base", tmp_path / "bn", "trained on other base weights"),
                               (tmp_path / "other", tmp_path, "not an llmclock adapter")):
        assert main(["serve", "--ckpt", str(ckpt), "--adapter", str(adapter), "--port", "0"]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("llmclock: error:") and why in err[0], err


def _chat_reference(model, tok, template: ChatTemplate, msgs: list[dict]) -> tuple[str, int]:
    prompt = template.render(msgs)
    eng = Engine(model, tok, slots=1)
    text = eng.complete([prompt], SamplingParams(max_new_tokens=24, temperature=0, stop=template.stop))[0].text
    return text, len(tok.encode(prompt))


def test_chat_uses_the_checkpoint_template_and_the_adapters(base):
    from llmclock.adapters import load_adapted
    from llmclock.checkpoint import load_checkpoint

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Speak."}]
    for adapter, template in ((None, TEMPLATE), (base / "lora", ADAPTER_TEMPLATE)):
        if adapter is None:
            m, tok = load_checkpoint(base / "base")
        else:
            m, tok = load_adapted(base / "base", adapter, merged=True)
        want, prompt_tokens = _chat_reference(m, tok, template, msgs)
        assert prompt_tokens != len(tok.encode(ChatTemplate().render(msgs)))  # not the default labels
        cfg = {"ckpt": str(base / "base"), "api_keys": [KEY]} | ({"adapter": str(adapter)} if adapter else {})
        with serving(None, None, **cfg) as s:
            r = s.client().chat.completions.create(model="tiny", messages=msgs, max_tokens=24, temperature=0)
            assert r.usage.prompt_tokens == prompt_tokens
            assert r.choices[0].message.content == want


def test_the_engine_process_serves_as_the_thread_does_and_its_death_is_an_error(base, bpe_tok):
    """A checkpoint is served by an engine in a process of its own (config.engine_process, the default):
    the same greedy tokens, logprobs and trace as the engine on a thread; a client that leaves frees
    its slot there; and if that process dies, requests in flight get an error, /ready says 'failed'
    and the server stops rather than hang."""
    import httpx

    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "logprobs": 2, "llmclock": {"trace": True}}
    got = {}
    for ep in (False, True):
        with serving(None, None, ckpt=str(base / "base"), engine_process=ep) as s:
            assert (s.state.engine is None) == ep  # in its own process, this one holds no engine
            with s.http() as c:
                r = c.post("/v1/completions", json=body).json()
                got[ep] = (r["choices"][0]["text"], r["choices"][0]["logprobs"]["top_logprobs"],
                           [x["token_id"] for x in r["llmclock"]["trace"]])
                if not ep:
                    continue
                no_eot = {str(bpe_tok.eot_id): -100}
                with c.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 200, "stream": True,
                                                                "logit_bias": no_eot}) as st:
                    next(x for x in st.iter_lines() if x.startswith("data: {"))
                deadline = time.monotonic() + 5  # the client left: the slot is freed
                while s.state.loop.inflight and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert s.state.loop.inflight == 0
                with c.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 200, "stream": True,
                                                                "logit_bias": no_eot, "logprobs": 0}) as st:
                    lines = (x for x in st.iter_lines() if x.startswith("data: "))
                    next(lines)
                    s.state.loop.core.proc.kill()
                    rest = list(lines)
                assert "the engine process exited" in rest[-1] and '"error"' in rest[-1]
                deadline = time.monotonic() + 5
                while s.state.load_error is None and time.monotonic() < deadline:
                    time.sleep(0.01)
                with contextlib.suppress(httpx.HTTPError):  # it is stopping, or has stopped
                    assert c.get("/ready").status_code == 503
    assert got[True] == got[False]
