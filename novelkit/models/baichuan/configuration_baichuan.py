"""BaichuanConfig: one configuration class for Baichuan-7B, Baichuan-13B, Baichuan2-7B and Baichuan2-13B.

The four published checkpoints share `model_type: "baichuan"` and differ in two architectural choices, which are read
from the fields their `config.json` files carry:

- Position encoding. RoPE (the 7B models) when the config has `max_position_embeddings`; ALiBi (the 13B models, whose
  configs carry only `model_max_length`) otherwise. Baichuan2-7B has both fields and is RoPE.
- NormHead (Baichuan 2): the lm_head rows are L2-normalised before the product. Used when the config has
  `z_loss_weight` (only Baichuan 2 configs have it) or when the vocabulary is Baichuan 2's 125,696 tokens.

Either choice can be forced with an explicit field: `position_embedding="rope"|"alibi"`, `norm_head=True|False`.

Optional fields (`max_position_embeddings`, `model_max_length`, `z_loss_weight` and the two overrides) are stored only
when given, so saving writes the same field set as the original config: a saved fine-tune keeps `auto_map`,
`architectures`, `model_max_length`, `z_loss_weight`... and still loads in the original remote code.
"""

from __future__ import annotations

from transformers import PretrainedConfig

BAICHUAN2_VOCAB_SIZE = 125696

# Names of the original classes. Baichuan-7B's own class is spelled "BaiChuan"; every later model uses "Baichuan".
BAICHUAN_7B_ARCHITECTURE = "BaiChuanForCausalLM"
BAICHUAN_ARCHITECTURE = "BaichuanForCausalLM"
ORIGINAL_ARCHITECTURES = (BAICHUAN_7B_ARCHITECTURE, BAICHUAN_ARCHITECTURE)


class BaichuanConfig(PretrainedConfig):
    """Configuration of a Baichuan 1/2 model. Without arguments: the Baichuan-13B sizes (ALiBi, plain lm_head)."""

    model_type = "baichuan"
    # the cache's output name, old and new (modeling_baichuan.CACHE_KEY): not a prediction Trainer should gather
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size=64000,
        hidden_size=5120,
        intermediate_size=13696,
        num_hidden_layers=40,
        num_attention_heads=40,
        hidden_act="silu",
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        max_position_embeddings=None,
        model_max_length=None,
        z_loss_weight=None,
        position_embedding=None,
        norm_head=None,
        **kwargs,
    ):
        if position_embedding not in (None, "rope", "alibi"):
            raise ValueError(f"position_embedding must be 'rope' or 'alibi', not {position_embedding!r}")
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"
            )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        optional = {
            "max_position_embeddings": max_position_embeddings,
            "model_max_length": model_max_length,
            "z_loss_weight": z_loss_weight,
            "position_embedding": position_embedding,
            "norm_head": norm_head,
        }
        for name, value in optional.items():
            if value is not None:
                setattr(self, name, value)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def use_alibi(self) -> bool:
        """True for ALiBi (13B models), False for RoPE (7B models). See the module docstring for the rule."""
        explicit = getattr(self, "position_embedding", None)
        if explicit is not None:
            return explicit == "alibi"
        return getattr(self, "max_position_embeddings", None) is None

    @property
    def use_norm_head(self) -> bool:
        """True when the lm_head is Baichuan 2's NormHead. See the module docstring for the rule."""
        explicit = getattr(self, "norm_head", None)
        if explicit is not None:
            return bool(explicit)
        return getattr(self, "z_loss_weight", None) is not None or self.vocab_size == BAICHUAN2_VOCAB_SIZE

    @property
    def original_architecture(self) -> str:
        """Class name of the original code for this kind of model (Baichuan-7B is the RoPE model without NormHead)."""
        if not self.use_alibi and not self.use_norm_head:
            return BAICHUAN_7B_ARCHITECTURE
        return BAICHUAN_ARCHITECTURE

    def to_dict(self):
        output = super().to_dict()
        # save_pretrained records the saving class's name; write the original class's name instead, so that tools
        # keyed on it (vLLM tells Baichuan-7B from the rest by this name) treat a fine-tune like its base model.
        if output.get("architectures") and output["architectures"][0] in ORIGINAL_ARCHITECTURES:
            output["architectures"] = [self.original_architecture]
        return output


# What distinguishes the four published configs (besides sizes), for `tiny_config`.
_VARIANT_FIELDS = {
    "baichuan-7b": {
        "architectures": [BAICHUAN_7B_ARCHITECTURE],
        "auto_map": {
            "AutoConfig": "configuration_baichuan.BaiChuanConfig",
            "AutoModelForCausalLM": "modeling_baichuan.BaiChuanForCausalLM",
        },
        "max_position_embeddings": 256,
    },
    "baichuan-13b": {
        "architectures": [BAICHUAN_ARCHITECTURE],
        "auto_map": {
            "AutoConfig": "configuration_baichuan.BaichuanConfig",
            "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
        },
        "model_max_length": 256,
    },
    "baichuan2-7b": {
        "architectures": [BAICHUAN_ARCHITECTURE],
        "auto_map": {
            "AutoConfig": "configuration_baichuan.BaichuanConfig",
            "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
        },
        "max_position_embeddings": 256,
        "model_max_length": 256,
        "z_loss_weight": 0,
        "tokenizer_class": "BaichuanTokenizer",
    },
    "baichuan2-13b": {
        "architectures": [BAICHUAN_ARCHITECTURE],
        "auto_map": {
            "AutoConfig": "configuration_baichuan.BaichuanConfig",
            "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
        },
        "model_max_length": 256,
        "z_loss_weight": 0,
        "tokenizer_class": "BaichuanTokenizer",
    },
}
VARIANTS = tuple(_VARIANT_FIELDS)


def tiny_config(variant: str, **overrides) -> BaichuanConfig:
    """A tiny config of `variant`'s kind (hidden 64, 2 layers, 4 heads, vocab 1000) for tests and toy models.

    It carries the same fields as the published config of that variant (auto_map, architectures, length fields,
    z_loss_weight), so a model built from it saves a folder laid out like a real checkpoint. `overrides` replace any
    field, e.g. `vocab_size=...`.
    """
    if variant not in _VARIANT_FIELDS:
        raise ValueError(f"unknown Baichuan variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    fields = {
        "vocab_size": 1000,
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        **_VARIANT_FIELDS[variant],
        **overrides,
    }
    return BaichuanConfig(**fields)
