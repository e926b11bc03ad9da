"""The embedded default: a tiny model every script uses when no model path is given, so a first run needs no download.

Built once, on first use, from the bundled corpus in `data_examples/novels`: a SentencePiece tokenizer laid out like
Baichuan 2's (BPE, byte fallback, no dummy prefix, digits split, the chat markers as single pieces) and a tiny
Baichuan2-architecture model (RoPE, NormHead, 1.8M parameters) pretrained on that corpus for ~30 s, so it
writes Chinese-looking text rather than noise. It lands in `$NOVELKIT_HOME/default-model-<hash>` (default
`~/.cache/novelkit`); the hash covers the corpus and this recipe, so editing either builds a fresh one. Delete the
folder to rebuild.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ConfigError
from ..home import cache_home

ROOT = Path(__file__).resolve().parents[2]
CORPUS_DIR = ROOT / "data_examples" / "novels"
RECIPE = "v2"  # bump when the build below changes
VOCAB_SIZE = 4000
CHAT_MARKERS = ["<reserved_102>", "<reserved_103>", "<reserved_106>", "<reserved_107>"]
MODEL_SHAPE = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                   max_position_embeddings=2048, model_max_length=2048)
PRETRAIN = dict(block_size=256, steps=100, batch_size=8, learning_rate=3e-3)


def _corpus_files() -> list[Path]:
    files = sorted(CORPUS_DIR.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"the bundled corpus {CORPUS_DIR} has no .txt files")
    return files


def _build_hash() -> str:
    h = hashlib.sha256(f"{RECIPE}{VOCAB_SIZE}{CHAT_MARKERS}{sorted(MODEL_SHAPE.items())}{PRETRAIN}".encode())
    for f in _corpus_files():
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:12]


def default_model_path() -> Path:
    return cache_home() / f"default-model-{_build_hash()}"


def train_tokenizer(lines, out_dir: Path, vocab_size: int = VOCAB_SIZE) -> None:
    """Train a Baichuan-2-style SentencePiece model on `lines` and save it as a BaichuanTokenizer folder."""
    import sentencepiece as spm

    from .baichuan.tokenization_baichuan import BaichuanTokenizer

    model = io.BytesIO()
    try:
        # rare characters (0.05% of the text) fall back to UTF-8 byte pieces, as in Baichuan's own tokenizers
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            character_coverage=0.9995, byte_fallback=True, split_digits=True, add_dummy_prefix=False,
            normalization_rule_name="identity", remove_extra_whitespaces=False, hard_vocab_limit=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=CHAT_MARKERS, num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:
        if "Vocabulary size is smaller than required_chars" in str(e):
            raise ConfigError(f"vocab_size {vocab_size} is too small for this corpus: {str(e).split('. ')[1]}; "
                              f"raise VOCAB_SIZE") from e
        raise
    out_dir.mkdir(parents=True, exist_ok=True)
    sp_file = out_dir / "tokenizer.model"
    sp_file.write_bytes(model.getvalue())
    BaichuanTokenizer(vocab_file=str(sp_file), pad_token="<unk>").save_pretrained(out_dir)


def _corpus_lines():
    from ..data.readers import read_text

    for f in _corpus_files():
        for line in read_text(f).split("\n"):
            if line.strip():
                yield line.strip()


def load_own_tokenizer(folder):
    """The tokenizer train_tokenizer wrote (novelkit.models.loading.load_tokenizer would build this model first)."""
    from .baichuan.tokenization_baichuan import BaichuanTokenizer

    return BaichuanTokenizer.from_pretrained(str(folder))


def build_default_model(out_dir: Path) -> None:
    import torch
    from transformers import GenerationConfig, Trainer, TrainingArguments

    from .baichuan import BaichuanForCausalLM, tiny_config
    from ..data.pretraining import build_token_cache, train_eval_blocks

    train_tokenizer(_corpus_lines(), out_dir)
    tokenizer = load_own_tokenizer(out_dir)
    config = tiny_config("baichuan2-7b", vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         **MODEL_SHAPE)
    torch.manual_seed(0)
    model = BaichuanForCausalLM(config)

    # a short pretraining on the bundled corpus, through the same corpus pipeline as Baichuan-Pretrain
    cache = build_token_cache(CORPUS_DIR, out_dir, out_dir / "token_cache", num_proc=1,
                              load_tokenizer=load_own_tokenizer)
    blocks, _ = train_eval_blocks(cache, PRETRAIN["block_size"])
    args = TrainingArguments(
        output_dir=str(out_dir / "trainer"), max_steps=PRETRAIN["steps"], learning_rate=PRETRAIN["learning_rate"],
        per_device_train_batch_size=PRETRAIN["batch_size"], lr_scheduler_type="cosine", warmup_steps=0.05,
        weight_decay=0.01, logging_steps=50, save_strategy="no", report_to="none", seed=0, use_cpu=True,
    )
    Trainer(model=model, args=args, train_dataset=blocks).train()
    shutil.rmtree(out_dir / "token_cache", ignore_errors=True)
    shutil.rmtree(out_dir / "trainer", ignore_errors=True)

    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, max_new_tokens=256,
                                               repetition_penalty=1.1)
    model.save_pretrained(out_dir)
    (out_dir / "novelkit_default.json").write_text(json.dumps({"recipe": RECIPE, "hash": _build_hash()}) + "\n")


def ensure_default_model() -> Path:
    """The default model's folder, built on first call. Concurrent builders race safely: each builds in its own
    temporary folder and the first rename wins."""
    path = default_model_path()
    if (path / "novelkit_default.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[novelkit] building the embedded default model in {path} (once) ...", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=path.parent))
    try:
        build_default_model(tmp)
        os.rename(tmp, path)
    except OSError:
        if not (path / "novelkit_default.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
