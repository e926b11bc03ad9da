"""The generation engine (novelkit/generation/engine.py) on tiny random models in fp32 on CPU: greedy tokens equal to
transformers' `generate` for Llama (and Llama 3's RoPE scaling), Qwen2 (GQA, qkv bias, tied embeddings), Qwen3 (q/k
RMSNorm) and every Baichuan position/head variant,
mixed-length batches, requests joining mid-way, stops, streaming, and sampling filters equal to HF's processors."""

from pathlib import Path

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)

from novelkit.generation import sampling
from novelkit.generation.engine import Detokenizer, Engine, Request
from novelkit.generation.sampling import Sampler, SamplingParams, hf_generate_kwargs, penalize_repetition, warp
from tests.tiny_baichuan import random_model

VOCAB = 1000


def _hf_model(kind):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256, initializer_range=0.15)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=4))
    elif kind == "llama3":  # Llama 3's RoPE scaling, with a short original context so that it changes the angles
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16, "rope_theta": 500000.0}))
    elif kind == "qwen3":  # per-head q/k RMSNorm, head_dim apart from hidden / heads
        model = Qwen3ForCausalLM(Qwen3Config(**common, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True))
        with torch.no_grad():  # the norms start at ones: make them matter
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.normal_(1, 0.5)
                layer.self_attn.k_norm.weight.normal_(1, 0.5)
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True))
        with torch.no_grad():  # Qwen2 initialises biases to zero: make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model.eval()


MODELS = {
    "llama": lambda: _hf_model("llama"),
    "qwen2": lambda: _hf_model("qwen2"),
    "qwen3": lambda: _hf_model("qwen3"),
    "llama3": lambda: _hf_model("llama3"),
    "baichuan-7b": lambda: random_model("baichuan-7b"),
    "baichuan-13b": lambda: random_model("baichuan-13b"),
    "baichuan2-7b": lambda: random_model("baichuan2-7b"),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return MODELS[request.param]()


def _prompts(count, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 11, 7, 20, 1, 15][:count]
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(model, prompt, new):
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_tokens_equal_generate_for_a_mixed_length_batch(model):
    prompts = _prompts(6)
    engine = Engine(model, max_batch=4, max_len=64)  # 6 requests on 4 slots: two join when others leave
    requests = [Request(p, max_new_tokens=12 + 3 * i) for i, p in enumerate(prompts)]
    engine.run(requests)
    for r in requests:
        assert r.tokens == _hf_greedy(model, r.prompt, r.max_new_tokens)
        assert r.finish_reason == "length"


def test_a_request_joining_mid_way_gets_the_tokens_it_gets_alone(model):
    first, second = _prompts(2, seed=5)
    alone = Engine(model, max_batch=2, max_len=64).run([Request(second, max_new_tokens=10)])[0].tokens
    engine = Engine(model, max_batch=2, max_len=64)
    a = engine.add(Request(first, max_new_tokens=20))
    for _ in range(5):
        engine.step()
    b = engine.add(Request(second, max_new_tokens=10))
    while engine.busy:
        engine.step()
    assert b.tokens == alone
    assert a.tokens == _hf_greedy(model, first, 20)


def test_repetition_penalty_gives_generates_tokens():
    model = MODELS["qwen2"]()
    prompt = _prompts(1)[0]
    ids = torch.tensor([prompt])
    expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=15,
                              do_sample=False, repetition_penalty=1.3, eos_token_id=None, pad_token_id=0)
    r = Engine(model, max_batch=2, max_len=64).run(
        [Request(prompt, 15, SamplingParams(repetition_penalty=1.3))])[0]
    assert r.tokens == expected[0, len(prompt):].tolist()


def test_prompt_bias_gives_generates_tokens_and_copies_more():
    """encoder_repetition_penalty > 1 (HF's name; for a decoder-only model its "encoder input" is the prompt)
    favours the prompt's tokens, alone and together with the repetition penalty, in one batch."""
    model = MODELS["qwen2"]()
    prompt = _prompts(1)[0]
    ids = torch.tensor([prompt])
    settings = [(3.0, 1.0), (2.0, 1.3), (1.0, 1.0)]
    expected = [model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=15, do_sample=False,
                               encoder_repetition_penalty=erp, repetition_penalty=rp, eos_token_id=None,
                               pad_token_id=0)[0, len(prompt):].tolist() for erp, rp in settings]
    got = Engine(model, max_batch=3, max_len=64).run(
        [Request(prompt, 15, SamplingParams(encoder_repetition_penalty=erp, repetition_penalty=rp))
         for erp, rp in settings])
    assert [r.tokens for r in got] == expected
    copied = [sum(t in prompt for t in tokens) for tokens in expected]
    assert copied[0] > copied[2]  # the bias made the greedy output take more of the prompt's tokens


def test_repetition_penalty_on_generated_tokens_only_gives_hfs_prompt_ignore_length():
    """penalize_prompt=False: HF's RepetitionPenaltyLogitsProcessor(prompt_ignore_length=len(prompt)), beside the
    prompt bias, in the engine and through `hf_generate_kwargs` (the fallback's way into `generate`)."""
    model = MODELS["qwen2"]()
    base = _prompts(1)[0]
    prompt = base + Engine(model, max_batch=1, max_len=64).run([Request(base, 12)])[0].tokens  # what it would say
    ids = torch.tensor([prompt])
    settings = [dict(repetition_penalty=1.5, penalize_prompt=False),
                dict(repetition_penalty=1.5, penalize_prompt=False, encoder_repetition_penalty=2.0),
                dict(repetition_penalty=1.5)]
    expected = [model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None,
                               pad_token_id=0, **hf_generate_kwargs(dict(max_new_tokens=15, **s), len(prompt))
                               )[0, len(prompt):].tolist() for s in settings]
    got = Engine(model, max_batch=3, max_len=64).run([Request(prompt, 15, SamplingParams(**s)) for s in settings])
    assert [r.tokens for r in got] == expected
    assert sum(t in prompt for t in expected[0]) > sum(t in prompt for t in expected[2])  # the prompt's tokens stay


def test_sampling_filters_equal_hf_processors_row_by_row():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, VOCAB, generator=g) * 3
    ids = torch.randint(0, VOCAB, (4, 9), generator=g)
    settings = [(0.7, 50, 0.9, 1.2), (1.0, 0, 0.5, 1.0), (1.3, 5, 1.0, 0.8), (1.0, 0, 1.0, 1.0)]
    seen = torch.zeros(4, VOCAB, dtype=torch.bool)
    seen[torch.arange(4)[:, None], ids] = True
    col = lambda i, dtype=torch.float32: torch.tensor([[s[i]] for s in settings], dtype=dtype)  # noqa: E731
    ours = warp(penalize_repetition(logits, seen, col(3)), col(0), col(1, torch.long), col(2))
    for row, (temperature, top_k, top_p, penalty) in enumerate(settings):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(ids[row:row + 1], logits[row:row + 1].clone())
        if temperature != 1.0:
            expected = TemperatureLogitsWarper(temperature)(ids[row:row + 1], expected)
        if top_k:
            expected = TopKLogitsWarper(top_k)(ids[row:row + 1], expected)
        if top_p < 1.0:
            expected = TopPLogitsWarper(top_p)(ids[row:row + 1], expected)
        assert torch.equal(ours[row:row + 1], expected), row
    assert (ours[1] > -float("inf")).sum() < VOCAB // 2  # the filters did cut


def _hf_filtered(logits, temperature, top_k, top_p):
    ids = torch.zeros(1, 1, dtype=torch.long)
    out = TemperatureLogitsWarper(temperature)(ids, logits[None].clone()) if temperature != 1.0 else logits[None]
    if top_k:
        out = TopKLogitsWarper(top_k)(ids, out)
    if top_p < 1.0:
        out = TopPLogitsWarper(top_p)(ids, out)
    return out[0]


def test_chunked_row_reductions_equal_whole_row_ones(monkeypatch):
    """The sampler's reductions split the vocabulary into chunks (sampling.SPLIT): same maxima, sums, top-k and
    argmax, the first of tied maxima included."""
    monkeypatch.setattr(sampling, "MIN_CHUNK", 16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 480, generator=g).round(decimals=1)  # many ties
    x[1, 100:] = -float("inf")
    x[2, 17] = x[2, 300] = x[2].max() + 1  # a tie for the top across chunks
    assert sampling._chunked(x).shape == (5, 30, 16)
    assert torch.equal(sampling.row_argmax(x), x.argmax(dim=-1)) and sampling.row_argmax(x)[2] == 17
    assert torch.equal(sampling.row_max(x), x.amax(dim=-1, keepdim=True))
    assert torch.allclose(sampling.row_softmax(x), x.softmax(dim=-1), atol=1e-6)
    finite = x.clamp(min=-10)
    assert torch.allclose(sampling.row_sum(finite), finite.sum(dim=-1, keepdim=True), atol=1e-4)
    for k in (1, 4, 40):
        values, indices = sampling.row_topk(x, k)
        assert torch.equal(values, x.topk(k, dim=-1).values)
        assert torch.equal(x.gather(-1, indices), values)


@pytest.mark.parametrize("min_chunk", [1024, 8])  # whole rows; the vocabulary of 40 in 5 chunks
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.8, 0, 0.7), (1.2, 10, 0.9), (1.0, 5, 1.0), (0.7, 0, 0.3)])
def test_the_sorting_free_draw_has_the_distribution_of_hfs_filters(temperature, top_k, top_p, min_chunk,
                                                                     monkeypatch):
    """50,000 draws of one row through Sampler.choose (and `redraw` for its misses): never a token HF's filters
    remove, and frequencies within 0.02 total variation of HF's filtered probabilities."""
    monkeypatch.setattr(sampling, "MIN_CHUNK", min_chunk)
    torch.manual_seed(0)
    vocab, n = 40, 50_000
    base = torch.randn(vocab, generator=torch.Generator().manual_seed(3)) * 2
    expected = _hf_filtered(base, temperature, top_k, top_p).softmax(-1)
    sampler = Sampler(n, vocab, "cpu")
    params = SamplingParams(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    sampler.params = [params] * n
    sampler.do_sample[:] = True
    sampler.temperature[:], sampler.top_k[:], sampler.top_p[:] = temperature, top_k, top_p
    mode, penalty, seeded = sampler.needs(range(n))
    assert mode == ("nucleus_top_k" if top_k else "nucleus") and not penalty and not seeded
    chosen, logits = sampler.choose(base.expand(n, vocab).clone(), slice(0, n), mode, penalty)
    missed = (chosen < 0).nonzero()[:, 0].tolist()
    if missed:
        chosen[missed] = sampler.redraw(logits[missed], missed)
    if top_p <= 0.3:
        assert len(missed) > 1000  # (1 - top_p) ** CANDIDATES of the draws: the redraw path ran
    freq = torch.bincount(chosen, minlength=vocab).float() / n
    assert freq[expected == 0].sum() == 0
    assert 0.5 * (freq - expected).abs().sum() < 0.02


def test_missed_draws_are_drawn_again_inside_the_nucleus(monkeypatch):
    """With one candidate per draw and top_p 0.4 most draws miss: every token the engine makes still lies in
    the set HF's top-p keeps for that step's logits."""
    monkeypatch.setattr(sampling, "CANDIDATES", 1)
    model = MODELS["llama"]()
    engine = Engine(model, max_batch=2, max_len=64)
    params = SamplingParams(do_sample=True, temperature=0.5, top_p=0.4)
    requests = engine.run([Request(p, 12, params) for p in _prompts(2)])
    assert engine.redraws > 5
    for r in requests:
        with torch.no_grad():
            logits = model(torch.tensor([r.prompt + r.tokens])).logits[0, len(r.prompt) - 1:-1]
        for step, token in enumerate(r.tokens):
            assert _hf_filtered(logits[step], 0.5, 0, 0.4)[token] > -float("inf"), step


def test_each_step_is_launched_before_the_previous_ones_tokens_are_read():
    """The host reads step n's token while the device runs step n + 1 (launched first), and a request that ends by
    length costs no step past its last token: 9 decode steps for 10 tokens (the first comes from the prefill)."""
    engine = Engine(MODELS["qwen2"](), max_batch=2, max_len=64)
    request = Request(_prompts(1)[0], max_new_tokens=10)
    read_at_launch = []
    decode_step = engine._decode_step
    engine._decode_step = lambda *args, **kwargs: (read_at_launch.append(len(request.tokens)),
                                                   decode_step(*args, **kwargs))[1]
    engine.run([request])
    assert read_at_launch == [1, 1, 2, 3, 4, 5, 6, 7, 8]
    assert len(request.tokens) == 10


def test_missed_draws_under_a_repetition_penalty_count_only_the_rows_own_tokens(monkeypatch):
    """As above with a repetition penalty. The step launched before a miss is drawn again (engine._collect) marks a
    token of its own for that row; the row's marks are set again from its tokens, so every token lies in the set
    HF keeps from the logits penalised for the row's own prompt and tokens."""
    monkeypatch.setattr(sampling, "CANDIDATES", 1)
    model = MODELS["llama"]()
    engine = Engine(model, max_batch=3, max_len=64)
    params = SamplingParams(do_sample=True, temperature=0.5, top_p=0.4, repetition_penalty=5.0)
    requests = [engine.add(Request(p, 16, params)) for p in _prompts(3, seed=4)]
    while engine.busy:
        engine.step()
        for slot, seq in engine.active.items():  # marked: its own tokens, and the one of a step not read yet
            marked = set(engine.sampler.seen[slot].nonzero()[:, 0].tolist())
            own = set(seq.request.prompt) | set(seq.request.tokens)
            assert own <= marked and len(marked - own) <= seq.ahead
    assert engine.redraws > 10
    for r in requests:
        ids = r.prompt + r.tokens
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        for step, token in enumerate(r.tokens):
            at = len(r.prompt) + step
            penalised = RepetitionPenaltyLogitsProcessor(5.0)(torch.tensor([ids[:at]]), logits[at - 1][None])[0]
            assert _hf_filtered(penalised, 0.5, 0, 0.4)[token] > -float("inf"), step


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "baichuan2-7b"])
def test_frozen_weights_give_the_same_tokens_and_leave_the_model_as_it_was(kind):
    model = MODELS[kind]()
    ids = torch.tensor([_prompts(1)[0]])
    with torch.no_grad():
        before = model(ids).logits
    prompts = _prompts(3)
    expected = [_hf_greedy(model, p, 10) for p in prompts]
    engine = Engine(model, max_batch=3, max_len=64, frozen=True)
    assert all(engine.cached.gate_up) and all(engine.cached.qkv) == (kind != "baichuan2-7b")
    assert (engine.cached.head is model.lm_head) == (kind != "baichuan2-7b")  # NormHead: norms computed once
    assert [r.tokens for r in engine.run([Request(p, 10) for p in prompts])] == expected
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    mlp = model.model.layers[0].mlp  # the module's weights are views of the fused one: no second copy
    assert mlp.up_proj.weight.data_ptr() == engine.cached.gate_up[0][0][mlp.gate_proj.out_features:].data_ptr()


def test_lora_wrapped_projections_are_not_fused():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(MODELS["llama"](), LoraConfig(r=4, target_modules=["q_proj"]))
    engine = Engine(model, max_batch=2, max_len=64, frozen=True)
    assert not any(engine.cached.qkv) and all(engine.cached.gate_up)
    prompt = _prompts(1)[0]
    assert engine.run([Request(prompt, 8)])[0].tokens == _hf_greedy(model, prompt, 8)


def test_seeded_sampling_repeats_and_differs_by_seed():
    model = MODELS["baichuan2-7b"]()
    prompt = _prompts(1)[0]
    engine = Engine(model, max_batch=4, max_len=64)
    params = lambda seed: SamplingParams(do_sample=True, temperature=1.5, top_p=0.95, seed=seed)  # noqa: E731
    a, b, c = engine.run([Request(prompt, 20, params(1)), Request(prompt, 20, params(1)),
                          Request(prompt, 20, params(2))])
    assert a.tokens == b.tokens != c.tokens


class _CharTokenizer:
    """Token t < 256: byte t (UTF-8 pieces of a character arrive one token at a time); 256+ are special."""

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return bytes(t for t in ids if t < 256).decode("utf-8", errors="replace")


def test_stop_ids_stop_strings_and_streaming_pieces():
    model = MODELS["llama"]()
    prompt = _prompts(1)[0]
    free = _hf_greedy(model, prompt, 30)
    stop = free[6]
    r = Engine(model, max_batch=2, max_len=64).run([Request(prompt, 30, stop_ids=[stop])])[0]
    assert r.finish_reason == "stop" and r.tokens == free[:free.index(stop) + 1]
    ignored = Engine(model, max_batch=2, max_len=64).run([Request(prompt, 30, stop_ids=[stop], ignore_eos=True)])[0]
    assert ignored.tokens == free and ignored.finish_reason == "length"

    tokenizer = _CharTokenizer()
    text = tokenizer.decode(free).rstrip("\ufffd")  # a response never ends in half a character
    pieces = []
    streamed = Engine(model, tokenizer, max_batch=2, max_len=64).run(
        [Request(prompt, 30, on_text=pieces.append)])[0]
    assert "".join(pieces) == streamed.text == text
    stop_string = text[len(text) // 2:len(text) // 2 + 2]
    pieces = []
    cut = Engine(model, tokenizer, max_batch=2, max_len=64).run(
        [Request(prompt, 30, stop_strings=[stop_string], on_text=pieces.append)])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == text[:text.find(stop_string)] == "".join(pieces)


def test_streamed_pieces_never_split_a_character_or_show_a_stop_string_start():
    text = "雨下了一整夜。END他出门"
    pieces = []
    detokenizer = Detokenizer(_CharTokenizer(), ["END"], pieces.append)
    hit_at = None
    for i, byte in enumerate(text.encode()):
        if detokenizer.add(byte):
            hit_at = i
            break
        assert "".join(pieces) == detokenizer.text[:len("".join(pieces))]
        assert "\ufffd" not in "".join(pieces) and "E" not in "".join(pieces)
    assert hit_at == len("雨下了一整夜。END".encode()) - 1
    assert detokenizer.close() == "".join(pieces) == "雨下了一整夜。"


def test_a_response_that_ends_inside_a_character_drops_the_partial_character():
    """max_new_tokens reached after the first byte-fallback piece of a multi-byte character: the text (streamed or
    not) ends before that character instead of in U+FFFD, and the request still holds every generated token."""
    pieces = []
    detokenizer = Detokenizer(_CharTokenizer(), [], pieces.append)
    for byte in "雨下了".encode()[:-1]:
        detokenizer.add(byte)
    assert detokenizer.close() == "".join(pieces) == "雨下"

    model, tokenizer = MODELS["llama"](), _CharTokenizer()
    # a greedy continuation with a lead byte (0xc2-0xf4) among its tokens: cut just after it
    cases = [(prompt, free[:free.index(t) + 1]) for prompt in _prompts(6, seed=3)
             for free in [_hf_greedy(model, prompt, 40)] for t in free if 0xC2 <= t <= 0xF4]
    assert cases, "no generated lead byte to cut after"
    prompt, tokens = cases[0]
    assert tokenizer.decode(tokens).endswith("\ufffd")
    for streaming in (False, True):
        pieces = []
        r = Engine(model, tokenizer, max_batch=2, max_len=64).run(
            [Request(prompt, len(tokens), on_text=pieces.append if streaming else None)])[0]
        assert r.finish_reason == "length" and r.tokens == tokens
        assert r.text == tokenizer.decode(tokens).rstrip("\ufffd") and not r.text.endswith("\ufffd")
        if streaming:
            assert "".join(pieces) == r.text


def test_too_long_requests_are_refused():
    engine = Engine(MODELS["llama"](), max_batch=2, max_len=32)
    with pytest.raises(ValueError, match="maximum length of 32"):
        engine.add(Request(list(range(3, 23)), max_new_tokens=13))
    assert not engine.busy


def test_an_architecture_without_a_fast_path_goes_through_generate(capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    engine = Engine(model, max_batch=2, max_len=64)
    assert "gpt2" in engine.problem
    assert "fast path unavailable (model type 'gpt2'" in capsys.readouterr().out  # one line says why
    prompt = _prompts(1)[0]
    r = engine.run([Request(prompt, 8)])[0]
    assert r.tokens == _hf_greedy(model, prompt, 8) and r.finish_reason == "length"
    # the copy settings reach `generate` too (the prompt bias as its keyword, the penalty on generated tokens only
    # as a processor), and change what it writes
    settings = dict(encoder_repetition_penalty=3.0, repetition_penalty=1.5, penalize_prompt=False)
    ids = torch.tensor([prompt])
    expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None,
                              pad_token_id=0, **hf_generate_kwargs(dict(max_new_tokens=8, **settings), len(prompt)))
    biased = engine.run([Request(prompt, 8, SamplingParams(**settings))])[0].tokens
    assert biased == expected[0, len(prompt):].tolist() != r.tokens


def test_qwen3_with_sliding_window_layers_falls_back_and_says_so(capsys):
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, use_sliding_window=True,
                         sliding_window=4, max_window_layers=1)
    model = Qwen3ForCausalLM(config).eval()
    engine = Engine(model, max_batch=2, max_len=64)
    assert "sliding-window attention" in capsys.readouterr().out
    prompt = _prompts(4)[3]  # 20 tokens: longer than the window, so the window matters
    assert engine.run([Request(prompt, 8)])[0].tokens == _hf_greedy(model, prompt, 8)


def test_the_compiled_decode_step_gives_the_same_tokens():
    """The decode step through torch.compile (inductor's CPU backend here; on CUDA it is the default) on a
    mixed-length batch whose cache length grows every step: one compilation (batch and length dynamic), equal
    tokens."""
    import time

    import torch._dynamo

    model = MODELS["qwen2"]()
    prompts = _prompts(3)
    engine = Engine(model, max_batch=3, max_len=64, compile=True)
    assert engine.compiled is not None and engine.slots == 3
    start = time.perf_counter()
    torch._dynamo.reset()
    engine.warm_up()
    requests = engine.run([Request(p, max_new_tokens=10) for p in prompts])
    if engine.compiled is None:
        pytest.fail("torch.compile fell back to the uncompiled step")
    for r in requests:
        assert r.tokens == _hf_greedy(model, r.prompt, 10)
    # the compiled sorting-free draw (and fused weights, the default with compile): tokens inside the nucleus
    sampled = engine.run([Request(p, 8, SamplingParams(do_sample=True, temperature=0.5, top_p=0.4)) for p in prompts])
    assert engine.compiled is not None and all(engine.cached.qkv)
    for r in sampled:
        with torch.no_grad():
            logits = model(torch.tensor([r.prompt + r.tokens])).logits[0, len(r.prompt) - 1:-1]
        assert all(_hf_filtered(logits[i], 0.5, 0, 0.4)[t] > -float("inf") for i, t in enumerate(r.tokens))
    single = Engine(model, max_batch=1, max_len=64, compile=True)  # one request still decodes with batch 2
    assert single.slots == 2
    assert single.run([Request(prompts[0], max_new_tokens=5)])[0].tokens == requests[0].tokens[:5]
    assert single.compiled is not None
    print(f"compiled path: {time.perf_counter() - start:.1f} s")


@pytest.mark.parametrize("kind", ["qwen2", "baichuan-13b"])  # RoPE and GQA; ALiBi
def test_one_compilation_serves_every_length_and_batch(kind):
    """On CUDA each (batch, length) bucket is a graph of its own and a compilation of the decode step costs about a
    minute on an H200: one compilation serves lengths up to the whole cache and every batch size."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    engine = Engine(MODELS[kind](), max_batch=3, max_len=192, compile=True)
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        for batch in (2, 3):
            for length in (64, 128, 192):
                engine.compiled(engine.token_buffer[:batch], engine.position_buffer[:batch], length)
    assert counters["stats"]["unique_graphs"] - before == 1


def test_the_compiled_step_marker_changes_with_the_steps_code(tmp_path, monkeypatch):
    """A job decides whether compiling pays from whether the step was compiled before (compile_cache.compiled_before):
    after an update of the step's code the marker must not say so."""
    from novelkit import compile_cache

    config = MODELS["qwen2"]().config
    assert all((Path(compile_cache.__file__).parent / name).is_file() for name in compile_cache.STEP_SOURCES)
    source = tmp_path / "engine_model.py"
    source.write_text("step, version 1")
    monkeypatch.setattr(compile_cache, "STEP_SOURCES", (str(source),))
    key = compile_cache.step_key(config, torch.float32, "cpu", True)
    assert compile_cache.step_key(config, torch.float32, "cpu", True) == key
    source.write_text("step, version 2")
    assert compile_cache.step_key(config, torch.float32, "cpu", True) != key


def test_kv_cache_is_fitted_to_free_gpu_memory(monkeypatch):
    from novelkit.errors import ConfigError
    from novelkit.generation.engine import fit_cache_in_memory

    model = random_model("baichuan2-7b")  # 2 layers, 4 heads x 16 dims, fp32: 2 x 2 x 64 x 4 bytes per token
    per_slot = 2 * 2 * 64 * 4 * 100
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(3.5 * per_slot / 0.9), 0))
    assert fit_cache_in_memory(model, 16, 100) == 3
    assert fit_cache_in_memory(model, 2, 100) == 2
    assert fit_cache_in_memory(model, 16, 100, spare=1) == 2
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (per_slot // 2, 0))
    with pytest.raises(ConfigError, match="lower --max_len"):
        fit_cache_in_memory(model, 16, 100)


@pytest.mark.gpu
def test_on_cuda_graph_replays_draw_fresh_noise_with_the_filters_distribution():
    """On CUDA the draw (noise included) is compiled and captured in a CUDA graph: each replay must draw anew.
    With every embedding row equal, the logits are the same at every step, so a replay that reused its noise would
    repeat its slot's token; the tokens must vary and follow HF's filtered probabilities."""
    model = MODELS["llama"]().cuda()
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = model.model.embed_tokens.weight[0]
        logits = model(torch.tensor([[5]], device="cuda")).logits[0, -1].float().cpu()
    expected = _hf_filtered(logits, 0.3, 0, 0.8).softmax(-1)
    assert (expected > 0.05).sum() >= 3  # a nucleus of several likely tokens
    engine = Engine(model, max_batch=64, max_len=64)
    assert engine.cuda_graphs and engine.compiled is not None
    params = SamplingParams(do_sample=True, temperature=0.3, top_p=0.8)
    runs = [engine.run([Request([5, 6, 7], 9, params) for _ in range(64)]) for _ in range(3)]
    assert engine.graphs and engine.compiled is not None  # tokens 2..9 came from replays of the compiled step
    replayed = torch.tensor([r.tokens[1:] for run in runs for r in run])  # (192, 8)
    varied = sum(len(set(row.tolist())) > 1 for row in replayed)
    assert varied > 150, varied
    freq = torch.bincount(replayed.flatten(), minlength=VOCAB).float() / replayed.numel()
    assert freq[expected == 0].sum() == 0
    assert 0.5 * (freq - expected).abs().sum() < 0.06


@pytest.mark.gpu
def test_on_cuda_one_compilation_serves_every_length_bucket():
    """On CUDA inductor's matmul padding pass guarded the cache length to the warm-up's range (7 <= length <= 127) and
    the step was compiled again at 128 and 192, up to a minute each on a 1.5B model. After the warm-up, decoding up
    to the whole cache adds no compilation. (Passed on the H200, torch 2.11, Qwen2-1.5B layer sizes: 4 graphs after
    the warm-up, 4 after lengths 128-320; 6 before the fix.)"""
    from torch._dynamo.utils import counters

    config = Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=2, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096)
    model = Qwen2ForCausalLM(config).to("cuda", torch.bfloat16).eval()
    engine = Engine(model, max_batch=4, max_len=320)
    torch._dynamo.reset()
    engine.warm_up()
    after_warm_up = counters["stats"]["unique_graphs"]
    done = engine.run([Request(list(range(100, 164)), 256, ignore_eos=True) for _ in range(2)])
    assert [len(r.tokens) for r in done] == [256, 256]
    assert {key[1] for key in engine.graphs} >= {128, 192, 256, 320}
    assert counters["stats"]["unique_graphs"] == after_warm_up


def test_length_buckets_are_few_and_waste_at_most_an_eighth_or_64():
    from novelkit.generation.engine import length_bucket

    buckets = {n: length_bucket(n, 4096) for n in range(1, 4097)}
    assert len(set(buckets.values())) == 32
    assert all(n <= b <= max(n + 63, n * 9 / 8) for n, b in buckets.items())
    assert length_bucket(5000, 4096) == 4096 and length_bucket(70, 100) == 100
