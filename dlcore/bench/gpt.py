"""Benchmark cases for issue 5's model-level targets: one training step (forward, backward, AdamW step) of a
dlcore model (fused ops + dlcore.optim.AdamW) against its stock twin (torch.nn + torch.optim.AdamW), eager and
torch.compile'd (the model; the optimizer step stays eager in both), in the same run.

GPT, CPU: the GPT-2-shaped model of the issue (d 768, 12 heads, 2 layers, context 512, batch 4, vocabulary 8192),
fp32 and under bf16 autocast. GPU: GPT-2 small (124M), batch 8, context 1024, bf16 autocast. Also (no target)
GPT-2 124M generate() of one sequence, dlcore's model against its stock twin.
FLOPs: 6·tokens·(12·layers·d² + vocab·d) for the matmuls plus 6·layers·tokens·T·d for causal attention."""
from __future__ import annotations

import copy
from typing import Callable, Optional

import torch

from dlcore.bench.harness import DLCORE, Case


def train_step_setup(make_pair: Callable[[], tuple], make_batch: Callable[[], tuple], device: str, autocast: bool,
                     compile_stock: bool, optimizer: Optional[Callable] = None):
    """setup(n_sets) for a training-step case: make_pair() → (dlcore model, stock twin with the same weights) on
    `device`; make_batch() → the model's positional inputs, ending with its labels (the model returns the loss).
    The optimizers: dlcore.optim.AdamW for dlcore's model, torch.optim.AdamW for the twins, or `optimizer(params)`
    for every variant (to time the models alone)."""
    def setup(n_sets: int):
        import dlcore.optim

        torch.manual_seed(0)
        ours, stock = make_pair()
        data = [make_batch() for _ in range(n_sets)]
        state = {"i": 0}

        def variant(model, optimizer):
            def step():
                inputs = data[state["i"] % n_sets]
                state["i"] += 1
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
                    loss = model(*inputs)
                loss.backward()
                optimizer.step()
                return loss
            return step

        ours_opt = optimizer or (lambda params: dlcore.optim.AdamW(params, lr=1e-4))
        stock_opt = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-4))
        variants = {DLCORE: variant(ours, ours_opt(ours.parameters())),
                    "torch eager": variant(stock, stock_opt(stock.parameters()))}
        if compile_stock:
            twin = copy.deepcopy(stock)
            variants["torch.compile"] = variant(torch.compile(twin), stock_opt(twin.parameters()))
        return variants

    return setup


def _flops(cfg, batch: int, length: int) -> float:
    tokens = batch * length
    d, layers = cfg.n_embd, cfg.n_layer
    return 6.0 * tokens * (12 * layers * d * d + cfg.vocab_size * d) + 6.0 * layers * tokens * length * d


def _generate_case(device: str, prompt: int = 16, new_tokens: int = 32) -> Case:
    """GPT-2 124M generate(): greedy decoding of one sequence with the KV cache, dlcore's model against its stock
    twin (eval, no_grad). Each step streams every weight once: bytes = the weights' size per new token."""
    from dlcore.models.gpt import CONFIGS, GPT

    cfg = CONFIGS["gpt2"]
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    per_token = 12 * cfg.n_layer * cfg.n_embd ** 2 + cfg.vocab_size * cfg.n_embd  # multiply-adds ≈ weights read

    def setup(n_sets: int):
        torch.manual_seed(0)
        ours = GPT(cfg).to(device, dtype).eval()
        stock = GPT(cfg, stock=True).to(device, dtype).eval()
        stock.load_state_dict(ours.state_dict())
        prompts = [torch.randint(0, cfg.vocab_size, (1, prompt), device=device) for _ in range(n_sets)]
        state = {"i": 0}

        def variant(model):
            def call():
                state["i"] += 1
                return model.generate(prompts[state["i"] % n_sets], new_tokens, temperature=0)
            return call

        return {DLCORE: variant(ours), "torch eager": variant(stock)}

    return Case("gpt", f"GPT gpt2 (124M) generate B1, {prompt}-token prompt + {new_tokens} tokens, KV cache, "
                f"{str(dtype)[6:]}", device, setup, bytes=per_token * new_tokens * (4 if device == "cpu" else 2),
                flops=2.0 * per_token * new_tokens, baseline="torch eager", quick=False)


def cases(device: str) -> list[Case]:
    from dlcore.models.gpt import CONFIGS, GPT

    if device == "cpu":
        runs = [("bench-cpu", 4, False, 1.5), ("bench-cpu", 4, True, 1.5)]
    else:
        runs = [("gpt2", 8, True, 1.2)]
    out = []
    for name, batch, autocast, target in runs:
        cfg = CONFIGS[name]

        def make_pair(cfg=cfg):
            ours, stock = GPT(cfg).to(device), GPT(cfg, stock=True).to(device)
            stock.load_state_dict(ours.state_dict())
            return ours, stock

        def make_batch(cfg=cfg, batch=batch):
            return tuple(torch.randint(0, cfg.vocab_size, (batch, cfg.n_positions), device=device) for _ in range(2))

        label = (f"GPT {name} ({cfg.n_layer}L d{cfg.n_embd} V{cfg.vocab_size}) B{batch} T{cfg.n_positions} "
                 f"{'bf16 autocast' if autocast else 'fp32'} train step")
        out.append(Case("gpt", label, device, train_step_setup(make_pair, make_batch, device, autocast, True),
                        flops=_flops(cfg, batch, cfg.n_positions), baseline="torch eager", target=target,
                        quick=False, notes="issue 5: also ≥ 1.05× (CPU) / ≥ 1.0× (GPU) against torch.compile"))
    return out + [_generate_case(device)]
