"""The Transformer of "Attention Is All You Need" (Vaswani et al. 2017) on dlcore: encoder-decoder, post-LayerNorm,
sinusoidal positions, embeddings scaled by √d_model, label smoothing and the inverse-square-root warm-up schedule.

dlcore path (default): every sublayer's residual add is fused into its LayerNorm (LN(x + sublayer(x)) is
dlcore.functional.layer_norm(sublayer(x), residual=x)); self-, causal self- and cross-attention through dlcore's
flash kernel with per-sequence key lengths (right-padded batches skip their padded keys); the label-smoothed loss
is dlcore's fused linear + cross-entropy on the output layer (tied to the target embedding). The feed-forward
block is the paper's ReLU one. Every linear layer of the dlcore path is dlcore.nn.Linear: the skinny CPU GEMM for
few rows of fp32 (greedy decoding: the base model 1.4–1.6× the stock twin at batch 1 and 8), torch's otherwise.
The stock twin (`stock=True`) is plain torch.nn/F with the same modules and state_dict keys.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dlcore import _eager, registry
from dlcore.models._training import dataclass_arguments, write_summary
from dlcore.nn import Linear
from dlcore.ops.attention import scaled_dot_product_attention
from dlcore.ops.cross_entropy import linear_cross_entropy
from dlcore.ops.layer_norm import layer_norm
from dlcore.patching import swap_classes


@dataclass
class TransformerConfig:
    src_vocab: int = 32000
    tgt_vocab: int = 32000
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    enc_layers: int = 6
    dec_layers: int = 6
    dropout: float = 0.1
    max_len: int = 1024
    label_smoothing: float = 0.1
    eps: float = 1e-5

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}")


CONFIGS = {"base": TransformerConfig(), "big": TransformerConfig(d_model=1024, n_heads=16, d_ff=4096, dropout=0.3),
           "small": TransformerConfig(d_model=128, n_heads=4, d_ff=512, enc_layers=2, dec_layers=2, dropout=0.0)}


def sinusoidal_positions(length: int, d: int) -> torch.Tensor:
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d))."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float64) / d)
    pe = torch.zeros(length, d, dtype=torch.float64)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq[: d // 2])
    return pe.float()


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float, stock: bool):
        super().__init__()
        self.heads, self.dropout, self.stock = heads, dropout, stock
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def _split(self, y: torch.Tensor) -> torch.Tensor:
        """[B, n, d] → [B, heads, n, d/heads]."""
        b, n, d = y.shape
        return y.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) [B, heads, S, d/heads] of `memory`: what a decoding cache keeps."""
        return self._split(self.k_proj(memory)), self._split(self.v_proj(memory))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, key_lengths: torch.Tensor, causal: bool,
                kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        """Attention of x's queries over memory (or over precomputed `kv` = keys_values(memory))."""
        b, t, d = x.shape
        q = self._split(self.q_proj(x))
        k, v = kv if kv is not None else self.keys_values(memory)
        s = k.shape[2]
        p = self.dropout if self.training else 0.0
        if self.stock:
            keep = (torch.arange(s, device=x.device) < key_lengths[:, None])[:, None, None, :]
            if causal:
                keep = keep & torch.ones(t, s, dtype=torch.bool, device=x.device).tril()
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)
        else:
            y = scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal, key_lengths=key_lengths)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class _Sublayers(nn.Module):
    """Post-LN residual sublayers: x = LN_i(x + dropout(sublayer_i(x)))."""

    def _add_norm(self, norm: nn.LayerNorm, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        out = self.drop(out)
        if self.stock:
            return norm(x + out)
        return layer_norm(out, norm.normalized_shape, norm.weight, norm.bias, norm.eps, residual=x)[0]

    def _ffn(self, x):
        return self.linear2(self.drop(F.relu(self.linear1(x))))


class EncoderLayer(_Sublayers):
    def __init__(self, cfg: TransformerConfig, stock: bool):
        super().__init__()
        self.stock = stock
        self.self_attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout, stock)
        self.linear1, self.linear2 = nn.Linear(cfg.d_model, cfg.d_ff), nn.Linear(cfg.d_ff, cfg.d_model)
        self.norm1, self.norm2 = (nn.LayerNorm(cfg.d_model, eps=cfg.eps) for _ in range(2))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, lengths):
        x = self._add_norm(self.norm1, x, self.self_attn(x, x, lengths, causal=False))
        return self._add_norm(self.norm2, x, self._ffn(x))


class DecoderLayer(_Sublayers):
    def __init__(self, cfg: TransformerConfig, stock: bool):
        super().__init__()
        self.stock = stock
        self.self_attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout, stock)
        self.cross_attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout, stock)
        self.linear1, self.linear2 = nn.Linear(cfg.d_model, cfg.d_ff), nn.Linear(cfg.d_ff, cfg.d_model)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(cfg.d_model, eps=cfg.eps) for _ in range(3))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, y, tgt_lengths, memory, src_lengths):
        y = self._add_norm(self.norm1, y, self.self_attn(y, y, tgt_lengths, causal=True))
        y = self._add_norm(self.norm2, y, self.cross_attn(y, memory, src_lengths, causal=False))
        return self._add_norm(self.norm3, y, self._ffn(y))

    def step(self, y, cache: dict, src_lengths):
        """One new position y [B, 1, d] with this layer's cache: {"cross": keys_values(memory)} and the self-attention
        keys/values of the positions before (appended to here). Post-LN and causal masking leave earlier positions'
        outputs unchanged, so the cached values are exact."""
        k, v = self.self_attn.keys_values(y)
        if "self" in cache:
            k, v = torch.cat([cache["self"][0], k], 2), torch.cat([cache["self"][1], v], 2)
        cache["self"] = (k, v)
        every = torch.full((y.shape[0],), k.shape[2], dtype=torch.long, device=y.device)
        y = self._add_norm(self.norm1, y, self.self_attn(y, None, every, causal=False, kv=(k, v)))
        y = self._add_norm(self.norm2, y, self.cross_attn(y, None, src_lengths, causal=False, kv=cache["cross"]))
        return self._add_norm(self.norm3, y, self._ffn(y))


class Transformer(nn.Module):
    """forward(src [B, S], src_lengths [B], tgt_in [B, T], tgt_lengths [B], labels [B, T] (-100 = padding))
    → the label-smoothed mean loss; without labels → logits [B, T, tgt_vocab]. Sequences are right-padded."""

    def __init__(self, cfg: TransformerConfig = TransformerConfig(), stock: bool = False):
        super().__init__()
        self.cfg, self.stock = cfg, stock
        self.src_embed = nn.Embedding(cfg.src_vocab, cfg.d_model)
        self.tgt_embed = nn.Embedding(cfg.tgt_vocab, cfg.d_model)
        self.encoder = nn.ModuleList(EncoderLayer(cfg, stock) for _ in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg, stock) for _ in range(cfg.dec_layers))
        self.generator = nn.Linear(cfg.d_model, cfg.tgt_vocab, bias=False)
        self.generator.weight = self.tgt_embed.weight  # tied, as in the paper
        self.register_buffer("positions", sinusoidal_positions(cfg.max_len, cfg.d_model), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        if not stock:
            swap_classes(self, {nn.Linear: Linear})
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def _embed(self, table: nn.Embedding, ids: torch.Tensor, name: str) -> torch.Tensor:
        if ids.dim() != 2 or ids.is_floating_point():
            raise TypeError(f"{name} must be an integer tensor [batch, length]")
        if ids.shape[1] > self.cfg.max_len:
            raise ValueError(f"{name} has {ids.shape[1]} tokens, over the positional limit max_len={self.cfg.max_len}")
        if ids.numel() and _eager.values_known(ids) and (int(ids.min()) < 0 or int(ids.max()) >= table.num_embeddings):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise IndexError(f"{name} holds {bad}, out of range for a vocabulary of {table.num_embeddings}")
        return self.drop(table(ids) * math.sqrt(self.cfg.d_model) + self.positions[: ids.shape[1]])

    def _embed_at(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        """Target embeddings of one new token per sentence ids [B] at `position` → [B, 1, d] (decoding)."""
        if position >= self.cfg.max_len:
            raise ValueError(f"decoding past the positional limit max_len={self.cfg.max_len}")
        return self.drop(self.tgt_embed(ids)[:, None] * math.sqrt(self.cfg.d_model) + self.positions[position])

    @staticmethod
    def _lengths(lengths: torch.Tensor, ids: torch.Tensor, name: str) -> torch.Tensor:
        if tuple(lengths.shape) != (ids.shape[0],) or lengths.is_floating_point():
            raise ValueError(f"{name} must be an integer tensor of shape ({ids.shape[0]},)")
        if lengths.numel() and _eager.values_known(lengths) and (int(lengths.min()) < 1
                                                                 or int(lengths.max()) > ids.shape[1]):
            raise ValueError(f"{name} must lie in [1, {ids.shape[1]}]")
        return lengths

    def encode(self, src, src_lengths):
        src_lengths = self._lengths(src_lengths, src, "src_lengths")
        x = self._embed(self.src_embed, src, "src")
        for layer in self.encoder:
            x = layer(x, src_lengths)
        return x

    def decode(self, tgt_in, tgt_lengths, memory, src_lengths):
        tgt_lengths = self._lengths(tgt_lengths, tgt_in, "tgt_lengths")
        y = self._embed(self.tgt_embed, tgt_in, "tgt_in")
        for layer in self.decoder:
            y = layer(y, tgt_lengths, memory, src_lengths)
        return y

    def forward(self, src, src_lengths, tgt_in, tgt_lengths, labels=None):
        y = self.decode(tgt_in, tgt_lengths, self.encode(src, src_lengths), src_lengths)
        if labels is None:
            return self.generator(y)
        if labels.shape != tgt_in.shape:
            raise ValueError(f"labels must have tgt_in's shape {tuple(tgt_in.shape)}, got {tuple(labels.shape)}")
        if self.stock:
            return F.cross_entropy(self.generator(y).flatten(0, 1), labels.flatten(),
                                   label_smoothing=self.cfg.label_smoothing)
        return linear_cross_entropy(y, self.generator.weight, labels, label_smoothing=self.cfg.label_smoothing)

    @torch.no_grad()
    def greedy_decode(self, src, src_lengths, bos: int, eos: int, max_len: int, use_cache: bool = True) -> torch.Tensor:
        """[B, ≤ max_len] token ids after BOS, up to and including EOS (then EOS-padded). use_cache: each step runs
        the decoder on the new token only, with per-layer caches of the self-attention keys/values and of the
        memory's cross-attention keys/values (computed once); False re-decodes the whole prefix each step."""
        memory = self.encode(src, src_lengths)
        out = torch.full((src.shape[0], 1), bos, dtype=torch.long, device=src.device)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        caches = [{"cross": layer.cross_attn.keys_values(memory)} for layer in self.decoder]
        for _ in range(max_len):
            if use_cache:
                y = self._embed_at(out[:, -1], out.shape[1] - 1)
                for layer, cache in zip(self.decoder, caches):
                    y = layer.step(y, cache, src_lengths)
                nxt = self.generator(y[:, 0]).argmax(-1)
            else:
                lengths = torch.full((src.shape[0],), out.shape[1], device=src.device)
                nxt = self.generator(self.decode(out, lengths, memory, src_lengths)[:, -1]).argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            out = torch.cat([out, nxt[:, None]], 1)
            done |= nxt == eos
            if bool(done.all()):
                break
        return out[:, 1:]


def inverse_sqrt_schedule(d_model: int, warmup: int):
    """The paper's learning rate factor: d_model^-0.5 · min(step^-0.5, step · warmup^-1.5) (step from 1)."""
    return lambda step: d_model ** -0.5 * min((step + 1) ** -0.5, (step + 1) * warmup ** -1.5)


# ---------------------------------------------------------------------------------------------------- training
_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_to_words(n: int) -> str:
    """English words for 0 ≤ n < 10⁶: 4817 → 'four thousand eight hundred seventeen', 42 → 'forty-two'."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"n must be in [0, 1000000), got {n}")

    def below_1000(k: int) -> list[str]:
        words = []
        if k >= 100:
            words += [_ONES[k // 100], "hundred"]
            k %= 100
        if k >= 20:
            words.append(_TENS[k // 10] + (f"-{_ONES[k % 10]}" if k % 10 else ""))
        elif k or not words:
            words.append(_ONES[k])
        return words

    if n < 1000:
        return " ".join(below_1000(n))
    rest = below_1000(n % 1000) if n % 1000 else []
    return " ".join(below_1000(n // 1000) + ["thousand"] + rest)


PAD, BOS, EOS = 0, 1, 2
_CHARS = " -abcdefghijklmnopqrstuvwxyz"
SRC_VOCAB, TGT_VOCAB = 11, 3 + len(_CHARS)


def numbers_batch(numbers: torch.Tensor):
    """(src, src_lengths, tgt_in, tgt_lengths, labels) for a batch of numbers: digits → characters of the words,
    right-padded; the decoder input starts with BOS, the labels end with EOS (-100 on padding)."""
    digits = [str(int(n)) for n in numbers]
    words = [number_to_words(int(n)) for n in numbers]
    b, s, t = len(digits), max(map(len, digits)), max(map(len, words)) + 1
    src = torch.full((b, s), PAD)
    tgt_in = torch.full((b, t), PAD)
    labels = torch.full((b, t), -100)
    for i, (d, w) in enumerate(zip(digits, words)):
        src[i, :len(d)] = torch.tensor([int(c) + 1 for c in d])
        chars = [3 + _CHARS.index(c) for c in w]
        tgt_in[i, :len(chars) + 1] = torch.tensor([BOS] + chars)
        labels[i, :len(chars) + 1] = torch.tensor(chars + [EOS])
    return (src, torch.tensor([len(d) for d in digits]), tgt_in, torch.tensor([len(w) + 1 for w in words]), labels)


def held_out_numbers(size: int) -> torch.Tensor:
    """`size` fixed numbers n < 10⁶ with n mod 7 = 0: the evaluation set, never trained on."""
    held_out = torch.arange(0, 1_000_000, 7)
    return held_out[torch.randperm(len(held_out), generator=torch.Generator().manual_seed(99))[:size]]


def training_numbers(batch: int, gen: torch.Generator) -> torch.Tensor:
    """`batch` random numbers n < 10⁶ with n mod 7 ≠ 0 (multiples of 7 are moved up by one)."""
    numbers = torch.randint(0, 1_000_000, (batch,), generator=gen)
    return (numbers + (numbers % 7 == 0).long()) % 1_000_000


def exact_match_rate(decoded: torch.Tensor, numbers: torch.Tensor) -> float:
    """Fraction of the decoded token rows that spell their number's words exactly."""
    return sum(g == number_to_words(int(n)) for g, n in zip(decode_words(decoded), numbers)) / len(numbers)


def decode_words(ids: torch.Tensor) -> list[str]:
    out = []
    for row in ids.tolist():
        chars = []
        for i in row:
            if i == EOS:
                break
            chars.append(_CHARS[i - 3] if i >= 3 else "?")
        out.append("".join(chars))
    return out


@dataclass
class TransformerTrainConfig:
    """`dlcore train transformer`: numbers (digits) to English words, trained on n mod 7 ≠ 0 below 10⁶ and scored
    by greedy-decoding exact match on held-out n mod 7 = 0."""
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 512
    layers: int = 2
    batch: int = 64
    steps: int = 1000
    warmup: int = 300
    lr_scale: float = 0.7  # times the paper's d_model^-0.5 · min(step^-0.5, step · warmup^-1.5)
    label_smoothing: float = 0.1
    eval_every: int = 250
    eval_size: int = 500
    target: float = 0.95
    seed: int = 0
    stock: bool = False
    out: str = "runs/transformer"
    progress: bool = True


def train(cfg: TransformerTrainConfig) -> dict:
    import dlcore.optim
    from dlcore.models._training import Progress, plot_curves

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model_cfg = TransformerConfig(src_vocab=SRC_VOCAB, tgt_vocab=TGT_VOCAB, d_model=cfg.d_model, n_heads=cfg.n_heads,
                                  d_ff=cfg.d_ff, enc_layers=cfg.layers, dec_layers=cfg.layers, dropout=0.0,
                                  max_len=96, label_smoothing=cfg.label_smoothing)
    model = Transformer(model_cfg, stock=cfg.stock)
    opt = (torch.optim.Adam if cfg.stock else dlcore.optim.Adam)(model.parameters(), lr=1.0, betas=(0.9, 0.98),
                                                                 eps=1e-9)
    base = inverse_sqrt_schedule(cfg.d_model, cfg.warmup)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cfg.lr_scale * base(s))
    eval_numbers = held_out_numbers(cfg.eval_size)
    os.makedirs(cfg.out, exist_ok=True)
    progress = Progress("transformer", cfg.progress, cfg.steps)
    history, t0 = [], time.perf_counter()

    def exact_match() -> float:
        model.eval()
        src, src_len, _, _, _ = numbers_batch(eval_numbers)
        got = model.greedy_decode(src, src_len, BOS, EOS, max_len=80)
        model.train()
        return exact_match_rate(got, eval_numbers)

    for step in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        loss = model(*numbers_batch(training_numbers(cfg.batch, gen)))
        loss.backward()
        opt.step()
        schedule.step()
        progress.advance(step + 1, f"loss {loss.item():.3f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            acc = exact_match()
            history.append((step + 1, loss.item(), acc))
            progress.note(f"step {step + 1}: loss {loss.item():.3f}, held-out exact match {acc:.3f}")
    progress.close()
    torch.save(model.state_dict(), os.path.join(cfg.out, "model.pt"))
    plot_curves(os.path.join(cfg.out, "exact_match.png"), {"held-out exact match": ([h[0] for h in history],
                                                                                      [h[2] for h in history])},
                "step", "exact match", "numbers → words, Transformer (dlcore)")
    examples = [int(n) for n in eval_numbers[:3]]
    src, src_len, *_ = numbers_batch(torch.tensor(examples))
    shown = dict(zip(map(str, examples), decode_words(model.greedy_decode(src, src_len, BOS, EOS, 80))))
    summary = {"history": history, "exact_match": history[-1][2], "examples": shown,
               "seconds": time.perf_counter() - t0, "config": asdict(cfg)}
    write_summary(cfg.out, summary)
    return summary


def _train_run(args: argparse.Namespace) -> int:
    from dlcore.models._training import dataclass_from_args

    cfg = dataclass_from_args(TransformerTrainConfig, args)
    s = train(cfg)
    print(f"held-out exact match {s['exact_match']:.3f} (target {cfg.target}); e.g. {s['examples']}")
    print(f"wrote {cfg.out}/model.pt, exact_match.png, summary.json")
    return 0 if s["exact_match"] >= cfg.target else 1


registry.register("train", "transformer", help="encoder-decoder Transformer: numbers to English words",
                  run=_train_run)(dataclass_arguments(TransformerTrainConfig))


def profile(config: str = "small", batch: int = 64, steps: int = 3, autocast: bool = False,
            compile_stock: bool = False, device: Optional[str] = None) -> list[dict]:
    """Training tokens/s (source + target tokens) and peak memory on numbers → words batches, dlcore vs stock."""
    from dlcore.models._training import profile_training

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = TransformerConfig(**{**asdict(CONFIGS[config]), "src_vocab": SRC_VOCAB, "tgt_vocab": TGT_VOCAB,
                               "dropout": 0.0, "max_len": 96})
    torch.manual_seed(0)
    ours, twin = Transformer(cfg).to(dev), Transformer(cfg, stock=True).to(dev)
    twin.load_state_dict(ours.state_dict())
    batch_ = tuple(t.to(dev) for t in numbers_batch(torch.randint(0, 1_000_000, (batch,))))
    tokens = int(batch_[1].sum() + batch_[3].sum())
    return profile_training(ours, twin, batch_, tokens, dev, steps, autocast, compile_stock)


def _profile_arguments(p: argparse.ArgumentParser) -> None:
    from dlcore.models._training import add_profile_arguments

    p.add_argument("--config", choices=sorted(CONFIGS), default="small")
    add_profile_arguments(p, batch=64)


def _profile_run(args: argparse.Namespace) -> int:
    from dlcore.models._training import print_profile

    rows = profile(args.config, args.batch, args.steps, args.autocast, args.compile, args.device)
    print_profile(f"Transformer {args.config} on numbers → words, batch {args.batch}, "
                  f"{'bf16 autocast' if args.autocast else 'fp32'} (tokens = source + target)", rows)
    return 0


registry.register("profile", "transformer", help="Transformer training tokens/s and peak memory, dlcore vs stock",
                  run=_profile_run)(_profile_arguments)
