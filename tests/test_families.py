"""BERT, RoBERTa and DistilBERT (random, small) through the engine against their HF forward; pruning on each."""
import pytest
import torch

from etformer import optimize
from etformer.models import encoder_linears
from etformer.pruning import PruningPlan
from etformer.pruning.recipe import hard_masks


def _model(kind):
    from transformers import (BertConfig, BertModel, DistilBertConfig, DistilBertModel, RobertaConfig,
                              RobertaModel)

    torch.manual_seed(0)
    if kind == "bert":
        return BertModel(BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, max_position_embeddings=40)).eval()
    if kind == "roberta":
        return RobertaModel(RobertaConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=128, max_position_embeddings=42, pad_token_id=1)).eval()
    return DistilBertModel(DistilBertConfig(vocab_size=120, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                            max_position_embeddings=40)).eval()


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("plan", [None, PruningPlan.uniform("tile", 0.5, (16, 16)), PruningPlan.attention_aware(0.5, (16, 16))])
def test_family_matches_hf(kind, plan):
    model = _model(kind)
    assert len(encoder_linears(model)) == 12
    if plan is not None:
        with torch.no_grad():
            for p, m in hard_masks(model, plan).values():
                p.mul_(m)
    enc = optimize(model, plan, dtype="float32", device="cpu", backend="reference")
    ids = torch.randint(5, 120, (3, 17))
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 15:] = 0
    ids[mask == 0] = model.config.pad_token_id or 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    y = enc(ids, mask).last_hidden_state
    keep = mask.bool()
    assert float((y[keep] - ref[keep]).norm() / ref[keep].norm()) < 1e-5
    if kind == "roberta":  # positions count from padding_idx + 1: at most max_position_embeddings - 2 tokens
        from etformer.errors import EtformerError

        with pytest.raises(EtformerError, match="exceeds"):
            enc(torch.randint(5, 120, (1, 41)))


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_task_head_takes_half_precision_hidden_states(kind, dtype):
    """The engine hands fp16 / bf16 hidden states to a head kept in fp32: apply_head casts them to the head's dtype
    and gives the logits the HF model gives from the same (rounded) hidden states."""
    from transformers import AutoModelForSequenceClassification

    from etformer.models import apply_head

    torch.manual_seed(0)
    cls = AutoModelForSequenceClassification.from_config(_model(kind).config).eval()
    ids = torch.randint(5, 100, (3, 9))
    with torch.no_grad():
        hidden = cls.base_model(input_ids=ids).last_hidden_state.to(dtype)
        got = apply_head(cls, hidden)
        want = apply_head(cls, hidden.float())
    assert got.dtype == torch.float32 and got.shape == (3, 2)
    torch.testing.assert_close(got, want)
