"""A ``transformers`` BERT through the CLI: ``model=custom model._target_=hf_bert.bert``.

Built from a config with random weights (nothing is downloaded), it takes token ids
(``model.prepare.input_dtype=int64 model.prepare.vocab_size=64``) and is trained by hawq's
train stage; its ``SequenceClassifierOutput`` is read through ``.logits``.
"""

from __future__ import annotations


def bert(vocab: int = 64, length: int = 16, dim: int = 32, depth: int = 2, heads: int = 2,
         num_classes: int = 4):  # fmt: skip
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=vocab, hidden_size=dim, num_hidden_layers=depth,
                     num_attention_heads=heads, intermediate_size=2 * dim,
                     max_position_embeddings=length, num_labels=num_classes,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    return BertForSequenceClassification(cfg)
