"""BERT (Devlin et al. 2018) on dlcore: a post-LayerNorm transformer encoder with learned positions and token types,
the masked-LM and next-sentence heads of pre-training, and a sequence-classification head.

dlcore path (default):
- every sublayer's residual add is fused into its LayerNorm (post-LN: LN(x + sublayer(x)) is exactly
  dlcore.functional.layer_norm(sublayer(x), residual=x));
- attention through dlcore's flash kernel; a right-padded batch passes its lengths (key_lengths), so the kernel
  skips the padded keys (the variable-length path); any other attention_mask is an additive key mask;
- the intermediate layer is a matmul followed by dlcore's fused bias + GELU (erf form, as BERT's);
- the masked-LM loss is dlcore's fused linear + cross-entropy on the tied word embeddings: the [tokens, vocab]
  logits never exist;
- the other linear layers are dlcore.nn.Linear: the skinny CPU GEMM for few rows of fp32 (one short sentence),
  torch's GEMM otherwise.
The stock twin (`stock=True`) is plain torch.nn/F with the same modules and state_dict keys, which follow Hugging
Face's BertForPreTraining (bert.embeddings…, bert.encoder.layer.N.attention.self.query…, cls.predictions…), so
its checkpoints load with load_state_dict (strict=False skips position_ids buffers).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dlcore import _eager, registry
from dlcore.models._training import dataclass_arguments, int_option, write_summary
from dlcore.nn import Linear
from dlcore.ops.attention import scaled_dot_product_attention
from dlcore.ops.bias_gelu import linear_gelu
from dlcore.ops.cross_entropy import cross_entropy, linear_cross_entropy
from dlcore.ops.layer_norm import layer_norm
from dlcore.patching import swap_classes


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    layer_norm_eps: float = 1e-12

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")


CONFIGS = {"bert-base": BertConfig(), "bert-large": BertConfig(hidden_size=1024, num_hidden_layers=24,
                                                               num_attention_heads=16, intermediate_size=4096),
           "tiny": BertConfig(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=512, max_position_embeddings=256)}


def _post_norm(ln: nn.LayerNorm, x: torch.Tensor, residual: torch.Tensor, stock: bool) -> torch.Tensor:
    """LayerNorm(x + residual), fused on the dlcore path."""
    if stock:
        return ln(x + residual)
    return layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps, residual=residual)[0]


class _Projection(nn.Module):
    """dense → dropout → LayerNorm(· + residual): HF's BertSelfOutput / BertOutput."""

    def __init__(self, n_in: int, config: BertConfig, stock: bool):
        super().__init__()
        self.stock = stock
        self.dense = nn.Linear(n_in, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, residual):
        return _post_norm(self.LayerNorm, self.dropout(self.dense(x)), residual, self.stock)


class _SelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.query, self.key, self.value = (nn.Linear(config.hidden_size, config.hidden_size) for _ in range(3))
        self.dropout_p = config.attention_probs_dropout_prob


class _Attention(nn.Module):
    def __init__(self, config: BertConfig, stock: bool):
        super().__init__()
        self.stock = stock
        setattr(self, "self", _SelfAttention(config))
        self.output = _Projection(config.hidden_size, config, stock)

    def forward(self, x, mask):
        """mask: ("lengths", int [B]) or ("keys", bool [B, T], True = attend)."""
        sa = getattr(self, "self")
        b, t, c = x.shape
        q, k, v = (lin(x).view(b, t, sa.heads, c // sa.heads).transpose(1, 2) for lin in (sa.query, sa.key, sa.value))
        p = sa.dropout_p if self.training else 0.0
        kind, value = mask
        if self.stock:
            keep = value[:, None, None, :] if kind == "keys" else \
                (torch.arange(t, device=x.device) < value[:, None])[:, None, None, :]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)
        elif kind == "lengths":
            y = scaled_dot_product_attention(q, k, v, dropout_p=p, key_lengths=value)
        else:
            y = scaled_dot_product_attention(q, k, v, dropout_p=p, key_padding_mask=~value)
        return self.output(y.transpose(1, 2).reshape(b, t, c), x)


class _Intermediate(nn.Module):
    def __init__(self, config: BertConfig, stock: bool):
        super().__init__()
        self.stock = stock
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x):
        if self.stock:
            return F.gelu(self.dense(x))
        return linear_gelu(x, self.dense.weight, self.dense.bias)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig, stock: bool):
        super().__init__()
        self.attention = _Attention(config, stock)
        self.intermediate = _Intermediate(config, stock)
        self.output = _Projection(config.intermediate_size, config, stock)

    def forward(self, x, mask):
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertModel(nn.Module):
    """Embeddings + encoder + pooler. forward(input_ids [B, T], token_type_ids, attention_mask (1 = token,
    0 = padding)) → (sequence output [B, T, C], pooled [B, C] = tanh(dense(first token)))."""

    def __init__(self, config: BertConfig, stock: bool = False):
        super().__init__()
        self.config, self.stock = config, stock
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embeddings.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.embeddings.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.embeddings.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.embeddings.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(config, stock) for _ in range(config.num_hidden_layers))
        self.pooler = nn.Module()
        self.pooler.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def _mask(self, attention_mask: Optional[torch.Tensor], input_ids: torch.Tensor):
        b, t = input_ids.shape
        if attention_mask is None:
            return "lengths", torch.full((b,), t, dtype=torch.int32, device=input_ids.device)
        if tuple(attention_mask.shape) != (b, t):
            raise ValueError(f"attention_mask must have input_ids' shape {(b, t)}, got {tuple(attention_mask.shape)}")
        if attention_mask.device != input_ids.device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but input_ids on {input_ids.device}")
        keep = attention_mask.bool() if attention_mask.dtype != torch.bool else attention_mask
        if _eager.in_transform():  # torch.func transforms: a per-key mask, which needs no value read
            return "keys", keep
        lengths = keep.sum(1)
        if bool((lengths == 0).any()):
            raise ValueError("attention_mask leaves a sequence with no token")
        if torch.equal(keep, torch.arange(t, device=keep.device) < lengths[:, None]):
            return "lengths", lengths.to(torch.int32)  # right padding: the variable-length path
        return "keys", keep

    def forward(self, input_ids, token_type_ids=None, attention_mask=None):
        cfg = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise TypeError("input_ids must be an integer tensor [batch, length]")
        b, t = input_ids.shape
        if t > cfg.max_position_embeddings:
            raise ValueError(f"sequence of {t} tokens is over the positional limit max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        for name, ids, n in (("input_ids", input_ids, cfg.vocab_size), ("token_type_ids", token_type_ids,
                                                                          cfg.type_vocab_size)):
            if ids is None or not ids.numel():
                continue
            if tuple(ids.shape) != (b, t):
                raise ValueError(f"{name} must have shape {(b, t)}, got {tuple(ids.shape)}")
            if not _eager.values_known(ids):  # (torch.func transforms: values cannot be read)
                continue
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= n:
                raise IndexError(f"{name} holds {lo if lo < 0 else hi}, out of range for {n} entries")
        mask = self._mask(attention_mask, input_ids)
        e = self.embeddings
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        pos = e.position_embeddings(torch.arange(t, device=input_ids.device))
        x = e.dropout(_post_norm(e.LayerNorm, e.word_embeddings(input_ids), pos + e.token_type_embeddings(types),
                                 self.stock))
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x, torch.tanh(self.pooler.dense(x[:, 0]))


class BertForPreTraining(nn.Module):
    """BERT with the masked-LM head (dense → GELU → LayerNorm → tied decoder + bias) and the next-sentence head.
    forward(..., mlm_labels [B, T] (-100 = not predicted), nsp_labels [B]) → the summed loss; without labels →
    (MLM logits [B, T, vocab], NSP logits [B, 2])."""

    def __init__(self, config: BertConfig = BertConfig(), stock: bool = False):
        super().__init__()
        self.config, self.stock = config, stock
        self.bert = BertModel(config, stock)
        self.cls = nn.Module()
        self.cls.predictions = nn.Module()
        self.cls.predictions.transform = nn.Module()
        self.cls.predictions.transform.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.cls.predictions.transform.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.cls.predictions.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight  # tied
        self.cls.predictions.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.cls.seq_relationship = nn.Linear(config.hidden_size, 2)
        self.apply(_init_weights)
        if not stock:
            swap_classes(self, {nn.Linear: Linear})

    def _transform(self, x):
        tr = self.cls.predictions.transform
        h = F.gelu(tr.dense(x)) if self.stock else linear_gelu(x, tr.dense.weight, tr.dense.bias)
        ln = tr.LayerNorm
        return ln(h) if self.stock else layer_norm(h, ln.normalized_shape, ln.weight, ln.bias, ln.eps)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, mlm_labels=None, nsp_labels=None):
        seq, pooled = self.bert(input_ids, token_type_ids, attention_mask)
        nsp_logits = self.cls.seq_relationship(pooled)
        pred = self.cls.predictions
        if mlm_labels is None:
            return F.linear(self._transform(seq), pred.decoder.weight, pred.bias), nsp_logits
        if tuple(mlm_labels.shape) != tuple(input_ids.shape):
            raise ValueError(f"mlm_labels must have input_ids' shape {tuple(input_ids.shape)}")
        rows = (mlm_labels != -100).reshape(-1)
        h = self._transform(seq).reshape(-1, seq.shape[-1])[rows]  # only the masked positions reach the head
        labels = mlm_labels.reshape(-1)[rows]
        if self.stock:
            loss = F.cross_entropy(F.linear(h, pred.decoder.weight, pred.bias), labels)
        else:
            loss = linear_cross_entropy(h, pred.decoder.weight, labels, pred.bias)
        if nsp_labels is not None:
            loss = loss + (F.cross_entropy if self.stock else cross_entropy)(nsp_logits, nsp_labels)
        return loss


class BertForSequenceClassification(nn.Module):
    """BERT → pooled first token → dropout → classifier. forward(..., labels [B]) → loss, else logits [B, labels]."""

    def __init__(self, config: BertConfig = BertConfig(), num_labels: int = 2, stock: bool = False):
        super().__init__()
        self.stock = stock
        self.bert = BertModel(config, stock)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        self.apply(_init_weights)
        if not stock:
            swap_classes(self, {nn.Linear: Linear})

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, labels=None):
        logits = self.classifier(self.dropout(self.bert(input_ids, token_type_ids, attention_mask)[1]))
        if labels is None:
            return logits
        return (F.cross_entropy if self.stock else cross_entropy)(logits, labels)


def _init_weights(module):
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------------- training
# Byte-level vocabulary: bytes 0-255, then the special tokens.
PAD, CLS, SEP, MASK = 256, 257, 258, 259
BYTE_VOCAB = 260


@dataclass
class BertTrainConfig:
    """`dlcore train bert`: masked-LM + next-sentence pre-training on the shipped text, then fine-tuning on a
    generated classification task (strings over a–e: are there more a's than b's?) with right-padded batches."""
    text: str = ""  # default: the GPT corpus, models/data/shakespeare.txt
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    segment: int = 31  # bytes per sentence: a pair is [CLS] A [SEP] B [SEP]
    batch: int = 32
    pretrain_steps: int = 300
    finetune_steps: int = 300
    lr: float = 1e-3
    seed: int = 0
    stock: bool = False
    out: str = "runs/bert"
    progress: bool = True


def _pretrain_batch(data: torch.Tensor, cfg: BertTrainConfig, gen: torch.Generator):
    """[CLS] A [SEP] B [SEP], B following A half the time; 15% of the bytes are predicted (80% [MASK], 10% a random
    byte, 10% unchanged)."""
    n, s = cfg.batch, cfg.segment
    starts = torch.randint(0, len(data) - 2 * s, (n,), generator=gen)
    follows = torch.rand(n, generator=gen) < 0.5
    other = torch.randint(0, len(data) - s, (n,), generator=gen)
    b_starts = torch.where(follows, starts + s, other)
    a = torch.stack([data[i:i + s] for i in starts.tolist()])
    b = torch.stack([data[i:i + s] for i in b_starts.tolist()])
    col = lambda v: torch.full((n, 1), v)  # noqa: E731
    ids = torch.cat([col(CLS), a, col(SEP), b, col(SEP)], 1)
    types = torch.cat([torch.zeros(n, s + 2, dtype=torch.long), torch.ones(n, s + 1, dtype=torch.long)], 1)
    special = (ids >= 256)
    chosen = (torch.rand(ids.shape, generator=gen) < 0.15) & ~special
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=gen)
    ids = torch.where(chosen & (roll < 0.8), torch.full_like(ids, MASK), ids)
    ids = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), torch.randint(0, 256, ids.shape, generator=gen), ids)
    return ids, types, None, labels, follows.long()


def _classification_batch(cfg: BertTrainConfig, gen: torch.Generator, batch: int):
    """Strings of a–e, lengths 4–40, right-padded; label 1 when 'a' occurs more often than 'b' (ties: 0)."""
    length = 42
    lengths = torch.randint(4, 41, (batch,), generator=gen)
    letters = torch.randint(ord("a"), ord("e") + 1, (batch, length - 2), generator=gen)
    body_mask = torch.arange(length - 2) < lengths[:, None]
    body = torch.where(body_mask, letters, torch.full_like(letters, PAD))
    labels = ((body == ord("a")).sum(1) > (body == ord("b")).sum(1)).long()
    ids = torch.cat([torch.full((batch, 1), CLS), body, torch.full((batch, 1), PAD)], 1)
    ids[torch.arange(batch), lengths + 1] = SEP
    mask = (torch.arange(length) < (lengths + 2)[:, None]).long()
    return ids, None, mask, labels


def train(cfg: BertTrainConfig) -> dict:
    """Pre-train, then fine-tune; writes loss.csv, loss.png, pretrained.pt, classifier.pt, summary.json."""
    import dlcore.optim
    from dlcore.models._training import Progress, plot_curves

    text = cfg.text or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "shakespeare.txt")
    with open(text, "rb") as f:
        data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model_cfg = BertConfig(vocab_size=BYTE_VOCAB, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                           num_attention_heads=cfg.num_attention_heads, intermediate_size=4 * cfg.hidden_size,
                           max_position_embeddings=max(2 * cfg.segment + 3, 64))
    optimizer = torch.optim.AdamW if cfg.stock else dlcore.optim.AdamW
    os.makedirs(cfg.out, exist_ok=True)
    t0 = time.perf_counter()
    history = []

    pre = BertForPreTraining(model_cfg, stock=cfg.stock)
    opt = optimizer(pre.parameters(), lr=cfg.lr)
    progress = Progress("bert mlm", cfg.progress, cfg.pretrain_steps)
    for step in range(cfg.pretrain_steps):
        opt.zero_grad(set_to_none=True)
        loss = pre(*_pretrain_batch(data, cfg, gen))
        loss.backward()
        opt.step()
        history.append(("pretrain", step + 1, loss.item()))
        progress.advance(step + 1, f"MLM+NSP loss {loss.item():.3f}")
    progress.close()
    torch.save(pre.state_dict(), os.path.join(cfg.out, "pretrained.pt"))

    clf = BertForSequenceClassification(model_cfg, num_labels=2, stock=cfg.stock)
    clf.bert.load_state_dict(pre.bert.state_dict())
    opt = optimizer(clf.parameters(), lr=cfg.lr)
    progress = Progress("bert fine-tune", cfg.progress, cfg.finetune_steps)
    for step in range(cfg.finetune_steps):
        opt.zero_grad(set_to_none=True)
        loss = clf(*_classification_batch(cfg, gen, cfg.batch))
        loss.backward()
        opt.step()
        history.append(("finetune", step + 1, loss.item()))
        progress.advance(step + 1, f"loss {loss.item():.3f}")
    progress.close()
    clf.eval()
    with torch.no_grad():
        ids, types, mask, labels = _classification_batch(cfg, torch.Generator().manual_seed(10_000 + cfg.seed), 2000)
        accuracy = (clf(ids, types, mask).argmax(-1) == labels).float().mean().item()
        majority = max(labels.float().mean().item(), 1 - labels.float().mean().item())
    torch.save(clf.state_dict(), os.path.join(cfg.out, "classifier.pt"))
    with open(os.path.join(cfg.out, "loss.csv"), "w") as f:
        f.write("phase,step,loss\n" + "".join(f"{p},{s},{v:.5f}\n" for p, s, v in history))
    curves = {phase: ([s for p, s, _ in history if p == phase], [v for p, _, v in history if p == phase])
              for phase in ("pretrain", "finetune")}
    plot_curves(os.path.join(cfg.out, "loss.png"), curves, "step", "loss", "byte-level BERT (dlcore)")
    first = sum(v for p, _, v in history[:20] if p == "pretrain") / max(1, min(20, cfg.pretrain_steps))
    last = sum(v for p, _, v in history if p == "pretrain" and _ > cfg.pretrain_steps - 20) / max(
        1, min(20, cfg.pretrain_steps))
    summary = {"pretrain_loss_first20": first, "pretrain_loss_last20": last, "accuracy": accuracy,
               "majority_baseline": majority, "seconds": time.perf_counter() - t0, "config": asdict(cfg)}
    write_summary(cfg.out, summary)
    return summary


def _train_run(args: argparse.Namespace) -> int:
    from dlcore.models._training import dataclass_from_args

    cfg = dataclass_from_args(BertTrainConfig, args)
    s = train(cfg)
    print(f"pre-training loss {s['pretrain_loss_first20']:.3f} → {s['pretrain_loss_last20']:.3f}; fine-tuned "
          f"accuracy {s['accuracy']:.3f} (majority class {s['majority_baseline']:.3f})")
    print(f"wrote {cfg.out}/loss.csv, loss.png, pretrained.pt, classifier.pt, summary.json")
    return 0 if s["pretrain_loss_last20"] < s["pretrain_loss_first20"] and s["accuracy"] > s["majority_baseline"] \
        else 1


def profile(config: str = "bench-cpu", batch: int = 8, length: int = 128, steps: int = 3, autocast: bool = False,
            compile_stock: bool = False, device: Optional[str] = None) -> list[dict]:
    """Fine-tuning (classification) tokens/s and peak memory on right-padded batches, dlcore vs stock."""
    from dlcore.models._training import profile_training

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = PROFILE_CONFIGS[config]
    torch.manual_seed(0)
    ours = BertForSequenceClassification(cfg).to(dev)
    twin = BertForSequenceClassification(cfg, stock=True).to(dev)
    twin.load_state_dict(ours.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (batch, length), device=dev)
    lengths = torch.randint(length // 4, length + 1, (batch,), device=dev)
    mask = (torch.arange(length, device=dev) < lengths[:, None]).long()
    labels = torch.randint(0, 2, (batch,), device=dev)
    return profile_training(ours, twin, (ids, None, mask, labels), batch * length, dev, steps, autocast,
                            compile_stock)


PROFILE_CONFIGS = {**CONFIGS, "bench-cpu": BertConfig(num_hidden_layers=2)}


def _profile_arguments(p: argparse.ArgumentParser) -> None:
    from dlcore.models._training import add_profile_arguments

    p.add_argument("--config", choices=sorted(PROFILE_CONFIGS), default="bench-cpu")
    p.add_argument("--length", type=int_option("length"), default=128)
    add_profile_arguments(p, batch=8)


def _profile_run(args: argparse.Namespace) -> int:
    from dlcore.models._training import print_profile

    rows = profile(args.config, args.batch, args.length, args.steps, args.autocast, args.compile, args.device)
    print_profile(f"BERT {args.config} sequence classification, batch {args.batch} × {args.length} right-padded "
                  f"(lengths {args.length // 4}–{args.length}), {'bf16 autocast' if args.autocast else 'fp32'}", rows)
    return 0


registry.register("train", "bert", help="byte-level BERT: MLM+NSP pre-training on the shipped text, then "
                  "fine-tuning on a generated classification task", run=_train_run)(dataclass_arguments(BertTrainConfig))
registry.register("profile", "bert", help="BERT fine-tuning tokens/s and peak memory on padded batches, dlcore vs "
                  "stock", run=_profile_run)(_profile_arguments)
