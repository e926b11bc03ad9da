"""The model stage: loading local model folders, tokenizers and PEFT adapters (novelkit.models.loading), the embedded
default model built from the bundled corpus, our Baichuan 1/2 implementation (no remote code), 4-bit quantisation,
and the causal-LM loss computed from the hidden states (chunked_loss).

May import: base, data."""
