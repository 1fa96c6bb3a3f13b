"""Benchmark cases for issue 5's model-level targets: one GPT training step (forward, backward, AdamW step).

CPU: the GPT-2-shaped model of the issue (d 768, 12 heads, 2 layers, context 512, batch 4, vocabulary 8192), fp32
and under bf16 autocast. dlcore (fused ops + dlcore.optim.AdamW) against the stock twin (torch.nn + torch.optim.AdamW)
eager and torch.compile'd (the model; the optimizer step stays eager in both).
GPU: GPT-2 small (124M), batch 8, context 1024, bf16 autocast.
FLOPs: 6·tokens·(12·layers·d² + vocab·d) for the matmuls plus 6·layers·tokens·T·d for causal attention."""
from __future__ import annotations

import copy

import torch

from dlcore.bench.harness import DLCORE, Case


def _flops(cfg, batch: int, length: int) -> float:
    tokens = batch * length
    d, layers = cfg.n_embd, cfg.n_layer
    return 6.0 * tokens * (12 * layers * d * d + cfg.vocab_size * d) + 6.0 * layers * tokens * length * d


def _setup(config_name: str, batch: int, device: str, autocast: bool, compile_stock: bool):
    def setup(n_sets: int):
        import dlcore.optim
        from dlcore.models.gpt import CONFIGS, GPT

        cfg = CONFIGS[config_name]
        length = cfg.n_positions
        torch.manual_seed(0)
        ours = GPT(cfg).to(device)
        stock = GPT(cfg, stock=True).to(device)
        stock.load_state_dict(ours.state_dict())
        data = [(torch.randint(0, cfg.vocab_size, (batch, length), device=device),
                 torch.randint(0, cfg.vocab_size, (batch, length), device=device)) for _ in range(n_sets)]
        state = {"i": 0}

        def variant(model, optimizer):
            def step():
                idx, targets = data[state["i"] % n_sets]
                state["i"] += 1
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
                    loss = model(idx, targets)
                loss.backward()
                optimizer.step()
                return loss
            return step

        variants = {DLCORE: variant(ours, dlcore.optim.AdamW(ours.parameters(), lr=1e-4)),
                    "torch eager": variant(stock, torch.optim.AdamW(stock.parameters(), lr=1e-4))}
        if compile_stock:
            twin = copy.deepcopy(stock)
            variants["torch.compile"] = variant(torch.compile(twin), torch.optim.AdamW(twin.parameters(), lr=1e-4))
        return variants

    return setup


def cases(device: str) -> list[Case]:
    from dlcore.models.gpt import CONFIGS

    if device == "cpu":
        runs = [("bench-cpu", 4, False, 1.5), ("bench-cpu", 4, True, 1.5)]
    else:
        runs = [("gpt2", 8, True, 1.2)]
    out = []
    for name, batch, autocast, target in runs:
        cfg = CONFIGS[name]
        label = (f"GPT {name} ({cfg.n_layer}L d{cfg.n_embd} V{cfg.vocab_size}) B{batch} T{cfg.n_positions} "
                 f"{'bf16 autocast' if autocast else 'fp32'} train step")
        out.append(Case("gpt", label, device, _setup(name, batch, device, autocast, compile_stock=True),
                        flops=_flops(cfg, batch, cfg.n_positions), baseline="torch eager", target=target,
                        quick=False, notes="issue 5: also ≥ 1.05× (CPU) / ≥ 1.0× (GPU) against torch.compile"))
    return out
