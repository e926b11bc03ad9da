"""The training stage: what the fine-tuning and pretraining recipes share: the SFT flags, data step, Trainer and
resume (sft_training), keeping the best checkpoint and stopping early (best_checkpoint), the GPU fast path
(fast_training), and DeepSpeed ZeRO helpers (zero).

May import: base, data, models, generation, retrieval, evaluation."""
