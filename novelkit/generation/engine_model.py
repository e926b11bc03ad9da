"""The model side of the generation engine: a static KV cache of `slots` x `max_len` and the two forward passes over it.

Every sequence lives in its own cache slot from position 0 with its own length, so sequences can join (a prefill
into a free slot) and leave between decode steps. Only attention, positions and the cache are written here; norms,
linear layers, MLPs and the LM head are the model's own modules, called as they are, so LoRA (PEFT), bitsandbytes
4-bit layers and any later change to those modules keep working. With `frozen=True` (inference only) plain q/k/v
and gate/up layers are run as one matrix product each on a concatenated weight, which the layers' own parameters
then view, and Baichuan 2's NormHead row norms are computed once.

Supported: our Baichuan (RoPE 7B, ALiBi 13B, NormHead) and transformers' Llama / Qwen2 / Qwen3 dense (GQA, qkv bias,
Qwen3's per-head RMSNorm of queries and keys, tied embeddings, RoPE scaling such as Llama 3's through the model's own
rotary module). `fast_path_problem` says why another model cannot use it (the engine then falls back to `generate`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..compile_cache import use_compile_cache

SUPPORTED = ("baichuan", "llama", "qwen2", "qwen3")


def unwrap(model):
    """The transformers model inside a PEFT wrapper (LoRA layers stay in place inside its modules)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def fast_path_problem(model) -> str | None:
    """None when the engine's own forward can run `model`, else the reason it cannot."""
    inner = unwrap(model)
    model_type = getattr(inner.config, "model_type", "")
    if model_type not in SUPPORTED:
        return f"model type {model_type!r} (fast path: {', '.join(SUPPORTED)})"
    if any(hasattr(p, "ds_id") for p in inner.parameters()):
        return "DeepSpeed-partitioned parameters"
    if getattr(inner.config, "use_sliding_window", False) or any(
            kind != "full_attention" for kind in getattr(inner.config, "layer_types", None) or ()):
        return "sliding-window attention"
    if model_type != "baichuan" and not hasattr(inner.model, "rotary_emb"):
        return "no rotary embedding module"
    return None


def fuse_linear_weights(linears):
    """(weight, bias) of several plain nn.Linear layers that read the same input, concatenated along the output,
    so one matrix product replaces several (fewer, larger kernels: decoding at small batches is launch- and
    memory-bound). The layers' parameters become views into the new tensors: no extra memory, and the modules
    compute what they computed. None when a layer is wrapped (LoRA), quantized or the biases differ in presence.
    The model's parameters then share storage: an inference-only change (safetensors refuses to save shared
    tensors)."""
    if not all(type(m) is torch.nn.Linear for m in linears):
        return None
    if len({m.bias is None for m in linears}) > 1 or len({(m.weight.dtype, m.weight.device) for m in linears}) > 1:
        return None
    sizes = [m.out_features for m in linears]
    fused = []
    for name in ("weight", "bias"):
        if getattr(linears[0], name) is None:
            fused.append(None)
            continue
        whole = torch.cat([getattr(m, name).data for m in linears])
        for m, part in zip(linears, whole.split(sizes)):
            getattr(m, name).data = part
        fused.append(whole)
    return tuple(fused)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class CachedModel:
    """A causal LM with a static KV cache: `prefill` writes prompts into slots, `decode` adds one token per slot."""

    def __init__(self, model, slots: int, max_len: int, frozen: bool = False):
        inner = unwrap(model)
        config = inner.config
        self.model, self.config = inner, config
        self.baichuan = config.model_type == "baichuan"
        self.alibi = self.baichuan and bool(config.use_alibi)
        self.layers = list(inner.model.layers)
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.slots, self.max_len = slots, max_len
        embed = inner.get_input_embeddings()
        self.device, self.dtype = embed.weight.device, embed.weight.dtype
        # one position more than is ever read: a read of the whole cache would be a contiguous slice, and the
        # compiled step, which checks, would be compiled again for that length
        shape = (slots, self.kv_heads, max_len + 1, self.head_dim)
        self.keys = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.values = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.key_index = torch.arange(max_len, device=self.device)
        self._positional_tables()
        self.head = self._lm_head(frozen)
        self.qkv = [None] * len(self.layers)  # per layer: (weight, bias) of q, k, v in one, or None
        self.gate_up = [None] * len(self.layers)
        if frozen:  # the weights will not change while this cache lives
            for i, layer in enumerate(self.layers):
                if not self.baichuan:  # Baichuan's W_pack is already one
                    attn = layer.self_attn
                    self.qkv[i] = fuse_linear_weights([attn.q_proj, attn.k_proj, attn.v_proj])
                self.gate_up[i] = fuse_linear_weights([layer.mlp.gate_proj, layer.mlp.up_proj])

    def _positional_tables(self):
        positions = torch.arange(self.max_len, device=self.device)
        if self.alibi:
            from ..models.baichuan.modeling_baichuan import alibi_slopes

            self.slopes = torch.tensor(alibi_slopes(self.heads), dtype=torch.float32, device=self.device)
            self.cos = self.sin = None
        elif self.baichuan:
            from ..models.baichuan.modeling_baichuan import rotary_cos_sin

            self.cos, self.sin = (t[0] for t in rotary_cos_sin(positions[None], self.head_dim))  # float32, as it
        else:
            probe = torch.zeros(1, device=self.device, dtype=self.dtype)
            cos, sin = self.model.model.rotary_emb(probe, positions[None])  # the model's own, in its dtype
            self.cos, self.sin = cos[0], sin[0]

    def _lm_head(self, frozen: bool):
        """The LM head as a function of hidden states. Baichuan 2's NormHead divides by its row norms at every call
        (reading the whole matrix once more); for frozen weights they are computed once here instead (the same
        numbers), unless the head is wrapped (LoRA) or quantized."""
        from ..models.baichuan.modeling_baichuan import NormHead

        head = self.model.lm_head
        if type(head) is NormHead and (frozen or not head.weight.requires_grad):
            norms = torch.linalg.vector_norm(head.weight, dim=-1, dtype=torch.float32).clamp(min=1e-12)
            norms = norms.to(head.weight.dtype)
            return lambda h: F.linear(h, head.weight) / norms
        return head

    # --- pieces shared by prefill and decode -------------------------------------------------------------------
    def _qkv(self, index, layer, x):
        """Queries (batch, heads, seq, dim), keys and values (batch, kv_heads, seq, dim)."""
        batch, seq, _ = x.shape
        attn = layer.self_attn
        if self.baichuan:
            qkv = attn.W_pack(x).view(batch, seq, 3, self.heads, self.head_dim)
            return qkv.permute(2, 0, 3, 1, 4).unbind(0)
        fused = self.qkv[index]
        if fused is not None:
            q, k, v = F.linear(x, *fused).split([self.heads * self.head_dim] + [self.kv_heads * self.head_dim] * 2, -1)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q = q.view(batch, seq, self.heads, self.head_dim)
        k = k.view(batch, seq, self.kv_heads, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head's queries and keys, before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        v = v.view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        return q.transpose(1, 2), k.transpose(1, 2), v

    def _mlp(self, index, layer, x):
        fused = self.gate_up[index]
        if fused is None:
            return layer.mlp(x)
        gate, up = F.linear(x, *fused).chunk(2, dim=-1)
        return layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)

    def _rotate(self, x, cos, sin):
        """RoPE with per-row angles: cos/sin (batch, seq, dim). Baichuan rotates in float32, HF models in their dtype."""
        cos, sin = cos[:, None], sin[:, None]
        if self.baichuan:
            x32 = x.float()
            return (x32 * cos + _rotate_half(x32) * sin).to(x.dtype)
        return x * cos + _rotate_half(x) * sin

    def _run_layers(self, h, attend):
        for index, layer in enumerate(self.layers):
            h = h + attend(index, layer, layer.input_layernorm(h))
            h = h + self._mlp(index, layer, layer.post_attention_layernorm(h))
        return h

    def _final(self, h):
        return self.head(self.model.model.norm(h))

    # --- prefill: new prompts into their slots ------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Runs right-padded prompts (causal attention: padding only follows real tokens, so no real token sees it),
        writes their keys and values at positions 0.. of `slots`, returns the last real token's logits (n, vocab)."""
        n, width = len(prompts), max(len(p) for p in prompts)
        if width > self.max_len:
            raise ValueError(f"a prompt of {width} tokens does not fit the cache of {self.max_len}")
        ids = torch.zeros(n, width, dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, :len(p)] = torch.tensor(p)
        ids = ids.to(self.device)
        slot_index = torch.tensor(slots, device=self.device)
        positions = torch.arange(width, device=self.device)
        cos = sin = bias = None
        if self.alibi:
            from ..models.baichuan.modeling_baichuan import alibi_bias, attention_allowed

            bias = alibi_bias(attention_allowed(None, width, 0, self.device), self.heads, self.dtype)
        else:
            cos, sin = self.cos[positions][None].expand(n, -1, -1), self.sin[positions][None].expand(n, -1, -1)

        def attend(index, layer, x):
            q, k, v = self._qkv(index, layer, x)
            if cos is not None:
                q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            self.keys[index][slot_index, :, :width] = k
            self.values[index][slot_index, :, :width] = v
            group = self.heads // self.kv_heads
            if group > 1:
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            with _sdpa_backends():
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None)
            return layer.self_attn.o_proj(out.transpose(1, 2).reshape(n, width, -1))

        h = self._run_layers(self.model.get_input_embeddings()(ids), attend)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        return self._final(h[torch.arange(n, device=self.device), last][:, None])[:, 0]

    # --- decode: one token for each of slots 0..batch-1 ---------------------------------------------------------
    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """tokens, positions: (batch,) for slots 0..batch-1 (the token at `position` of its slot); keys are read
        from cache[:, :, :length] (length > every position). Returns logits (batch, vocab). No host sync, no
        data-dependent shapes: CUDA-graph capturable."""
        return self.decode_over(tokens, positions, self.key_index[:length])

    def compiled_decode(self):
        """`decode_over` through torch.compile (inductor): the ~40 small kernels per layer of the module-calling
        step (norms, RoPE, cache write, mask) fuse into a few. Batch and length are dynamic dimensions, so one
        compilation serves every (batch, length) bucket; batch must be >= 2 (a size of 1 would be specialised)."""
        use_compile_cache()
        # no shape padding: on CUDA inductor's pad_mm pass asks whether each matmul is compute-bound, which guards the
        # cache length to a range (7 <= length <= 127) and compiled the step again for longer lengths; decoding's
        # matmuls are memory-bound, padding them gains nothing
        compiled = torch.compile(self.decode_over, options={"shape_padding": False})
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"

        def call(tokens, positions, length):
            key_index = self.key_index[:length]
            for t in (tokens, positions, key_index):
                torch._dynamo.maybe_mark_dynamic(t, 0)
            # automatic dynamic shapes off: another engine's cache or model of other sizes recompiles with static
            # sizes instead of turning head or hidden sizes symbolic (slower kernels)
            with torch._dynamo.config.patch(automatic_dynamic_shapes=False, **{limit: 64}):
                return compiled(tokens, positions, key_index)

        return call

    def decode_over(self, tokens: torch.Tensor, positions: torch.Tensor, key_index: torch.Tensor) -> torch.Tensor:
        """`decode` with the cache length given as `key_index` = arange(length): a tensor dimension, which
        torch.compile can keep symbolic (a Python int would be specialised)."""
        batch, length = tokens.shape[0], key_index.shape[0]
        rows = torch.arange(batch, device=self.device)
        allowed = key_index[None, :] <= positions[:, None]  # (batch, length)
        group = self.heads // self.kv_heads
        # added to the scores (batch, kv_heads, group, length): -inf past each row's position, ALiBi's bias
        if self.alibi:  # heads == kv_heads, group 1
            distance = (positions[:, None] - key_index[None, :]).clamp(min=0).to(torch.float32)
            bias = (-self.slopes[None, :, None] * distance[:, None, :]).to(self.dtype).float()
            additive = torch.where(allowed[:, None], bias, float("-inf"))[:, :, None]
            cos = sin = None
        else:
            additive = torch.where(allowed, 0.0, float("-inf"))[:, None, None]
            cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]

        def attend(index, layer, x):
            q, k, v = self._qkv(index, layer, x)
            if cos is not None:
                q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            keys, values = self.keys[index], self.values[index]
            keys[rows, :, positions] = k[:, :, 0]
            values[rows, :, positions] = v[:, :, 0]
            # GQA: the `group` query heads of one kv head act as its query length, so K/V are never repeated.
            q = q.reshape(batch * self.kv_heads, group, self.head_dim)
            # two batched matrix products and a float32 softmax (as SDPA's math): compiled, these beat the fused SDPA
            # kernels for a single query (measured on an H200: 1.98 vs 2.24 ms per Qwen2-1.5B step at batch 1).
            # The cache is read through a view of fixed shape, sliced (matmul would reshape the strided slice, and
            # the guards of that reshape compiled the step again for new lengths).
            shape = (self.slots * self.kv_heads, self.max_len + 1, self.head_dim)
            k_read = keys.view(shape)[:batch * self.kv_heads, :length]
            v_read = values.view(shape)[:batch * self.kv_heads, :length]
            scores = torch.bmm(q, k_read.transpose(1, 2)).float() * self.head_dim ** -0.5
            probs = (scores.view(batch, self.kv_heads, group, length) + additive).softmax(-1).to(q.dtype)
            out = torch.bmm(probs.view(batch * self.kv_heads, group, length), v_read)
            return layer.self_attn.o_proj(out.reshape(batch, 1, -1))

        h = self._run_layers(self.model.get_input_embeddings()(tokens[:, None]), attend)
        return self._final(h)[:, 0]


def _sdpa_backends():
    """Flash / memory-efficient / math only: cuDNN attention re-plans for every new shape (see modeling_baichuan).
    Inside torch.compile a no-op: `compiled_decode` sets it around the compiled call, where tracing picks the kernel."""
    from ..models.baichuan.modeling_baichuan import SDPA_BACKENDS
    from torch.nn.attention import sdpa_kernel

    if torch.compiler.is_compiling():
        return contextlib.nullcontext()

    return sdpa_kernel(SDPA_BACKENDS)
