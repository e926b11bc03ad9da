"""Retrieval: sentence embeddings from a causal LM (embedding), the vector store, building an index from books
(indexing), and the 前情提要 recap that prediction puts before a passage (recap).

May import: base, data, models."""
