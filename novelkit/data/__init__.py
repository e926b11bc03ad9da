"""The data stage: files in, token ids out. Readers (JSONL, JSON, TSV, novel .txt in any Chinese encoding), the
sample formats (Alpaca, ShareGPT, messages, … → system/prompt/response/history), chapter and passage chunking, book
streams, the seeds' tasks, chat templates, SFT features (labels, truncation), packing, and the pretraining corpus
(cleaning, the token cache, blocks).

May import: the base modules (novelkit.errors, outputs, home, …) and nothing else of novelkit. A tokenizer arrives as an
object or as a loader function, so the data stage never imports the model stage."""
