"""The examples' tiny tasks and model: nothing to download, so they run anywhere.

Three tasks of 8 (prompt, answer) pairs each; a randomly initialised LLaMA of 0.2 M parameters whose
tokens are the bytes of the text (256 = end of sequence, also the padding). `byte_tokenizer()` is the
same encoding as a Hugging Face fast tokenizer, for the tools that want one (TRL's SFTTrainer).
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TASKS = {
    "sentiment": [("Review: a wonderful, moving film. Sentiment:", " positive"),
                  ("Review: dull and far too long. Sentiment:", " negative"),
                  ("Review: the cast is brilliant. Sentiment:", " positive"),
                  ("Review: I walked out after an hour. Sentiment:", " negative"),
                  ("Review: a joy from start to end. Sentiment:", " positive"),
                  ("Review: the plot makes no sense. Sentiment:", " negative"),
                  ("Review: warm, funny and kind. Sentiment:", " positive"),
                  ("Review: a waste of a good book. Sentiment:", " negative")],
    "topic": [("Text: the striker scored twice. Topic:", " sports"),
              ("Text: the cells divide every hour. Topic:", " science"),
              ("Text: add the garlic to the pan. Topic:", " food"),
              ("Text: the band played three encores. Topic:", " music"),
              ("Text: the keeper saved a penalty. Topic:", " sports"),
              ("Text: the comet returns in 2061. Topic:", " science"),
              ("Text: bake the bread for an hour. Topic:", " food"),
              ("Text: she sang the aria in Italian. Topic:", " music")],
    "sum": [(f"{a} + {b} =", f" {a + b}") for a, b in [(3, 4), (12, 7), (25, 30), (8, 9),
                                                         (41, 2), (16, 16), (5, 60), (33, 11)]],
}
EOS = PAD = 256  # the one token past the bytes


def encode(text: str) -> list[int]:
    """Bytes are the tokens."""
    return list(text.encode())


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """The same randomly initialised model for the same seed (on every rank)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        tie_word_embeddings=False))


def byte_tokenizer():
    """`encode` as a `PreTrainedTokenizerFast`: token i is byte i, "<eos>" is 256; no BOS, no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_char = bytes_to_unicode()  # byte-level BPE's printable stand-in for each byte
    vocab = {byte_char[b]: b for b in range(256)}
    vocab["<eos>"] = EOS
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
