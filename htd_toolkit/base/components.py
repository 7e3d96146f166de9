"""What the shipped base and the tiny test bases share: a tiny random CLIP text encoder and tokenizer
(HTD conditions on maps and crops; the prompt is a constant) and Stable Diffusion's noise schedule."""

from __future__ import annotations

TEXT_ENCODER = dict(vocab_size=516, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=77, projection_dim=32, bos_token_id=514, eos_token_id=515,
                    pad_token_id=515)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)


def build_tokenizer():
    """A 516-token byte-level CLIP tokenizer built in memory (SD's bos/eos conventions, max length 77)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for c in alphabet:
        vocab[c + "</w>"] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>")]
    for token in ("th", "the</w>", "<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
