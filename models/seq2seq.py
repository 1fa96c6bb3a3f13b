"""Seq2Seq with attention (Bahdanau et al. 2014; Luong et al. 2015) on dlcore: a bidirectional GRU or LSTM encoder
(Sutskever et al. used LSTMs, Bahdanau et al. GRUs; `rnn=`) and a decoder cell of the same kind with either
- "bahdanau": additive attention through dlcore's fused kernel (dlcore.ops.additive_attention: tanh, v-projection,
  masked softmax and context in one pass; U·h computed once per sentence), the context from the previous state
  feeding the GRU input, or
- "luong": general/dot attention through dlcore's flash attention op (one query per step, key lengths for the
  padded source), the attentional state tanh(W_c[c; s]) feeding the output layer;
and the output layer + loss as dlcore's fused linear + cross-entropy. Greedy and beam-search decoding.
The stock twin (`stock=True`) is plain torch with the same modules and state_dict keys.
A decoder state is one tensor: h [B, H] for a GRU, [h, c] [B, 2H] for an LSTM (c starts at 0), so decoding and
beam search handle both alike.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dlcore import registry
from dlcore.models._training import dataclass_arguments, int_option, write_summary
from dlcore.ops.additive_attention import BahdanauAttention
from dlcore.ops.attention import scaled_dot_product_attention
from dlcore.ops.cross_entropy import linear_cross_entropy


@dataclass
class Seq2SeqConfig:
    src_vocab: int
    tgt_vocab: int
    emb: int = 64
    hidden: int = 128
    attn_dim: int = 128
    attention: str = "bahdanau"  # or "luong"
    rnn: str = "gru"  # or "lstm"

    def __post_init__(self):
        if self.rnn not in ("gru", "lstm"):
            raise ValueError(f"rnn must be 'gru' or 'lstm', got {self.rnn!r}")
        if self.attention not in ("bahdanau", "luong"):
            raise ValueError(f"attention must be 'bahdanau' or 'luong', got {self.attention!r}")
        if 2 * self.hidden > 256 and self.attention == "luong":
            raise ValueError("luong attention runs on the flash kernel: 2·hidden must be ≤ 256")


class Seq2Seq(nn.Module):
    """forward(src [B, S], src_lengths [B], tgt_in [B, T], labels [B, T] (-100 = padding)) → mean loss; the
    decoder is teacher-forced on tgt_in. Sequences are right-padded."""

    def __init__(self, cfg: Seq2SeqConfig, stock: bool = False):
        super().__init__()
        self.cfg, self.stock = cfg, stock
        h2 = 2 * cfg.hidden
        self.src_embed = nn.Embedding(cfg.src_vocab, cfg.emb)
        self.tgt_embed = nn.Embedding(cfg.tgt_vocab, cfg.emb)
        rnn, cell = (nn.GRU, nn.GRUCell) if cfg.rnn == "gru" else (nn.LSTM, nn.LSTMCell)
        self.encoder = rnn(cfg.emb, cfg.hidden, batch_first=True, bidirectional=True)
        self.bridge = nn.Linear(h2, cfg.hidden)
        if cfg.attention == "bahdanau":
            self.attn = BahdanauAttention(cfg.hidden, h2, cfg.attn_dim, stock=stock)
            self.cell = cell(cfg.emb + h2, cfg.hidden)
        else:
            self.query = nn.Linear(cfg.hidden, h2, bias=False)  # Luong's "general" score sᵀ W h as a dot product
            self.combine = nn.Linear(h2 + cfg.hidden, cfg.hidden)
            self.cell = cell(cfg.emb, cfg.hidden)
        self.out = nn.Linear(cfg.hidden + (h2 if cfg.attention == "bahdanau" else 0), cfg.tgt_vocab)

    def _hidden(self, state: torch.Tensor) -> torch.Tensor:
        """h of a decoder state (the whole state for a GRU, its first half for an LSTM's [h, c])."""
        return state if self.cfg.rnn == "gru" else state[:, :self.cfg.hidden]

    def _advance(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        if self.cfg.rnn == "gru":
            return self.cell(x, state)
        h, c = self.cell(x, (state[:, :self.cfg.hidden], state[:, self.cfg.hidden:]))
        return torch.cat([h, c], -1)

    def _check(self, ids: torch.Tensor, vocab: int, name: str) -> None:
        if ids.dim() != 2 or ids.is_floating_point():
            raise TypeError(f"{name} must be an integer tensor [batch, length]")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise IndexError(f"{name} holds {int(ids.min()) if int(ids.min()) < 0 else int(ids.max())}, out of range "
                             f"for a vocabulary of {vocab}")

    def encode(self, src, src_lengths):
        self._check(src, self.cfg.src_vocab, "src")
        if tuple(src_lengths.shape) != (src.shape[0],) or int(src_lengths.min()) < 1 or \
                int(src_lengths.max()) > src.shape[1]:
            raise ValueError(f"src_lengths must be [{src.shape[0]}] integers in [1, {src.shape[1]}]")
        packed = pack_padded_sequence(self.src_embed(src), src_lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, last = self.encoder(packed)
        last = last if self.cfg.rnn == "gru" else last[0]  # an LSTM's (h_n, c_n): its h_n
        memory, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        state = torch.tanh(self.bridge(torch.cat([last[0], last[1]], -1)))
        if self.cfg.rnn == "lstm":
            state = torch.cat([state, torch.zeros_like(state)], -1)  # c₀ = 0
        keys = self.attn.project_keys(memory) if self.cfg.attention == "bahdanau" else None
        return memory, keys, state

    def _context_luong(self, states, memory, src_lengths):
        """Contexts for decoder states [B, T, H] (T = 1 when decoding): one attention call for all T queries."""
        q = self.query(states)[:, None]  # [B, 1 head, T queries, 2H]
        kv = memory[:, None]             # [B, 1 head, S, 2H]
        if self.stock:
            keep = (torch.arange(memory.shape[1], device=memory.device) < src_lengths[:, None])[:, None, None, :]
            c = F.scaled_dot_product_attention(q, kv, kv, attn_mask=keep, scale=1.0)
        else:
            c = scaled_dot_product_attention(q, kv, kv, scale=1.0, key_lengths=src_lengths.to(memory.device))
        return c[:, 0]

    def step(self, token, state, memory, keys, src_lengths):
        """One decoder step: (features for the output layer [B, F], new state)."""
        e = self.tgt_embed(token)
        if self.cfg.attention == "bahdanau":
            context, _ = self.attn(self._hidden(state), memory, src_lengths, keys_proj=keys)
            state = self._advance(torch.cat([e, context], -1), state)
            return torch.cat([self._hidden(state), context], -1), state
        state = self._advance(e, state)
        h = self._hidden(state)
        context = self._context_luong(h[:, None], memory, src_lengths)[:, 0]
        return torch.tanh(self.combine(torch.cat([context, h], -1))), state

    def forward(self, src, src_lengths, tgt_in, labels):
        self._check(tgt_in, self.cfg.tgt_vocab, "tgt_in")
        if labels.shape != tgt_in.shape:
            raise ValueError(f"labels must have tgt_in's shape {tuple(tgt_in.shape)}, got {tuple(labels.shape)}")
        memory, keys, state = self.encode(src, src_lengths)
        if self.cfg.attention == "luong":  # attention does not feed the recurrence: all states first, one attention
            states = []
            for e in self.tgt_embed(tgt_in).unbind(1):
                state = self._advance(e, state)
                states.append(self._hidden(state))
            states = torch.stack(states, 1)
            feats = torch.tanh(self.combine(torch.cat([self._context_luong(states, memory, src_lengths), states], -1)))
        else:
            features = []
            for t in range(tgt_in.shape[1]):
                f, state = self.step(tgt_in[:, t], state, memory, keys, src_lengths)
                features.append(f)
            feats = torch.stack(features, 1)
        if self.stock:
            return F.cross_entropy(self.out(feats).flatten(0, 1), labels.flatten())
        return linear_cross_entropy(feats, self.out.weight, labels, self.out.bias)

    @torch.no_grad()
    def greedy_decode(self, src, src_lengths, bos: int, eos: int, max_len: int) -> torch.Tensor:
        memory, keys, state = self.encode(src, src_lengths)
        token = torch.full((src.shape[0],), bos, dtype=torch.long, device=src.device)
        done = torch.zeros_like(token, dtype=torch.bool)
        out = []
        for _ in range(max_len):
            f, state = self.step(token, state, memory, keys, src_lengths)
            token = torch.where(done, torch.full_like(token, eos), self.out(f).argmax(-1))
            out.append(token)
            done |= token == eos
            if bool(done.all()):
                break
        return torch.stack(out, 1)

    @torch.no_grad()
    def beam_search(self, src, src_lengths, bos: int, eos: int, max_len: int, beam: int = 4,
                    length_penalty: float = 1.0) -> torch.Tensor:
        """Beam search per sentence: keeps `beam` hypotheses by total log-probability, finished ones scored by
        log p / length^length_penalty. Returns [B, ≤ max_len] (EOS-padded)."""
        if beam < 1:
            raise ValueError(f"beam must be at least 1, got {beam}")
        results = []
        for b in range(src.shape[0]):
            memory, keys, state = self.encode(src[b:b + 1], src_lengths[b:b + 1])
            hyps = [(0.0, [bos], state)]
            finished = []
            for _ in range(max_len):
                tokens = torch.tensor([h[1][-1] for h in hyps], device=src.device)
                states = torch.cat([h[2] for h in hyps])
                n = len(hyps)
                f, new_states = self.step(tokens, states, memory.expand(n, -1, -1),
                                          None if keys is None else keys.expand(n, -1, -1), src_lengths[b:b + 1].expand(n))
                logp = F.log_softmax(self.out(f).float(), -1)
                candidates = []
                for i, (score, seq, _) in enumerate(hyps):
                    top = torch.topk(logp[i], min(beam, logp.shape[-1]))  # a beam wider than the vocabulary
                    for lp, tok in zip(top.values.tolist(), top.indices.tolist()):
                        candidates.append((score + lp, seq + [tok], new_states[i:i + 1]))
                candidates.sort(key=lambda c: c[0], reverse=True)
                hyps = []
                for c in candidates:
                    if c[1][-1] == eos:
                        finished.append((c[0] / (len(c[1]) - 1) ** length_penalty, c[1]))
                    else:
                        hyps.append(c)
                    if len(hyps) == beam:
                        break
                if not hyps or (len(finished) >= beam and max(f[0] for f in finished) >
                                max(h[0] / len(h[1]) ** length_penalty for h in hyps)):
                    break
            best = max(finished, key=lambda f: f[0])[1] if finished else hyps[0][1]
            results.append(best[1:])
        width = max(map(len, results))
        return torch.tensor([r + [eos] * (width - len(r)) for r in results], device=src.device)


# ---------------------------------------------------------------------------------------------------- training
@dataclass
class Seq2SeqTrainConfig:
    """`dlcore train seq2seq`: numbers (digits) to English words, as `dlcore train transformer` (trained on
    n mod 7 ≠ 0, scored by exact match on held-out n mod 7 = 0, greedy and beam search)."""
    attention: str = "bahdanau"
    rnn: str = "gru"
    emb: int = 64
    hidden: int = 128
    batch: int = 64
    steps: int = 600
    lr: float = 3e-3
    eval_every: int = 200
    eval_size: int = 300
    beam: int = 4
    target: float = 0.95
    seed: int = 0
    stock: bool = False
    out: str = "runs/seq2seq"
    progress: bool = True


def train(cfg: Seq2SeqTrainConfig) -> dict:
    import dlcore.optim
    from dlcore.models._training import Progress, plot_curves
    from dlcore.models.transformer import (BOS, EOS, SRC_VOCAB, TGT_VOCAB, exact_match_rate, held_out_numbers,
                                           numbers_batch, training_numbers)

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = Seq2Seq(Seq2SeqConfig(SRC_VOCAB, TGT_VOCAB, cfg.emb, cfg.hidden, cfg.hidden, cfg.attention, cfg.rnn),
                    cfg.stock)
    opt = (torch.optim.Adam if cfg.stock else dlcore.optim.Adam)(model.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.05, 1 - s / cfg.steps))
    eval_numbers = held_out_numbers(cfg.eval_size)
    os.makedirs(cfg.out, exist_ok=True)
    progress = Progress(f"seq2seq/{cfg.attention}", cfg.progress, cfg.steps)
    history, t0 = [], time.perf_counter()

    def exact_match(beam: int = 0) -> float:
        model.eval()
        src, src_len, *_ = numbers_batch(eval_numbers)
        ids = model.beam_search(src, src_len, BOS, EOS, 80, beam) if beam else \
            model.greedy_decode(src, src_len, BOS, EOS, 80)
        model.train()
        return exact_match_rate(ids, eval_numbers)

    for step in range(cfg.steps):
        src, src_len, tgt_in, _, labels = numbers_batch(training_numbers(cfg.batch, gen))
        opt.zero_grad(set_to_none=True)
        loss = model(src, src_len, tgt_in, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        progress.advance(step + 1, f"loss {loss.item():.3f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            acc = exact_match()
            history.append((step + 1, loss.item(), acc))
            progress.note(f"step {step + 1}: loss {loss.item():.3f}, held-out exact match (greedy) {acc:.3f}")
    progress.close()
    beam_acc = exact_match(cfg.beam) if cfg.beam > 1 else None
    torch.save(model.state_dict(), os.path.join(cfg.out, "model.pt"))
    plot_curves(os.path.join(cfg.out, "exact_match.png"), {"greedy exact match": ([h[0] for h in history],
                                                                                    [h[2] for h in history])},
                "step", "exact match", f"numbers → words, Seq2Seq ({cfg.attention}, dlcore)")
    summary = {"history": history, "exact_match": history[-1][2], "beam_exact_match": beam_acc,
               "seconds": time.perf_counter() - t0, "config": asdict(cfg)}
    write_summary(cfg.out, summary)
    return summary


def _train_run(args: argparse.Namespace) -> int:
    from dlcore.models._training import dataclass_from_args

    cfg = dataclass_from_args(Seq2SeqTrainConfig, args)
    s = train(cfg)
    print(f"held-out exact match: greedy {s['exact_match']:.3f}, beam {cfg.beam}: {s['beam_exact_match']} "
          f"(target {cfg.target})")
    print(f"wrote {cfg.out}/model.pt, exact_match.png, summary.json")
    return 0 if max(s["exact_match"], s["beam_exact_match"] or 0) >= cfg.target else 1


registry.register("train", "seq2seq", help="GRU encoder-decoder with Bahdanau or Luong attention: numbers to words",
                  run=_train_run)(dataclass_arguments(Seq2SeqTrainConfig))


def profile(attention: str = "bahdanau", hidden: int = 128, batch: int = 64, steps: int = 3, autocast: bool = False,
            device: Optional[str] = None, rnn: str = "gru") -> list[dict]:
    """Training tokens/s (source + target tokens) and peak memory on numbers → words batches, dlcore vs stock."""
    from dlcore.models._training import profile_training
    from dlcore.models.transformer import SRC_VOCAB, TGT_VOCAB, numbers_batch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = Seq2SeqConfig(SRC_VOCAB, TGT_VOCAB, hidden=hidden, attn_dim=hidden, attention=attention, rnn=rnn)
    torch.manual_seed(0)
    ours, twin = Seq2Seq(cfg).to(dev), Seq2Seq(cfg, stock=True).to(dev)
    twin.load_state_dict(ours.state_dict())
    src, src_len, tgt_in, tgt_len, labels = numbers_batch(torch.randint(0, 1_000_000, (batch,)))
    inputs = (src.to(dev), src_len.to(dev), tgt_in.to(dev), labels.to(dev))
    return profile_training(ours, twin, inputs, int(src_len.sum() + tgt_len.sum()), dev, steps, autocast)


def _profile_arguments(p: argparse.ArgumentParser) -> None:
    from dlcore.models._training import add_profile_arguments

    p.add_argument("--attention", choices=["bahdanau", "luong"], default="bahdanau")
    p.add_argument("--rnn", choices=["gru", "lstm"], default="gru")
    p.add_argument("--hidden", type=int_option("hidden"), default=128)
    add_profile_arguments(p, batch=64, compile_option=False)


def _profile_run(args: argparse.Namespace) -> int:
    from dlcore.models._training import print_profile

    rows = profile(args.attention, args.hidden, args.batch, args.steps, args.autocast, args.device, args.rnn)
    print_profile(f"Seq2Seq ({args.rnn.upper()}, {args.attention}, hidden {args.hidden}) on numbers → words, batch "
                  f"{args.batch}, "
                  f"{'bf16 autocast' if args.autocast else 'fp32'} (tokens = source + target)", rows)
    return 0


registry.register("profile", "seq2seq", help="Seq2Seq training tokens/s and peak memory, dlcore vs stock",
                  run=_profile_run)(_profile_arguments)
