"""BERT (dlcore.models.bert): the dlcore model and its stock twin share a state_dict (Hugging Face's key names)
and agree on pre-training loss, classification logits and every gradient, on padded batches (right padding takes
the variable-length path, other masks the key-mask path); padding does not change the real tokens' outputs; bad
input raises."""
import os
import time

import pytest
import torch

from dlcore.models.bert import BertConfig, BertForPreTraining, BertForSequenceClassification, BertModel
from dlcore.testing import max_error

SEED = int(os.environ.get("DLCORE_TEST_SEED", int(time.time() * 1000) % 2**31))
CFG = BertConfig(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
                 max_position_embeddings=40)


def _twins(cls, **kw):
    torch.manual_seed(SEED)
    ours = cls(CFG, stock=False, **kw).double()
    twin = cls(CFG, stock=True, **kw).double()
    twin.load_state_dict(ours.state_dict())
    return ours, twin


def _batch(gen, lengths, t):
    b = len(lengths)
    ids = torch.randint(0, CFG.vocab_size, (b, t), generator=gen)
    mask = (torch.arange(t) < torch.tensor(lengths)[:, None]).long()
    types = (torch.arange(t) >= t // 2).long().expand(b, t).contiguous()
    return ids, types, mask


@pytest.mark.parametrize("lengths,t", [([7], 7), ([5, 33, 1], 33), ([12, 3], 12)])
@pytest.mark.parametrize("shuffled_mask", [False, True])
def test_pretraining_matches_twin(lengths, t, shuffled_mask):
    ours, twin = _twins(BertForPreTraining)
    gen = torch.Generator().manual_seed(SEED)
    ids, types, mask = _batch(gen, lengths, t)
    if shuffled_mask:  # not right padding: the key-mask path
        mask = mask[:, torch.randperm(t, generator=gen)]
        mask[:, 0] = 1
    mlm = torch.where(torch.rand(ids.shape, generator=gen) < 0.3, ids, torch.full_like(ids, -100))
    mlm[0, 0] = ids[0, 0]
    nsp = torch.randint(0, 2, (len(lengths),), generator=gen)
    losses = [m(ids, types, mask, mlm, nsp) for m in (ours, twin)]
    assert abs(losses[0].item() - losses[1].item()) < 1e-10
    for loss in losses:
        loss.backward()
    for (name, p), q in zip(ours.named_parameters(), twin.parameters()):
        assert max_error(p.grad, q.grad) < 1e-9 * (1 + q.grad.abs().max().item()), name
    logits = [m(ids, types, mask) for m in (ours, twin)]
    assert max_error(logits[0][0], logits[1][0]) < 1e-9 and max_error(logits[0][1], logits[1][1]) < 1e-9


def test_classification_matches_twin_and_padding_is_invisible():
    ours, twin = _twins(BertForSequenceClassification, num_labels=3)
    gen = torch.Generator().manual_seed(SEED)
    ids, types, mask = _batch(gen, [9, 4, 1], 9)
    assert max_error(ours(ids, types, mask), twin(ids, types, mask)) < 1e-10
    alone = ours(ids[1:2, :4], types[1:2, :4])  # the second sequence without its padding
    assert max_error(ours(ids, types, mask)[1], alone[0]) < 1e-10
    labels = torch.tensor([0, 2, 1])
    assert abs(ours(ids, types, mask, labels).item() - twin(ids, types, mask, labels).item()) < 1e-10


def test_state_dict_uses_hugging_face_names():
    keys = set(BertForPreTraining(CFG).state_dict())
    for key in ("bert.embeddings.word_embeddings.weight", "bert.embeddings.LayerNorm.weight",
                "bert.encoder.layer.1.attention.self.query.weight", "bert.encoder.layer.0.attention.output.dense.bias",
                "bert.encoder.layer.0.attention.output.LayerNorm.weight", "bert.encoder.layer.0.intermediate.dense.weight",
                "bert.encoder.layer.0.output.LayerNorm.bias", "bert.pooler.dense.weight",
                "cls.predictions.transform.dense.weight", "cls.predictions.bias", "cls.predictions.decoder.weight",
                "cls.seq_relationship.weight"):
        assert key in keys, key


def test_bad_input():
    model = BertModel(CFG)
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(IndexError, match="input_ids holds 101"):
        model(torch.full((2, 5), 101))
    with pytest.raises(IndexError, match="token_type_ids holds 2"):
        model(ids, torch.full((2, 5), 2))
    with pytest.raises(ValueError, match="positional limit"):
        model(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have"):
        model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="no token"):
        model(ids, attention_mask=torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]))
    with pytest.raises(TypeError, match="input_ids"):
        model(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="multiple"):
        BertConfig(hidden_size=100, num_attention_heads=3)


def test_fp32_cpu_kernels_match_twin_on_padded_batch():
    """fp32 runs dlcore's C++ kernels (attention with key lengths, fused LayerNorm, bias+GELU, linear+CE)."""
    torch.manual_seed(SEED)
    ours, twin = BertForPreTraining(CFG), BertForPreTraining(CFG, stock=True)
    twin.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(SEED)
    ids, types, mask = _batch(gen, [20, 6, 13], 20)
    mlm = torch.where(torch.rand(ids.shape, generator=gen) < 0.3, ids, torch.full_like(ids, -100))
    mlm[0, 0] = ids[0, 0]
    losses = [m(ids, types, mask, mlm, torch.tensor([0, 1, 1])) for m in (ours, twin)]
    assert abs(losses[0].item() - losses[1].item()) < 1e-4
    for loss in losses:
        loss.backward()
    for (name, p), q in zip(ours.named_parameters(), twin.parameters()):
        assert max_error(p.grad, q.grad) < 1e-4 * (1 + q.grad.abs().max().item()), name


def test_train_bert_pretrains_and_fine_tunes(tmp_path):
    from dlcore.models.bert import BertTrainConfig, train

    s = train(BertTrainConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, batch=16,
                              pretrain_steps=40, finetune_steps=120, out=str(tmp_path), progress=False))
    assert s["pretrain_loss_last20"] < s["pretrain_loss_first20"]
    assert s["accuracy"] > s["majority_baseline"] + 0.05
    assert (tmp_path / "classifier.pt").exists() and (tmp_path / "loss.csv").exists()


def test_profile_bert_reports_both_variants():
    from dlcore.models import bert

    bert.PROFILE_CONFIGS["test-tiny"] = CFG
    try:
        rows = bert.profile("test-tiny", batch=2, length=16, steps=1)
    finally:
        del bert.PROFILE_CONFIGS["test-tiny"]
    assert [r["variant"] for r in rows] == ["dlcore", "torch eager", "torch eager + fused AdamW"] and all(r["tokens_per_s"] > 0 for r in rows)
