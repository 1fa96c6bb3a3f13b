"""BERT (Devlin et al. 2018) on dlcore: a post-LayerNorm transformer encoder with learned positions and token types,
the masked-LM and next-sentence heads of pre-training, and a sequence-classification head.

dlcore path (default):
- every sublayer's residual add is fused into its LayerNorm (post-LN: LN(x + sublayer(x)) is exactly
  dlcore.functional.layer_norm(sublayer(x), residual=x));
- attention through dlcore's flash kernel; a right-padded batch passes its lengths (key_lengths), so the kernel
  skips the padded keys (the variable-length path); any other attention_mask is an additive key mask;
- the intermediate layer is a matmul followed by dlcore's fused bias + GELU (erf form, as BERT's);
- the masked-LM loss is dlcore's fused linear + cross-entropy on the tied word embeddings: the [tokens, vocab]
  logits never exist.
The stock twin (`stock=True`) is plain torch.nn/F with the same modules and state_dict keys, which follow Hugging
Face's BertForPreTraining (bert.embeddings…, bert.encoder.layer.N.attention.self.query…, cls.predictions…), so
its checkpoints load with load_state_dict (strict=False skips position_ids buffers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dlcore.ops.attention import scaled_dot_product_attention
from dlcore.ops.bias_gelu import linear_gelu
from dlcore.ops.cross_entropy import cross_entropy, linear_cross_entropy
from dlcore.ops.layer_norm import layer_norm


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
