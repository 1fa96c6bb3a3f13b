"""GPT (Radford et al. 2018/2019) on dlcore, in GPT-2's layout: learned positions, pre-LayerNorm blocks, a final
LayerNorm, causal self-attention, GELU (tanh form) feed-forward, output layer tied to the token embedding.

dlcore path (default):
- each residual add is fused into the next LayerNorm (dlcore.functional.layer_norm(..., residual=)): one pass
  writes the new residual stream and its normalised copy;
- attention through dlcore's flash kernel (scaled_dot_product_attention, causal; a KV cache when generating);
- the first feed-forward matmul runs without its bias and dlcore's fused bias + GELU follows;
- the loss is dlcore's fused linear + cross-entropy on the tied embedding: the [tokens, vocab] logits never exist;
- the other linear layers are dlcore.nn.Linear: dlcore's skinny GEMM for few rows of fp32 on the CPU (decoding
  with generate(): GPT-2 124M 28–31 ms per token against the stock twin's 42–45 on the AMD VM), torch's GEMM
  otherwise.
The stock twin (`stock=True`) is plain torch.nn/F with the same modules and state_dict keys.

State-dict keys follow GPT-2's (transformer.wte/wpe/h.N.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.c_fc,mlp.c_proj}/
ln_f, lm_head); `load_gpt2_state_dict` also takes Hugging Face's GPT-2 checkpoints, whose Conv1D weights are
stored transposed and which carry causal-mask buffers.
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
from dlcore.ops.bias_gelu import linear_gelu
from dlcore.ops.cross_entropy import linear_cross_entropy
from dlcore.ops.layer_norm import layer_norm
from dlcore.patching import swap_classes


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    dropout: float = 0.0  # embedding, attention and residual dropout (GPT-2 trained with 0.1)
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")


# Named shapes: GPT-2 small, and the CPU benchmark shape of issue 5 (2 layers, context 512, vocabulary 8192).
CONFIGS = {
    "gpt2": GPTConfig(),
    "gpt2-medium": GPTConfig(n_embd=1024, n_layer=24, n_head=16),
    "bench-cpu": GPTConfig(vocab_size=8192, n_positions=512, n_layer=2),
    "tiny": GPTConfig(vocab_size=256, n_positions=256, n_embd=128, n_layer=4, n_head=4),
}

KVCache = list  # per layer: (keys, values) [B, H, T, D], or None before the first call


def _norm(x: torch.Tensor, ln: nn.LayerNorm, residual: Optional[torch.Tensor], stock: bool):
    """(LayerNorm(x + residual), x + residual): fused in one pass on the dlcore path."""
    if stock:
        h = x if residual is None else x + residual
        return ln(h), h
    if residual is None:
        return layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps), x
    return layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps, residual=residual)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, stock: bool):
        super().__init__()
        self.n_head, self.dropout, self.stock = config.n_head, config.dropout, stock
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: Optional[tuple] = None):
        """x [B, T, C] → ([B, T, C], (keys, values) including this call's). With a cache, the T new tokens attend
        to every cached token and causally among themselves (T = 1 when decoding, or a fresh prompt)."""
        b, t, c = x.shape
        q, k, v = self.c_attn(x).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4).unbind(0)
        if cache is not None:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        causal = t > 1  # top-left aligned masks: right for a prompt on an empty cache, and T = 1 needs none
        if causal and k.shape[2] != t:
            raise ValueError("a KV cache extends by one token at a time after the prompt")
        p = self.dropout if self.training else 0.0
        attend = F.scaled_dot_product_attention if self.stock else scaled_dot_product_attention
        y = attend(q, k, v, dropout_p=p, is_causal=causal)
        y = self.c_proj(y.transpose(1, 2).reshape(b, t, c))
        return self.resid_drop(y), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, stock: bool):
        super().__init__()
        self.stock = stock
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.stock:
            h = F.gelu(self.c_fc(x), approximate="tanh")
        else:
            h = linear_gelu(x, self.c_fc.weight, self.c_fc.bias, approximate="tanh")
        return self.drop(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, stock: bool):
        super().__init__()
        self.stock = stock
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, stock)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config, stock)

    def forward(self, x, pending: Optional[torch.Tensor], cache=None):
        """x: the residual stream without `pending`, the previous block's output still to be added (fused into
        this block's first LayerNorm). Returns (stream, this block's MLP output still to be added, new cache)."""
        y, x = _norm(x, self.ln_1, pending, self.stock)
        a, cache = self.attn(y, cache)
        y, x = _norm(x, self.ln_2, a, self.stock)
        return x, self.mlp(y), cache


class GPT(nn.Module):
    """GPT-2 layout language model. forward(idx [B, T] int64) → logits [B, T, vocab]; with targets [B, T]
    (ignore_index -100) → the mean cross-entropy, the logits never formed on the dlcore path."""

    def __init__(self, config: GPTConfig = GPTConfig(), stock: bool = False):
        super().__init__()
        self.config, self.stock = config, stock
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, stock) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/√(2·layers)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * config.n_layer))
        if not stock:
            swap_classes(self, {nn.Linear: Linear})

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _check(self, idx: torch.Tensor, start: int) -> None:
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32) or idx.dim() != 2:
            raise TypeError(f"idx must be an int64 tensor [batch, time], got "
                            f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}")
        if start + idx.shape[1] > self.config.n_positions:
            raise ValueError(f"sequence of {start + idx.shape[1]} tokens is over the positional limit "
                             f"n_positions={self.config.n_positions}")
        if idx.numel() and _eager.values_known(idx):
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise IndexError(f"token id {lo if lo < 0 else hi} is out of range for vocab_size="
                                 f"{self.config.vocab_size}")

    def hidden_states(self, idx: torch.Tensor, cache: Optional[KVCache] = None):
        """The final LayerNorm's output [B, T, C] and the updated cache (when one is given)."""
        start = 0 if not cache or cache[0] is None else cache[0][0].shape[2]
        self._check(idx, start)
        pos = torch.arange(start, start + idx.shape[1], device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        pending = None
        for i, block in enumerate(self.transformer.h):
            x, pending, layer_cache = block(x, pending, None if cache is None else cache[i])
            if cache is not None:
                cache[i] = layer_cache
        y, _ = _norm(x, self.transformer.ln_f, pending, self.stock)
        return y, cache

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None):
        y, _ = self.hidden_states(idx)
        if targets is None:
            return self.lm_head(y)
        if targets.shape != idx.shape:
            raise ValueError(f"targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
        if self.stock:
            return F.cross_entropy(self.lm_head(y).flatten(0, 1), targets.flatten())
        return linear_cross_entropy(y, self.lm_head.weight, targets)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sample `max_new_tokens` tokens after the prompt idx [B, T] with a KV cache (the prompt is run once,
        then one token per step). temperature 0 is greedy; top_k keeps the k most likely tokens."""
        if temperature < 0:
            raise ValueError(f"temperature must be ≥ 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be ≥ 1, got {top_k}")
        if idx.shape[1] + max_new_tokens > self.config.n_positions:
            raise ValueError(f"prompt {idx.shape[1]} + {max_new_tokens} new tokens is over n_positions="
                             f"{self.config.n_positions}")
        cache: KVCache = [None] * self.config.n_layer
        out, step = idx, idx
        for _ in range(max_new_tokens):
            y, cache = self.hidden_states(step, cache)
            logits = self.lm_head(y[:, -1]).float()
            if temperature == 0:
                step = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                step = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            out = torch.cat([out, step], 1)
        return out

    def load_gpt2_state_dict(self, state_dict: dict) -> None:
        """Load GPT-2 weights under GPT-2's key names, either ours (nn.Linear layout) or Hugging Face's (Conv1D
        weights [in, out], transposed here; attn.bias / attn.masked_bias mask buffers dropped)."""
        ours = self.state_dict()
        # Conv1D checkpoints are recognised by c_attn ([C, 3C] there, [3C, C] here: never ambiguous); then every
        # Conv1D weight is transposed, the square c_proj of attention included.
        conv1d = any(k.endswith("c_attn.weight") and k in ours and v.shape != ours[k].shape
                     and v.t().shape == ours[k].shape for k, v in state_dict.items())
        converted = {}
        for key, value in state_dict.items():
            if key.endswith(("attn.bias", "attn.masked_bias")) and key not in ours:
                continue
            if conv1d and key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                value = value.t()
            converted[key] = value
        if "lm_head.weight" not in converted and "transformer.wte.weight" in converted:
            converted["lm_head.weight"] = converted["transformer.wte.weight"]
        self.load_state_dict(converted)


# ---------------------------------------------------------------------------------------------------- training
TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "shakespeare.txt")


@dataclass
class GPTTrainConfig:
    """`dlcore train gpt`: a byte-level GPT on the shipped Shakespeare text (models/data/)."""
    text: str = TEXT
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    context: int = 128
    batch: int = 16
    steps: int = 600
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.1
    eval_every: int = 100
    sample_chars: int = 200
    seed: int = 0
    stock: bool = False
    out: str = "runs/gpt"
    resume: bool = False
    progress: bool = True


def _batches(data: torch.Tensor, cfg: GPTTrainConfig, gen: torch.Generator):
    starts = torch.randint(0, len(data) - cfg.context - 1, (cfg.batch,), generator=gen)
    rows = torch.stack([data[s:s + cfg.context + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


def train(cfg: GPTTrainConfig) -> dict:
    """Train; writes loss.csv, loss.png, checkpoint.pt (resume with resume=True) and summary.json to cfg.out.
    Under torchrun (WORLD_SIZE > 1) each process trains a DistributedDataParallel replica on its own batches
    (gloo on the CPU); rank 0 evaluates, prints and writes."""
    import torch.distributed as dist

    import dlcore.optim
    from dlcore.models._training import Progress, plot_curves

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0

    with open(cfg.text, "rb") as f:
        data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    torch.manual_seed(cfg.seed)
    model_cfg = GPTConfig(vocab_size=256, n_positions=cfg.context, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                          n_head=cfg.n_head)
    model = GPT(model_cfg, stock=cfg.stock)  # same seed on every rank: identical replicas
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = (torch.optim.AdamW if cfg.stock else dlcore.optim.AdamW)(groups, lr=cfg.lr, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    history, start = [], 0
    if cfg.resume and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ckpt["model"]), opt.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        history, start = ckpt["history"], ckpt["step"]
    gen = torch.Generator().manual_seed(cfg.seed + start + 7919 * rank)  # each rank its own batches
    progress = Progress("gpt", cfg.progress and rank == 0, cfg.steps, start)
    t0 = time.perf_counter()

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        g = torch.Generator().manual_seed(1234)
        loss = sum(model(*_batches(val_data, cfg, g)).item() for _ in range(8)) / 8
        model.train()
        return loss

    def sample() -> str:
        model.eval()
        out = model.generate(torch.tensor([[10]]), cfg.sample_chars - 1 if cfg.sample_chars < cfg.context
                             else cfg.context - 1, temperature=0.8, top_k=40,
                             generator=torch.Generator().manual_seed(cfg.seed))
        model.train()
        return bytes(out[0].tolist()).decode("ascii", errors="replace")

    train_loss = float("nan")
    for step in range(start, cfg.steps):
        x, y = _batches(train_data, cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss = net(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        train_loss = loss.item()
        progress.advance(step + 1, f"loss {train_loss:.3f}")
        if rank == 0 and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            val = evaluate()
            history.append((step + 1, train_loss, val))
            progress.note(f"step {step + 1}: train loss {train_loss:.3f}, val loss {val:.3f}")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "schedule":
                        schedule.state_dict(), "history": history, "step": step + 1, "config": asdict(cfg)},
                       ckpt_path)
    progress.close()
    agree = True
    if world > 1:  # the replicas must hold the same weights after training
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        agree = all(torch.equal(gathered[0], g) for g in gathered)
        if rank != 0:
            return {"history": history, "replicas_agree": agree, "world_size": world}
    text = sample()
    with open(os.path.join(cfg.out, "loss.csv"), "w") as f:
        f.write("step,train_loss,val_loss\n" + "".join(f"{s},{a:.5f},{b:.5f}\n" for s, a, b in history))
    if history:
        steps = [h[0] for h in history]
        plot_curves(os.path.join(cfg.out, "loss.png"), {"train": (steps, [h[1] for h in history]),
                                                        "validation": (steps, [h[2] for h in history])},
                    "step", "cross-entropy (nats/byte)", f"byte-level GPT on {os.path.basename(cfg.text)}")
    summary = {"history": history, "sample": text, "seconds": time.perf_counter() - t0, "world_size": world,
               "replicas_agree": agree, "config": asdict(cfg)}
    write_summary(cfg.out, summary)
    return summary


def _train_run(args: argparse.Namespace) -> int:
    from dlcore.models._training import dataclass_from_args

    cfg = dataclass_from_args(GPTTrainConfig, args)
    summary = train(cfg)
    if "sample" not in summary:  # a torchrun worker other than rank 0
        return 0 if summary["replicas_agree"] else 1
    first, last = summary["history"][0], summary["history"][-1]
    print(f"val loss {first[2]:.3f} (step {first[0]}) → {last[2]:.3f} (step {last[0]}); sample:\n{summary['sample']}")
    print(f"wrote {cfg.out}/loss.csv, loss.png, checkpoint.pt, summary.json")
    return 0 if last[2] < first[2] and summary["replicas_agree"] else 1


registry.register("train", "gpt", help="byte-level GPT on the shipped Shakespeare text", run=_train_run)(dataclass_arguments(GPTTrainConfig))


# ---------------------------------------------------------------------------------------------------- profiling
def profile(config: str = "bench-cpu", batch: int = 4, steps: int = 3, autocast: bool = False,
            compile_stock: bool = False, device: Optional[str] = None) -> list[dict]:
    """Training tokens/s (forward, backward, AdamW step) and peak memory, dlcore vs its stock twin (and the
    torch.compile'd twin), same run: dlcore.models._training.profile_training; then generated tokens/s of
    generate() on one sequence (a prompt of up to 16 tokens, greedy, KV cache), dlcore vs the stock twin."""
    from dlcore.models._training import EAGER_INFERENCE, profile_inference, profile_training

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = CONFIGS[config]
    torch.manual_seed(0)
    ours = GPT(cfg).to(dev)
    twin = GPT(cfg, stock=True).to(dev)
    twin.load_state_dict(ours.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.n_positions), device=dev)
    targets = torch.randint(0, cfg.vocab_size, (batch, cfg.n_positions), device=dev)
    rows = profile_training(ours, twin, (idx, targets), batch * cfg.n_positions, dev, steps, autocast,
                            compile_stock)
    length = min(16, cfg.n_positions // 2)
    prompt, new = idx[:1, :length], min(32, cfg.n_positions - length)
    ours.eval()
    twin.eval()

    def generating(model):
        return lambda p: model.generate(p, new, temperature=0)

    return rows + profile_inference({"dlcore generate (B1)": generating(ours), EAGER_INFERENCE: generating(twin)},
                                    prompt, new, dev, steps, autocast)


def _profile_arguments(p: argparse.ArgumentParser) -> None:
    from dlcore.models._training import add_profile_arguments

    p.add_argument("--config", choices=sorted(CONFIGS), default="bench-cpu")
    add_profile_arguments(p, batch=4)


def _profile_run(args: argparse.Namespace) -> int:
    from dlcore.models._training import print_profile

    rows = profile(args.config, args.batch, args.steps, args.autocast, args.compile, args.device)
    cfg = CONFIGS[args.config]
    print_profile(f"GPT {args.config}: {cfg.n_layer} layers, d {cfg.n_embd}, vocab {cfg.vocab_size}, batch "
                  f"{args.batch} × {cfg.n_positions}, {'bf16 autocast' if args.autocast else 'fp32'}, training step "
                  "with AdamW; then generate() of one sequence (tokens/s = generated tokens)", rows)
    return 0


registry.register("profile", "gpt", help="GPT training tokens/s and peak memory, and generate() tokens/s, dlcore "
                  "vs stock",
                  run=_profile_run)(_profile_arguments)
