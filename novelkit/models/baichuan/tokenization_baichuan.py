"""BaichuanTokenizer: the SentencePiece tokenizer of Baichuan 1 and 2, without remote code.

Behaves like the original `tokenization_baichuan.py` (transformers 4.33): plain SentencePiece encoding (the model
file decides dummy prefix, digit splitting and byte fallback), BOS/EOS added only when `add_bos_token` /
`add_eos_token` say so, decoding through SentencePiece so byte-fallback pieces come back as UTF-8.
"""

from __future__ import annotations

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend


class BaichuanTokenizer(SentencePieceBackend):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token=None,
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        **kwargs,
    ):
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        kwargs.pop("legacy", None)  # legacy=True: encode exactly as the SentencePiece model does
        super().__init__(
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            legacy=True,
            **kwargs,
        )

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            out = out + bos + token_ids_1 + eos
        return out

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += bos + [0] * len(token_ids_1) + eos
        return mask

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # SentencePiece's own decode joins byte-fallback pieces (<0xE4><0xBD><0xA0>) back into characters.
        out, pieces = [], []
        specials = set(self.all_special_tokens)
        for token in tokens:
            if token in specials:
                out.append(self.sp_model.decode(pieces) + token)
                pieces = []
            else:
                pieces.append(token)
        out.append(self.sp_model.decode(pieces))
        return "".join(out)
