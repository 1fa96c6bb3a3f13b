"""Fused additive (Bahdanau) attention — every backend against float64, odd shapes and lengths, every gradient,
gradcheck, opcheck, bad input — and the Seq2Seq model: dlcore and its stock twin share a state_dict and agree on
loss and gradients (Bahdanau and Luong attention), greedy decoding equals beam search of width 1, bad input."""
import os
import time

import pytest
import torch

import dlcore
from dlcore.ops import additive_attention as aa
from dlcore.ops.additive_attention import BahdanauAttention, additive_attention
from dlcore.testing import backend_device_pairs, max_error

SEED = int(os.environ.get("DLCORE_TEST_SEED", int(time.time() * 1000) % 2**31))


def _stock(ws, uh, v, h, lengths):
    e = torch.tanh(ws[:, None] + uh) @ v
    e = e.masked_fill(torch.arange(uh.shape[1]) >= lengths[:, None], float("-inf"))
    a = e.softmax(1)
    return torch.einsum("bs,bsd->bd", a, h), a


CASES = [(b, d, t) for t in (torch.float32, torch.float64, torch.bfloat16)
         for b, d in backend_device_pairs(aa.FORWARD, t)]


@pytest.mark.parametrize("backend,device,dtype", CASES)
@pytest.mark.parametrize("B,S,A,D", [(1, 1, 1, 1), (3, 13, 20, 17), (2, 129, 64, 33), (5, 7, 130, 300)])
def test_additive_attention_matches_float64(backend, device, dtype, B, S, A, D):
    gen = torch.Generator().manual_seed(SEED + B * S + A)
    base = [torch.randn(B, A, generator=gen, dtype=torch.float64), torch.randn(B, S, A, generator=gen,
                                                                                  dtype=torch.float64),
            torch.randn(A, generator=gen, dtype=torch.float64), torch.randn(B, S, D, generator=gen,
                                                                              dtype=torch.float64)]
    if dtype == torch.bfloat16:
        base = [t.to(dtype).double() for t in base]
    lengths = torch.randint(1, S + 1, (B,), generator=gen)
    lengths[0] = S
    g = torch.randn(B, D, generator=gen, dtype=torch.float64)
    want64 = [t.requires_grad_() for t in [t.clone() for t in base]]
    c64, a64 = _stock(*want64, lengths)
    grads64 = torch.autograd.grad(c64, want64, g)
    ins = [t.to(device, dtype).requires_grad_() for t in base]
    with dlcore.use_backend(backend):
        c, a = additive_attention(*ins, lengths.to(device))
        grads = torch.autograd.grad(c, ins, g.to(device, dtype))
    if dtype == torch.bfloat16:  # within 2× stock torch's own bf16 error (plus a little slack)
        low = [t.to(dtype).requires_grad_() for t in base]
        cl, _ = _stock(*low, lengths)
        gl = torch.autograd.grad(cl, low, g.to(dtype))
        pairs = zip([c, *grads], [c64, *grads64], [cl, *gl])
        for got, want, stock in pairs:
            assert max_error(got.cpu(), want) <= 2 * max_error(stock, want) + 2e-2 * (1 + want.abs().max().item())
        return
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert max_error(a.cpu(), a64) < tol
    for got, want, name in zip([c, *grads], [c64, *grads64], ("context", "dws", "duh", "dv", "dh")):
        assert max_error(got.cpu(), want) < tol * (1 + want.abs().max().item()), name


def test_gradcheck_opcheck_module_and_bad_input():
    gen = torch.Generator().manual_seed(SEED)
    ins = [torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True) for s in ((2, 5), (2, 4, 5), (5,),
                                                                                            (2, 4, 3))]
    lengths = torch.tensor([4, 2])
    assert torch.autograd.gradcheck(lambda *a: additive_attention(*a, lengths)[0], ins)
    torch.library.opcheck(aa.additive_attention_op, (*[t.detach().float() for t in ins], lengths))
    torch.manual_seed(SEED)
    ours, stock = BahdanauAttention(6, 3, 5), BahdanauAttention(6, 3, 5, stock=True)
    stock.load_state_dict(ours.state_dict())
    q, keys = torch.randn(2, 6), torch.randn(2, 4, 3)
    assert max_error(ours(q, keys, lengths)[0], stock(q, keys, lengths)[0]) < 1e-5
    with pytest.raises(ValueError, match="lengths must lie"):
        additive_attention(*[t.detach() for t in ins], torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="query_proj"):
        additive_attention(ins[0][:, :4].detach(), *[t.detach() for t in ins[1:]])
    with pytest.raises(TypeError, match="values"):
        additive_attention(*[t.detach() for t in ins[:3]], ins[3].detach().float())


# ---------------------------------------------------------------------------------------------------- model
from dlcore.models.seq2seq import Seq2Seq, Seq2SeqConfig, Seq2SeqTrainConfig, train  # noqa: E402
from dlcore.models.transformer import BOS, EOS, SRC_VOCAB, TGT_VOCAB, numbers_batch  # noqa: E402


@pytest.mark.parametrize("attention", ["bahdanau", "luong"])
@pytest.mark.parametrize("rnn", ["gru", "lstm"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_seq2seq_matches_twin(attention, rnn, dtype, tol):
    cfg = Seq2SeqConfig(SRC_VOCAB, TGT_VOCAB, emb=16, hidden=24, attn_dim=20, attention=attention, rnn=rnn)
    torch.manual_seed(SEED)
    ours, twin = Seq2Seq(cfg).to(dtype), Seq2Seq(cfg, stock=True).to(dtype)
    twin.load_state_dict(ours.state_dict())
    src, src_len, tgt_in, _, labels = numbers_batch(torch.tensor([7, 123456, 40, 999999]))
    losses = [m(src, src_len, tgt_in, labels) for m in (ours, twin)]
    assert abs(losses[0].item() - losses[1].item()) < tol
    for loss in losses:
        loss.backward()
    for (name, p), q in zip(ours.named_parameters(), twin.parameters()):
        assert max_error(p.grad, q.grad) < tol * (1 + q.grad.abs().max().item()), name
    greedy = ours.greedy_decode(src, src_len, BOS, EOS, 12)
    beam1 = ours.beam_search(src, src_len, BOS, EOS, 12, beam=1)
    width = min(greedy.shape[1], beam1.shape[1])
    assert torch.equal(greedy[:, :width], beam1[:, :width])
    assert ours.beam_search(src, src_len, BOS, EOS, 12, beam=3).shape[0] == 4
    wide = ours.cfg.tgt_vocab + 5  # a beam wider than the vocabulary keeps every candidate (topk raised)
    assert ours.beam_search(src[:1], src_len[:1], BOS, EOS, 3, beam=wide).shape[0] == 1
    with pytest.raises(ValueError, match="beam must be at least 1"):
        ours.beam_search(src, src_len, BOS, EOS, 12, beam=0)


def test_seq2seq_bad_input_and_training_runs(tmp_path):
    cfg = Seq2SeqConfig(SRC_VOCAB, TGT_VOCAB, emb=8, hidden=8, attn_dim=8)
    model = Seq2Seq(cfg)
    src, src_len, tgt_in, _, labels = numbers_batch(torch.tensor([12, 3]))
    with pytest.raises(IndexError, match="src holds 11"):
        model(torch.full_like(src, 11), src_len, tgt_in, labels)
    with pytest.raises(ValueError, match="src_lengths"):
        model(src, torch.tensor([3, 1]), tgt_in, labels)
    with pytest.raises(ValueError, match="attention"):
        Seq2SeqConfig(3, 3, attention="dot")
    with pytest.raises(ValueError, match="rnn must be"):
        Seq2SeqConfig(3, 3, rnn="rnn")
    s = train(Seq2SeqTrainConfig(emb=8, hidden=16, batch=8, steps=6, eval_every=6, eval_size=4, beam=2,
                                 out=str(tmp_path), progress=False))
    assert len(s["history"]) == 1 and s["beam_exact_match"] is not None and (tmp_path / "model.pt").exists()


def test_profile_seq2seq_and_transformer_report_both_variants():
    from dlcore.models import seq2seq, transformer

    for rows in (seq2seq.profile("luong", hidden=16, batch=4, steps=1),
                 seq2seq.profile("bahdanau", hidden=16, batch=4, steps=1),
                 transformer.profile("small", batch=4, steps=1)):
        assert [r["variant"] for r in rows] == ["dlcore", "torch eager", "torch eager + fused AdamW"] and all(r["tokens_per_s"] > 0 for r in rows)
