"""The evaluation stage: metrics (ROUGE, NER entity F1, repetition, LM perplexity), the prediction job behind every
run_predict.sh (prediction), evaluation during training (generation_eval), and the demo's blind A/B ratings
(ratings).

May import: base, data, models, generation, retrieval."""
