"""Baichuan 1 and 2 (7B and 13B) as a native transformers model, without the checkpoints' remote code.

Same weights, names and outputs as the original modelling files (written for transformers 4.33):

- decoder of pre-norm blocks: RMSNorm -> self-attention (fused `W_pack` = q, k, v) -> RMSNorm -> SwiGLU MLP;
- positions: RoPE (rotate-half layout, base 10000) for the 7B models, ALiBi for the 13B models;
- lm_head: plain linear (Baichuan 1) or NormHead (Baichuan 2: rows L2-normalised); untied from the embeddings;
- loss: mean cross-entropy of the shifted tokens, plus Baichuan 2's z-loss when `z_loss_weight` is non-zero.

Beyond the original: batched left padding for every variant (RoPE positions counted from the attention mask, ALiBi
distances between real tokens; Baichuan-13B's code ignored the mask), the transformers Cache API (DynamicCache),
gradient checkpointing (of all layers or of some), torch's scaled_dot_product_attention in every mode, packed
sequences (several samples in one row, told apart by position_ids restarting at 0, attending only within themselves),
and an opt-in chunked loss that never makes the training logits (`chunked_loss = True`, see
novelkit.models.chunked_loss).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..chunked_loss import is_partitioned, linear_cross_entropy
from .configuration_baichuan import BaichuanConfig

ROPE_BASE = 10000.0

# The name under which the installed transformers carries the KV cache between `generate` and `forward`, and in model
# outputs (GenerationMixin's model_kwargs, the output dataclasses' fields): `past_key_values` in 5.17, `cache` by
# 5.24. Read from the output class the installed version declares; forward accepts both names.
CACHE_KEY = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def cache_argument(cache, past_key_values):
    """The cache passed under either name (a caller may use the old one on a new transformers, or the reverse)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache once, as `cache` or as `past_key_values`")
    return cache if cache is not None else past_key_values


class BaichuanRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        # As the original: statistics in float32, result in the weight's dtype when that is half precision.
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


def rotary_cos_sin(position_ids, head_dim):
    """cos and sin of the rotary angles, float32, shape (batch, seq, head_dim)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim
    inv_freq = 1.0 / (ROPE_BASE**exponents)
    freqs = position_ids[..., None].float() * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    # Rotate in float32 (as Baichuan 2 does) so half-precision models keep accurate angles at long positions.
    x32 = x.float()
    cos, sin = cos[:, None], sin[:, None]
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


def alibi_slopes(num_heads):
    """Per-head ALiBi slopes, exactly the original's `_get_interleave` (40 heads is not a power of two)."""

    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_2(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


def positions_from_mask(attention_mask, past_length, query_length, device):
    """Position ids of the new tokens: counted over unmasked tokens only, so a left-padded row starts at 0."""
    if attention_mask is None:
        return torch.arange(past_length, past_length + query_length, device=device)[None]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, -query_length:]


def attention_allowed(attention_mask, query_length, past_length, device):
    """Boolean mask (batch or 1, 1, query, key), True where a query may attend a key: causal and not padding.

    The queries are the last `query_length` of `past_length + query_length` cached positions. A padding query would see
    no key at all (softmax over nothing is NaN), so every query may always see itself; the outputs at padding positions
    are meaningless anyway and masked out downstream.
    """
    key_length = past_length + query_length
    query_index = torch.arange(past_length, key_length, device=device)[:, None]
    key_index = torch.arange(key_length, device=device)[None, :]
    allowed = (key_index <= query_index)[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()
    return allowed | (key_index == query_index)


def packed_sequence_starts(position_ids):
    """For packed rows (several samples per row, each with positions 0, 1, …): True where a sample starts."""
    return position_ids == 0


def packed_allowed(position_ids):
    """Boolean mask (batch, 1, seq, seq): causal and within the same sample of a packed row."""
    sample = packed_sequence_starts(position_ids).long().cumsum(-1)
    same = sample[:, :, None] == sample[:, None, :]
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return (same & causal)[:, None]


def varlen_attention():
    """torch's variable-length flash attention (CUDA, torch >= 2.9), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def packed_cu_seqlens(position_ids):
    """Cumulative sample lengths over the flattened (batch × seq) tokens, int32, and a bound on the longest sample:
    the row length, a constant, so compiled layers see the same value every step (no recompilation, no sync)."""
    starts = packed_sequence_starts(position_ids).reshape(-1)
    starts[0] = True
    edges = torch.nonzero(starts).reshape(-1)
    total = torch.tensor([position_ids.numel()], device=position_ids.device)
    return torch.cat([edges, total]).to(torch.int32), position_ids.shape[-1]


def alibi_bias(allowed, num_heads, dtype):
    """ALiBi as an additive float mask (batch or 1, heads, query, key): -slope * distance, the dtype's minimum where
    `allowed` is False.

    With left (or right) padding the real tokens are contiguous, so the distance in cache slots is the distance in
    tokens. The original adds slope * key_index at inference, which differs by a per-query constant: same softmax.
    """
    query_length, key_length = allowed.shape[-2:]
    device = allowed.device
    query_index = torch.arange(key_length - query_length, key_length, device=device)[:, None]
    distance = (query_index - torch.arange(key_length, device=device)[None, :]).clamp(min=0).to(torch.float32)
    slopes = torch.tensor(alibi_slopes(num_heads), dtype=torch.float32, device=device)
    bias = (-slopes[:, None, None] * distance).to(dtype)
    return torch.where(allowed, bias, torch.finfo(dtype).min)


# Not cuDNN attention: on recent NVIDIA GPUs torch may pick it first, and it builds a new execution plan for every new
# sequence length (measured on an H200 with torch 2.11: 40-120 ms per generated token, seconds per new training
# length). Flash and memory-efficient attention handle every shape at full speed.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class BaichuanAttention(nn.Module):
    def __init__(self, config: BaichuanConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        # Output rows 0..H-1 are q, H..2H-1 k, 2H..3H-1 v.
        self.W_pack = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states, mask, cos, sin, cache):
        """`mask`: None (causal, no padding), boolean (True = may attend), float (ALiBi bias, added to the scores), or
        a (cu_seqlens, longest) pair for packed rows on the GPU (variable-length flash attention)."""
        batch_size, query_length, _ = hidden_states.shape
        qkv = self.W_pack(hidden_states).view(batch_size, query_length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, seq, head_dim)
        if cos is not None:
            query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        if isinstance(mask, tuple):
            cu_seqlens, longest = mask
            flat = [t.transpose(1, 2).reshape(-1, self.num_heads, self.head_dim) for t in (query, key, value)]
            output = varlen_causal_attention(*flat, cu_seqlens, longest)
            return self.o_proj(output.reshape(batch_size, query_length, -1))
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        with sdpa_kernel(SDPA_BACKENDS):
            # Without a mask (no padding), is_causal lets SDPA use flash attention.
            output = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, is_causal=mask is None and query_length > 1
            )
        return self.o_proj(output.transpose(1, 2).reshape(batch_size, query_length, -1))


def varlen_causal_attention(query, key, value, cu_seqlens, longest):
    """(tokens, heads, head_dim) inputs of packed samples; causal within each sample. torch renamed the causal flag
    between versions (is_causal, then window_size=(-1, 0))."""
    varlen_attn = varlen_attention()
    try:
        return varlen_attn(query, key, value, cu_seqlens, cu_seqlens, longest, longest, is_causal=True)
    except TypeError:
        return varlen_attn(query, key, value, cu_seqlens, cu_seqlens, longest, longest, window_size=(-1, 0))


class BaichuanMLP(nn.Module):
    def __init__(self, config: BaichuanConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class BaichuanDecoderLayer(nn.Module):
    def __init__(self, config: BaichuanConfig, layer_idx: int):
        super().__init__()
        self.self_attn = BaichuanAttention(config, layer_idx)
        self.mlp = BaichuanMLP(config)
        self.input_layernorm = BaichuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = BaichuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, mask, cos, sin, cache):
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), mask, cos, sin, cache)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class NormHead(nn.Linear):
    """Baichuan 2's lm_head: logits against the L2-normalised rows of the stored (raw) weight.

    The original normalises on the fly in training and, at the first eval forward, overwrites the weight with its
    normalised rows. The logits are the same either way; here the parameter is never modified (safe with offloading,
    sharding and later training). With gradients the rows are normalised before the product, as the original's training
    path; without gradients (generation, evaluation) the raw logits are divided by the row norms instead, which avoids
    writing a normalised copy of the whole matrix at every step.
    """

    def __init__(self, in_features, out_features, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, hidden_states):
        if torch.is_grad_enabled():
            return F.linear(hidden_states, F.normalize(self.weight, dim=-1))
        norms = torch.linalg.vector_norm(self.weight, dim=-1, dtype=torch.float32).clamp(min=1e-12)
        return F.linear(hidden_states, self.weight) / norms.to(self.weight.dtype)


class BaichuanPreTrainedModel(PreTrainedModel):
    config_class = BaichuanConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BaichuanDecoderLayer"]
    _skip_keys_device_placement = [CACHE_KEY]
    # Attention always runs through torch's scaled_dot_product_attention.
    _supports_sdpa = True
    # Baichuan-7B checkpoints carry a per-layer RoPE buffer; the angles are recomputed here.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]


class BaichuanModel(BaichuanPreTrainedModel):
    def __init__(self, config: BaichuanConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            [BaichuanDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = BaichuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ):
        """`attention_mask` is the usual 2D (batch, past + new tokens) 0/1 mask. `position_ids` (RoPE models only)
        default to positions counted over the mask. The KV cache comes as `cache` or `past_key_values` (see
        CACHE_KEY). Extra keyword arguments that `generate` passes in some transformers versions (e.g.
        `cache_position`) are not needed and ignored."""
        cache = cache_argument(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if output_attentions:
            raise ValueError("Baichuan attention runs through scaled_dot_product_attention: no attention weights")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("attention_mask must be 2D (batch, past + new tokens) with 1 for tokens, 0 for padding")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if self.gradient_checkpointing and self.training:
            # The recomputation in backward would write the keys and values a second time.
            use_cache, cache = False, None

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache()
        past_length = cache.get_seq_length() if cache is not None else 0
        query_length = inputs_embeds.shape[1]
        device = inputs_embeds.device
        if attention_mask is not None and attention_mask.shape[-1] != past_length + query_length:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} tokens, expected past {past_length} + new "
                f"{query_length}"
            )

        packed = (position_ids is not None and attention_mask is None and past_length == 0 and query_length > 1
                  and bool(packed_sequence_starts(position_ids[:, 1:]).any()))
        if self.config.use_alibi:
            cos = sin = None
            if packed:
                # distances inside each sample come from its own positions (rows are contiguous per sample)
                allowed = packed_allowed(position_ids)
            else:
                allowed = attention_allowed(attention_mask, query_length, past_length, device)
            mask = alibi_bias(allowed, self.config.num_attention_heads, inputs_embeds.dtype)
        else:
            if position_ids is None:
                position_ids = positions_from_mask(attention_mask, past_length, query_length, device)
            cos, sin = rotary_cos_sin(position_ids, self.config.hidden_size // self.config.num_attention_heads)
            has_padding = attention_mask is not None and not bool(attention_mask.all())
            if packed:
                use_varlen = (inputs_embeds.is_cuda and inputs_embeds.dtype in (torch.float16, torch.bfloat16)
                              and varlen_attention() is not None)
                mask = packed_cu_seqlens(position_ids) if use_varlen else packed_allowed(position_ids)
            elif has_padding or (past_length > 0 and query_length > 1):
                mask = attention_allowed(attention_mask, query_length, past_length, device)
            else:
                mask = None  # plain causal (or a single new token that sees everything)

        hidden_states = inputs_embeds
        all_hidden_states = []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            # a layer's own flag (novelkit.training.fast_training.checkpoint_some_layers) leaves some layers out
            if self.gradient_checkpointing and self.training and getattr(layer, "gradient_checkpointing", True):
                hidden_states = self._gradient_checkpointing_func(layer.__call__, hidden_states, mask, cos, sin, None)
            else:
                hidden_states = layer(hidden_states, mask, cos, sin, cache)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            # As the original: the last entry is the output after the final norm.
            all_hidden_states.append(hidden_states)

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            **{CACHE_KEY: cache if use_cache else None},
        )
        return output if return_dict else output.to_tuple()


class BaichuanForCausalLM(BaichuanPreTrainedModel, GenerationMixin):
    # The loss is a per-batch mean (cross-entropy + z-loss, as the original), so Trainer must average it over
    # gradient-accumulation steps itself rather than pass `num_items_in_batch`.
    accepts_loss_kwargs = False
    # True: in training with labels, the loss comes from the hidden states chunk by chunk and no logits are returned.
    chunked_loss = False

    def __init__(self, config: BaichuanConfig):
        super().__init__(config)
        self.model = BaichuanModel(config)
        if config.use_norm_head:
            self.lm_head = NormHead(config.hidden_size, config.vocab_size)
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        # resize_token_embeddings builds a plain nn.Linear; keep Baichuan 2's normalisation on the new matrix.
        if self.config.use_norm_head and not isinstance(new_embeddings, NormHead):
            head = NormHead(new_embeddings.in_features, new_embeddings.out_features, device="meta")
            head.weight = new_embeddings.weight
            new_embeddings = head
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        cache: Cache | None = None,
        **kwargs,
    ):
        """`labels` are the input ids (shifted inside, -100 = ignored). `logits_to_keep`: compute logits for the last
        N positions only (0 = all); generate uses it to skip the prompt's logits."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache_argument(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        if (labels is not None and self.chunked_loss and self.training and torch.is_grad_enabled()
                and not is_partitioned(self.lm_head.weight)):  # ZeRO-3 gathers the head only inside its own call
            weight = self.lm_head.weight
            if isinstance(self.lm_head, NormHead):
                weight = F.normalize(weight, dim=-1)
            loss = linear_cross_entropy(hidden_states[:, :-1], weight, labels[:, 1:],
                                        z_loss_weight=getattr(self.config, "z_loss_weight", None) or 0.0)
            return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                          **{CACHE_KEY: getattr(outputs, CACHE_KEY)})
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.causal_lm_loss(logits, labels)

        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{CACHE_KEY: getattr(outputs, CACHE_KEY)},
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()

    def causal_lm_loss(self, logits, labels):
        """Mean cross-entropy of each token predicting the next one, plus Baichuan 2's z-loss.

        z-loss as the original: z_loss_weight * mean over all shifted positions (ignored labels included) of the
        squared largest logit. Computed in float32.
        """
        shift_logits = logits[:, :-1].float()
        shift_labels = labels[:, 1:].to(logits.device)
        loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1))
        z_loss_weight = getattr(self.config, "z_loss_weight", None)
        if z_loss_weight:
            loss = loss + z_loss_weight * shift_logits.max(dim=-1).values.pow(2).mean()
        return loss
