import pytest
import torch

from llmclock.config import ModelConfig, preset
from llmclock.errors import LLMClockError
from llmclock.model import GPT


def test_causal_later_tokens_never_change_earlier_logits(tiny_model):
    torch.manual_seed(1)
    x = torch.randint(tiny_model.config.vocab_size, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(tiny_model.config.vocab_size, (2, 8))
    with torch.no_grad():
        a, _ = tiny_model(x)
        b, _ = tiny_model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_tied_embeddings_and_gpt2_parameter_count():
    with torch.device("meta"):
        m = GPT(preset("gpt2"))
    assert m.lm_head.weight is m.transformer.wte.weight
    assert sum(p.numel() for p in m.parameters()) == 124_439_808  # GPT-2 small, as published


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=100, block_size=16, n_layer=8, n_head=2, n_embd=64))
    std = m.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * 8) ** 0.5) < 0.002
    assert abs(m.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002


def test_loss_falls_on_tiny_corpus(char_tok):
    from tests.conftest import CORPUS

    torch.manual_seed(0)
    m = GPT(preset("test", vocab_size=char_tok.vocab_size))
    ids = torch.tensor(char_tok.encode(CORPUS[:4000]))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        i = torch.randint(len(ids) - 33, (8,))
        x = torch.stack([ids[j : j + 32] for j in i])
        y = torch.stack([ids[j + 1 : j + 33] for j in i])
        _, loss = m(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:5]) / 5


def test_config_validation():
    with pytest.raises(LLMClockError, match="not divisible"):
        ModelConfig(n_embd=100, n_head=3)
    with pytest.raises(LLMClockError, match="unknown preset"):
        preset("gpt5")
    assert preset("124M").n_layer == 12 and preset("1.5B").n_embd == 1600


def test_sequence_longer_than_context_is_refused(tiny_model):
    with pytest.raises(ValueError, match="exceeds block_size"):
        tiny_model(torch.zeros(1, tiny_model.config.block_size + 1, dtype=torch.long))
