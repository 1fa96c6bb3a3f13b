"""The encoder-decoder Transformer (dlcore.models.transformer): the dlcore model and its stock twin share a
state_dict and agree on the label-smoothed loss, logits and every gradient on right-padded batches (float64 through
the reference kernels, fp32 through the C++ ones); greedy decoding; the numbers-to-words data; the schedule; bad
input."""
import os
import time

import pytest
import torch

from dlcore.models.transformer import (BOS, EOS, SRC_VOCAB, TGT_VOCAB, Transformer, TransformerConfig,
                                       TransformerTrainConfig, decode_words, inverse_sqrt_schedule, number_to_words,
                                       numbers_batch, train)
from dlcore.testing import max_error

SEED = int(os.environ.get("DLCORE_TEST_SEED", int(time.time() * 1000) % 2**31))
CFG = TransformerConfig(src_vocab=SRC_VOCAB, tgt_vocab=TGT_VOCAB, d_model=32, n_heads=4, d_ff=64, enc_layers=2,
                        dec_layers=2, dropout=0.0, max_len=80)


def _twins(dtype):
    torch.manual_seed(SEED)
    ours, twin = Transformer(CFG).to(dtype), Transformer(CFG, stock=True).to(dtype)
    twin.load_state_dict(ours.state_dict())
    return ours, twin


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_matches_twin_on_padded_batches(dtype, tol):
    ours, twin = _twins(dtype)
    batch = numbers_batch(torch.tensor([7, 123456, 40, 999999, 1000]))
    losses = [m(*batch) for m in (ours, twin)]
    assert abs(losses[0].item() - losses[1].item()) < tol
    for loss in losses:
        loss.backward()
    for (name, p), q in zip(ours.named_parameters(), twin.parameters()):
        assert max_error(p.grad, q.grad) < tol * (1 + q.grad.abs().max().item()), name
    assert max_error(ours(*batch[:4]), twin(*batch[:4])) < tol * 10


def test_padding_is_invisible_and_greedy_decoding():
    ours, _ = _twins(torch.float64)
    src, src_len, tgt_in, tgt_len, _ = numbers_batch(torch.tensor([123456, 7]))
    both = ours(src, src_len, tgt_in, tgt_len)
    alone = ours(src[1:, :1], src_len[1:], tgt_in[1:, :tgt_len[1]], tgt_len[1:])
    assert max_error(both[1, :tgt_len[1]], alone[0]) < 1e-10
    out = ours.greedy_decode(src, src_len, BOS, EOS, max_len=6)
    seq = torch.full((2, 1), BOS)
    for _ in range(out.shape[1]):  # the same decoding spelled out
        nxt = ours(src, src_len, seq, torch.full((2,), seq.shape[1]))[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    finished = torch.cumsum(seq[:, 1:] == EOS, 1) > 0
    shifted = torch.cat([torch.zeros(2, 1, dtype=torch.bool), finished[:, :-1]], 1)
    assert torch.equal(torch.where(shifted, EOS, out), torch.where(shifted, EOS, seq[:, 1:]))


@pytest.mark.parametrize("stock", [False, True])
def test_kv_cache_decoding_equals_full_prefix_decoding(stock):
    """The cached decoder step gives the full re-decode's last-position output (float64, to rounding) and the same
    greedy tokens."""
    model = _twins(torch.float64)[1 if stock else 0].eval()
    src, src_len, tgt_in, tgt_len, _ = numbers_batch(torch.tensor([7, 123456, 40, 999999]))
    memory = model.encode(src, src_len)
    caches = [{"cross": layer.cross_attn.keys_values(memory)} for layer in model.decoder]
    for t in range(tgt_in.shape[1]):
        y = model._embed_at(tgt_in[:, t], t)
        for layer, cache in zip(model.decoder, caches):
            y = layer.step(y, cache, src_len)
        full = model.decode(tgt_in[:, :t + 1], torch.full((4,), t + 1), memory, src_len)[:, -1]
        assert max_error(y[:, 0], full) < 1e-10
    with_cache = model.greedy_decode(src, src_len, BOS, EOS, 15)
    assert torch.equal(with_cache, model.greedy_decode(src, src_len, BOS, EOS, 15, use_cache=False))


def test_numbers_to_words_data():
    assert number_to_words(4817) == "four thousand eight hundred seventeen"
    assert number_to_words(700070) == "seven hundred thousand seventy"
    assert number_to_words(0) == "zero" and number_to_words(42) == "forty-two"
    src, src_len, tgt_in, tgt_len, labels = numbers_batch(torch.tensor([5, 1000]))
    assert src_len.tolist() == [1, 4] and tgt_len.tolist() == [5, 13]
    assert decode_words(labels.clamp_min(0)) == ["five", "one thousand"]
    assert tgt_in[0, 0] == BOS and labels[0, 4] == EOS and labels[0, 5] == -100
    with pytest.raises(ValueError):
        number_to_words(10 ** 6)


def test_inverse_sqrt_schedule():
    f = inverse_sqrt_schedule(512, 4000)
    assert f(3999) == pytest.approx(512 ** -0.5 * 4000 ** -0.5)  # the peak, at step = warmup
    assert f(0) < f(1999) < f(3999) and f(15999) == pytest.approx(f(3999) / 2)


def test_bad_input():
    model = Transformer(CFG)
    src, src_len, tgt_in, tgt_len, labels = numbers_batch(torch.tensor([12, 3]))
    with pytest.raises(IndexError, match="src holds 11"):
        model(torch.full_like(src, 11), src_len, tgt_in, tgt_len)
    with pytest.raises(ValueError, match="src_lengths must lie"):
        model(src, torch.tensor([3, 1]), tgt_in, tgt_len)
    with pytest.raises(ValueError, match="positional limit"):
        model(src, src_len, torch.zeros(2, 81, dtype=torch.long), torch.tensor([81, 81]))
    with pytest.raises(ValueError, match="labels"):
        model(src, src_len, tgt_in, tgt_len, labels[:, :-1])
    with pytest.raises(ValueError, match="multiple"):
        TransformerConfig(d_model=30, n_heads=4)


def test_train_transformer_runs(tmp_path):
    s = train(TransformerTrainConfig(d_model=32, n_heads=2, d_ff=64, layers=1, batch=16, steps=30, warmup=10,
                                     eval_every=30, eval_size=8, out=str(tmp_path), progress=False))
    assert len(s["history"]) == 1 and 0.0 <= s["exact_match"] <= 1.0
    assert (tmp_path / "model.pt").exists() and (tmp_path / "summary.json").exists()
