import os

import pytest
import torch

GLUE = os.environ.get("GLUE_DIR") or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "glue")


@pytest.fixture(scope="session")
def glue_dir():
    if not os.path.isdir(GLUE):
        pytest.skip("GLUE data not found: set GLUE_DIR")
    return GLUE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_bert(layers=2, hidden=64, heads=4, inter=128, seed=0, positions=64, **kw):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=inter, max_position_embeddings=positions, **kw)
    return BertModel(cfg).eval()
