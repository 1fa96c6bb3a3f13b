"""Benchmark case for issue 5's BERT target: a sequence-classification fine-tuning step on right-padded batches
(lengths uniform in [T/4, T]), dlcore against the stock twin, eager and torch.compile'd (dlcore/bench/gpt.py's
training-step harness). GPU: BERT-base, batch 32, T 128, bf16 autocast (target ≥ 1.3× eager). CPU: a 2-layer
BERT-base-width model, batch 8, T 128, fp32 (no CPU target in the issue; measured for the record).
FLOPs: 6·tokens·12·layers·d² (matmuls, padded tokens included) + 4·layers·tokens·T·d·3 (attention)."""
from __future__ import annotations

import torch

from dlcore.bench.gpt import train_step_setup
from dlcore.bench.harness import Case


def cases(device: str) -> list[Case]:
    from dlcore.models.bert import BertConfig, BertForSequenceClassification

    on_gpu = device != "cpu"
    cfg = BertConfig() if on_gpu else BertConfig(num_hidden_layers=2)
    batch, length = (32, 128) if on_gpu else (8, 128)

    def make_pair():
        ours = BertForSequenceClassification(cfg, num_labels=2).to(device)
        stock = BertForSequenceClassification(cfg, num_labels=2, stock=True).to(device)
        stock.load_state_dict(ours.state_dict())
        return ours, stock

    def make_batch():
        ids = torch.randint(0, cfg.vocab_size, (batch, length), device=device)
        lengths = torch.randint(length // 4, length + 1, (batch,), device=device)
        mask = (torch.arange(length, device=device) < lengths[:, None]).long()
        return ids, None, mask, torch.randint(0, 2, (batch,), device=device)

    tokens = batch * length
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    flops = 6.0 * tokens * 12 * layers * d * d + 12.0 * layers * tokens * length * d
    label = (f"BERT {layers}L d{d} classification B{batch} T{length} right-padded "
             f"{'bf16 autocast' if on_gpu else 'fp32'} train step")
    return [Case("bert", label, device, train_step_setup(make_pair, make_batch, device, on_gpu, True), flops=flops,
                 baseline="torch eager", target=1.3 if on_gpu else None, quick=False)]
