"""The embedded default: a tiny model every script uses when no model path is given, so a first run needs no download.

Built once, on first use, from the bundled corpus in `data_examples/novels`: a SentencePiece tokenizer laid out like
Baichuan 2's (BPE, byte fallback, no dummy prefix, digits split, the chat markers as single pieces) and a tiny
randomly initialised model. It lands in `$NOVELKIT_HOME/default-model-<hash>` (default `~/.cache/novelkit`); the hash
covers the corpus and this recipe, so editing either builds a fresh one. Delete the folder to rebuild.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS_DIR = ROOT / "data_examples" / "novels"
RECIPE = "v1"  # bump when the build below changes
VOCAB_SIZE = 4000
CHAT_MARKERS = ["<reserved_102>", "<reserved_103>", "<reserved_106>", "<reserved_107>"]
MODEL_SHAPE = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                   max_position_embeddings=2048)


def cache_home() -> Path:
    return Path(os.environ.get("NOVELKIT_HOME", Path.home() / ".cache" / "novelkit"))


def _corpus_files() -> list[Path]:
    files = sorted(CORPUS_DIR.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"the bundled corpus {CORPUS_DIR} has no .txt files")
    return files


def _build_hash() -> str:
    h = hashlib.sha256(f"{RECIPE}{VOCAB_SIZE}{CHAT_MARKERS}{sorted(MODEL_SHAPE.items())}".encode())
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
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True, add_dummy_prefix=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=CHAT_MARKERS, num_threads=2,
        minloglevel=2,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    sp_file = out_dir / "tokenizer.model"
    sp_file.write_bytes(model.getvalue())
    BaichuanTokenizer(vocab_file=str(sp_file), pad_token="<unk>").save_pretrained(out_dir)


def _corpus_lines():
    from .readers import read_text

    for f in _corpus_files():
        for line in read_text(f).split("\n"):
            if line.strip():
                yield line.strip()


def build_default_model(out_dir: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from .loading import load_tokenizer

    train_tokenizer(_corpus_lines(), out_dir)
    tokenizer = load_tokenizer(out_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False, rms_norm_eps=1e-6, **MODEL_SHAPE)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, max_new_tokens=256)
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
