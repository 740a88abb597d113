"""The engine's forward pass against transformers' own LlamaForCausalLM on the same weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from evalsuite.engine.cache import KVCache
from evalsuite.engine.config import ModelConfig
from evalsuite.engine.load import load_folder
from evalsuite.engine.model import Step

from .conftest import tiny_hf_config


def _hf_logits(hf, tokens):
    with torch.no_grad():
        return hf(tokens).logits


def test_logits_match_transformers_float32(tiny, hf_tiny):
    torch.manual_seed(1)
    tokens = torch.randint(0, 400, (2, 300))  # past the 64-token original context of the rope scaling
    ours = tiny.model(tokens)
    ref = _hf_logits(hf_tiny, tokens)
    assert ref.abs().max() > 1.0  # a real signal, not near-zero logits
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ["qwen2", "qwen2-window", "qwen3", "mistral", "mistral-window", "phi3",
                                  "phi3-longrope", "qwen3-yarn", "gemma2", "gemma3", "mixtral", "qwen2_moe",
                                  "qwen3_moe", "gpt_oss", "granite", "smollm3", "smollm3-window", "olmo2", "olmo3",
                                  "tied"])
def test_other_architectures_match_transformers(arch, tmp_path):
    import transformers

    torch.manual_seed(2)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        hf = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # biases start at zero: make them matter
            for layer in hf.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    elif arch in ("qwen3", "qwen3-yarn"):  # q/k head norms; head_dim 32 with 4 heads: q is twice the hidden size
        yarn = {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                    "original_max_position_embeddings": 64}} if arch == "qwen3-yarn" else {}
        cfg = transformers.Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                       max_position_embeddings=256, tie_word_embeddings=True, **yarn)
        hf = transformers.Qwen3ForCausalLM(cfg)
        with torch.no_grad():  # the norms start at one: make them matter
            for layer in hf.model.layers:
                layer.self_attn.q_norm.weight.normal_(1, 0.5)
                layer.self_attn.k_norm.weight.normal_(1, 0.5)
    elif arch == "qwen2-window":  # a sliding window on the layers from max_window_layers on (here the second)
        cfg = transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                       use_sliding_window=True, sliding_window=12, max_window_layers=1)
        hf = transformers.Qwen2ForCausalLM(cfg)
    elif arch.startswith("mistral"):  # the window: each token sees its last 12 positions of the 40
        cfg = transformers.MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                                         sliding_window=12 if arch == "mistral-window" else None)
        hf = transformers.MistralForCausalLM(cfg)
    elif arch.startswith("phi3"):  # fused qkv_proj and gate_up_proj; a sliding window shorter than the tokens
        kw = {"sliding_window": 16} if arch == "phi3" else {  # Phi-3.5-mini's kind: LongRoPE, here on 3/4 of each head
            "partial_rotary_factor": 0.75, "max_position_embeddings": 1024, "original_max_position_embeddings": 128,
            "rope_scaling": {"type": "longrope", "short_factor": [1.0 + 0.5 * i for i in range(6)],
                             "long_factor": [4.0 + i for i in range(6)]}}
        cfg = transformers.Phi3Config(**{"vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
                                         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                         "max_position_embeddings": 256, "pad_token_id": 0, **kw})
        hf = transformers.Phi3ForCausalLM(cfg)
    elif arch == "gemma3":  # its own norms, GeGLU, scaled embeddings and queries, per-layer RoPE, windows
        from .conftest import tiny_gemma3

        hf = tiny_gemma3(vocab=300)
    elif arch in ("mixtral", "qwen2_moe", "qwen3_moe"):  # mixtures of experts (Qwen's with a dense layer among them)
        from .conftest import tiny_moe

        hf = tiny_moe(arch, vocab=300)
    elif arch == "gemma2":  # Gemma 3's layer without q/k norms, one RoPE base, scores and logits capped
        from .conftest import tiny_gemma2

        hf = tiny_gemma2(vocab=300)
    elif arch == "gpt_oss":  # sinks, biases, YaRN, top-k softmax routing, clamped experts, windows of 8
        from .conftest import tiny_gpt_oss

        hf = tiny_gpt_oss(vocab=300)
    elif arch == "granite":  # embedding, residual, attention and logit multipliers; MLP biases
        from .conftest import tiny_granite

        hf = tiny_granite(vocab=300)
    elif arch.startswith("smollm3"):  # every other layer without RoPE; those sliding over 12 in -window
        from .conftest import tiny_smollm3

        hf = tiny_smollm3(window=12 if arch == "smollm3-window" else None, vocab=300)
    elif arch.startswith("olmo"):  # post-norms only, q/k norms over all heads; OLMo 3: windows, YaRN on layer 3
        from .conftest import tiny_olmo

        hf = tiny_olmo(arch, vocab=300)
    else:
        hf = transformers.LlamaForCausalLM(tiny_hf_config(tie_word_embeddings=True, rope_parameters=None,
                                                          rope_theta=500.0))
    if arch not in ("qwen2", "gemma2", "gemma3", "mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "granite") and \
            not arch.startswith(("smollm3", "olmo")):
        with torch.no_grad():  # weights large enough that positions (RoPE, the window) move the logits
            for w in hf.parameters():
                w.normal_(0, 0.2) if w.dim() == 2 else None
    hf.eval().save_pretrained(tmp_path)
    model = load_folder(tmp_path, torch.float32)
    tokens = torch.randint(0, 300, (2, 40))
    assert (model(tokens) - _hf_logits(hf, tokens)).abs().max().item() <= 1e-4
    # the parameter count the planner uses is transformers' own
    assert model.config.num_parameters() == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("arch", ["granite", "gemma2", "gpt_oss", "olmo2"])
def test_norms_round_as_transformers_in_bfloat16(arch, tmp_path):
    """Where each norm rounds to BF16 decides its last bits: Llama's (Granite's) before the weight,
    Gemma's after 1 + weight in float32, gpt-oss's and OLMo's after the weight in float32 (OLMo's
    q/k norms over all heads too). Bit for bit against transformers' own modules."""
    from . import conftest

    hf = getattr(conftest, "tiny_olmo" if arch == "olmo2" else f"tiny_{arch}")(vocab=300).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    model = load_folder(tmp_path, torch.bfloat16)
    pairs = [("post_attention_layernorm", 64), ("model.norm", 64)]
    if arch == "olmo2":
        pairs += [("self_attn.q_norm", 64), ("self_attn.k_norm", 32), ("post_feedforward_layernorm", 64)]
    for name, width in pairs:
        path = name if name.startswith("model.") else f"model.layers.1.{name}"
        theirs, ours = hf.get_submodule(path), model.get_submodule(path)
        assert not torch.all(theirs.weight == theirs.weight[0])  # drawn, not the initial ones or zeros
        x = torch.randn(3, 7, width, generator=torch.Generator().manual_seed(0)).mul(4).to(torch.bfloat16)
        assert torch.equal(ours(x), theirs(x)), name


def test_kv_cache_decode_equals_full_forward(tiny):
    model = tiny.model
    torch.manual_seed(3)
    seq = torch.randint(0, 400, (2, 40))
    full = model(seq)
    cache = KVCache(model.config, 2, 64, torch.float32)
    prompt = 25
    h = model.hidden(seq[:, :prompt].reshape(1, -1), Step.for_prefill([prompt, prompt], cache))
    assert (model.logits(h).view(2, prompt, -1) - full[:, :prompt]).abs().max() <= 1e-4
    for pos in range(prompt, 40):
        positions = torch.full((2,), pos)
        h = model.hidden(seq[:, pos:pos + 1], Step.for_decode(positions, cache))
        assert (model.logits(h)[:, 0] - full[:, pos]).abs().max() <= 1e-4


def test_decode_rows_at_different_positions(tiny):
    """Two sequences of different lengths decode in one batch as they do alone."""
    model = tiny.model
    torch.manual_seed(4)
    a, b = torch.randint(0, 400, (1, 30)), torch.randint(0, 400, (1, 12))
    cache = KVCache(model.config, 2, 64, torch.float32)
    packed = torch.cat([a[:, :29], b[:, :11]], dim=1)
    model.hidden(packed, Step.for_prefill([29, 11], cache))
    step = Step.for_decode(torch.tensor([29, 11]), cache)
    assert step.chunks[0][3] is not None  # masked: the rows stand at different positions
    h = model.hidden(torch.stack([a[:, 29], b[:, 11]]), step)
    out = model.logits(h)[:, 0]
    assert (out[0] - model(a)[0, 29]).abs().max() <= 1e-4
    assert (out[1] - model(b)[0, 11]).abs().max() <= 1e-4


def test_decode_attention_in_chunks_reads_each_chunk_to_its_own_length(tiny, monkeypatch):
    """Five sequences of different lengths in chunks of two rows: each chunk reads the cache up to
    its own longest row, and every row decodes as it does alone."""
    from evalsuite.engine import model as engine_model

    monkeypatch.setattr(engine_model, "DECODE_CHUNK_ROWS", 2)
    model = tiny.model
    torch.manual_seed(5)
    lens = [31, 30, 17, 9, 9]
    seqs = [torch.randint(0, 400, (1, n + 1)) for n in lens]
    cache = KVCache(model.config, 5, 64, torch.float32)
    model.hidden(torch.cat([s[:, :n] for s, n in zip(seqs, lens)], dim=1), Step.for_prefill(lens, cache))
    step = Step.for_decode(torch.tensor(lens), cache)
    assert [(lo, hi, kv) for lo, hi, kv, _ in step.chunks] == [(0, 2, 32), (2, 4, 18), (4, 5, 10)]
    assert step.chunks[2][3] is None and step.kv_len == 32  # one row (one position): no mask
    out = model.logits(model.hidden(torch.stack([s[:, n] for s, n in zip(seqs, lens)]), step))[:, 0]
    for row, (s, n) in enumerate(zip(seqs, lens)):
        assert (out[row] - model(s)[0, n]).abs().max() <= 1e-4


class _Wrapped(nn.Module):
    """A stand-in for a recipe's replacement module: same math, different type."""

    def __init__(self, inner: nn.Linear, scale: float = 1.0):
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x):
        return self.inner(x) * self.scale


def test_swapped_linear_is_used(tiny_dir):
    model = load_folder(tiny_dir, torch.float32)
    tokens = torch.randint(0, 400, (1, 20))
    before = model(tokens)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    attn.k_proj = _Wrapped(attn.k_proj)
    mlp.up_proj = _Wrapped(mlp.up_proj)
    assert (model(tokens) - before).abs().max() <= 1e-5  # same math through the unfused path
    mlp.up_proj.scale = 0.5
    assert (model(tokens) - before).abs().max() > 1e-2  # and the swapped module really runs


def test_in_place_weight_edit_reaches_fused_path(tiny_dir):
    model = load_folder(tiny_dir, torch.float32)
    tokens = torch.randint(0, 400, (1, 20))
    before = model(tokens)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.mul_(0.0)
    assert (model(tokens) - before).abs().max() > 1e-2


def test_attention_hooks(tiny_dir):
    model = load_folder(tiny_dir, torch.float32)
    tokens = torch.randint(0, 400, (2, 30))
    ref = model(tokens)
    for layer in model.model.layers:  # identity quantizers force the explicit attention path
        a = layer.self_attn
        a.q_bmm_quant = a.k_bmm_quant = a.v_bmm_quant = a.softmax_quant = nn.Identity()
    assert (model(tokens) - ref).abs().max() <= 1e-4
    model.model.layers[0].self_attn.softmax_quant = _Wrapped(nn.Identity(), 0.5)
    assert (model(tokens) - ref).abs().max() > 1e-2
    model.model.layers[0].self_attn.softmax_quant = None
    model.model.layers[2].self_attn.k_cache_quant = _Wrapped(nn.Identity(), 0.0)
    assert (model(tokens) - ref).abs().max() > 1e-2


def test_prompt_longer_than_context(tiny):
    too_long = torch.zeros(1, 513, dtype=torch.long)
    with pytest.raises(ValueError, match="513 tokens exceeds the model's context of 512"):
        tiny.model(too_long)


def test_llama31_rope_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from evalsuite.engine.config import rope_inv_freq

    hf = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                     rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192})
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    ours = rope_inv_freq(ModelConfig.from_name("llama-3.1-8b"))
    assert torch.equal(ours, ref)


# Qwen3's long-context setting as its model cards give it, gpt-oss's (no truncation), DeepSeek's
# (mscale over mscale_all_dim, factor from the two lengths), and a partial rotary head
@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
     "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "factor": None, "mscale": 1.0, "mscale_all_dim": 0.707, "beta_fast": 16,
     "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "factor": 8.0, "attention_factor": 1.25, "partial_rotary_factor": 0.5,
     "original_max_position_embeddings": 8192}], ids=["qwen3", "gpt-oss", "mscale", "partial"])
def test_yarn_rope_frequencies_and_factor_match_transformers(rope):
    from transformers import Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from evalsuite.engine.config import rope_attention_factor, rope_inv_freq

    config = dict(hidden_size=1024, num_attention_heads=8, head_dim=128, max_position_embeddings=131072,
                  vocab_size=1000, num_hidden_layers=2, intermediate_size=256, num_key_value_heads=8)
    hf = Qwen3Config(**config, rope_parameters={"rope_theta": 150000.0, **rope})
    ref, attention = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    cfg = ModelConfig.from_hf({**config, "model_type": "qwen3", "rope_parameters": {"rope_theta": 150000.0, **rope}})
    assert torch.equal(rope_inv_freq(cfg), ref)
    assert rope_attention_factor(cfg) == pytest.approx(attention, rel=1e-12) and attention != 1.0
    # the frequencies move only where the ramp says: the fastest kept, the slowest divided by the factor
    base = 1.0 / (150000.0 ** (torch.arange(0, cfg.rotary_dim, 2).float() / cfg.rotary_dim))
    assert ref[0] == base[0] and torch.allclose(ref[-1], base[-1] / cfg.rope_scaling.factor)


@pytest.mark.parametrize("tied", [True, False])
def test_mistral3_with_vision_loads_its_text_model(tied, tmp_path):
    """Mistral Small 3.1 and later are published as vision-language models (model_type mistral3):
    a Mistral text model under language_model.* beside a Pixtral vision tower, its lm_head tied
    to the embeddings or not as the whole model's config says. The engine runs the text model; on
    text its logits are transformers' Mistral3ForConditionalGeneration's."""
    import json

    import transformers

    from evalsuite.engine.load import load_folder

    torch.manual_seed(14)
    text = {"model_type": "mistral", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "max_position_embeddings": 256, "rope_theta": 1000000000.0, "sliding_window": None}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 16, "head_dim": 16}
    hf = transformers.Mistral3ForConditionalGeneration(transformers.Mistral3Config(
        text_config=text, vision_config=vision, image_token_index=299, tie_word_embeddings=tied)).eval()
    with torch.no_grad():
        for w in hf.parameters():
            w.normal_(0, 0.15) if w.dim() == 2 else w.normal_(1, 0.3)
    hf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "mistral3"
    model = load_folder(tmp_path, torch.float32)
    assert model.config.architecture == "mistral" and model.config.rope_theta == 1e9
    tokens = torch.randint(0, 296, (2, 30))
    with torch.no_grad():
        want = hf(input_ids=tokens).logits
    assert (model(tokens) - want).abs().max().item() <= 1e-4
    assert model.config.tie_word_embeddings == tied
    assert model.config.num_parameters() == sum(p.numel() for p in hf.model.language_model.parameters()) + \
        (0 if tied else hf.lm_head.weight.numel())


def test_gemma3_with_vision_loads_its_text_model(tmp_path):
    """Gemma 3 from 4B up is published as a vision-language model (model_type gemma3): the text
    model's config holds only what differs from transformers' defaults and its tensors sit under
    language_model.*, beside a vision tower. The engine runs the text model; on text its logits
    are transformers' Gemma3ForConditionalGeneration's."""
    import json

    import transformers

    from evalsuite.engine.load import load_folder

    torch.manual_seed(8)
    text = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "sliding_window": 8,
            "max_position_embeddings": 256, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "sliding_window_pattern": 2}  # the published (4.50) layout: layer 2 of 2 attends to all
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14}
    hf = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299, boi_token_index=297,
        eoi_token_index=298)).eval()
    with torch.no_grad():
        for name, w in hf.named_parameters():
            w.normal_(0, 0.02 if "embed" in name else 0.15) if w.dim() == 2 else w.normal_(0, 0.5)
    hf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["text_config"] = text  # as published: the defaults left out
    (tmp_path / "config.json").write_text(json.dumps(saved))
    model = load_folder(tmp_path, torch.float32)
    assert model.config.sliding_layers == (True, False) and model.config.local_rope_theta == 10000.0
    tokens = torch.randint(0, 296, (2, 30))
    with torch.no_grad():
        want = hf(input_ids=tokens).logits
    assert (model(tokens) - want).abs().max().item() <= 1e-4
    assert model.config.num_parameters() == sum(p.numel() for p in hf.model.language_model.parameters())


@pytest.mark.parametrize("arch", ["gpt_oss", "gemma2"])
def test_explicit_attention_in_query_chunks_computes_the_same(arch, monkeypatch):
    """Explicit attention (gpt-oss's sinks, Gemma 2's capped scores) over a long prefill runs in
    chunks of queries: the same logits as in one piece, windows and causal masks included, in a
    plain prefill and in an extension of a cached prefix."""
    from evalsuite.engine import model as engine_model
    from evalsuite.engine.config import ModelConfig
    from evalsuite.engine.load import from_state_dict

    from .conftest import tiny_gemma2, tiny_gpt_oss

    torch.manual_seed(15)
    hf = tiny_gpt_oss(window=8, vocab=300) if arch == "gpt_oss" else tiny_gemma2(window=8, vocab=300)
    model = from_state_dict(ModelConfig.from_hf(hf.config.to_dict()), dict(hf.state_dict()), torch.float32)
    tokens = torch.randint(0, 300, (2, 40))
    whole = model(tokens)
    cache = KVCache(model.config, 2, 64, torch.float32)
    model.hidden(tokens[:1, :25], Step.for_prefill([25], cache))
    extended = model.logits(model.hidden(tokens[:1, 25:], Step.for_extend([15], cache, [0], [25])))
    monkeypatch.setattr(engine_model, "EXPLICIT_SCORES", 4 * 40 * 3)  # 3 query rows at a time
    # the same up to the products' summation order (float32 GEMMs of 3 rows and of 40 may sum apart)
    assert torch.allclose(model(tokens), whole, atol=1e-5, rtol=0)
    chunked = model.logits(model.hidden(tokens[:1, 25:], Step.for_extend([15], cache, [0], [25])))
    assert torch.allclose(chunked, extended, atol=1e-5, rtol=0)
    assert (extended[0] - whole[0, 25:]).abs().max() <= 1e-4  # the extension is the whole sequence's tail


def test_smollm3_without_its_layer_list_takes_transformers_default():
    """A SmolLM3 config that leaves no_rope_layers out gets transformers' default: every fourth
    layer without RoPE (and with use_sliding_window, those layers sliding)."""
    from transformers import SmolLM3Config

    config = {"model_type": "smollm3", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
              "use_sliding_window": True, "sliding_window": 16}
    ref = SmolLM3Config(**{k: v for k, v in config.items() if k != "model_type"})
    cfg = ModelConfig.from_hf(config)
    assert cfg.rope_layers == tuple(bool(m) for m in ref.no_rope_layers) == (True, True, True, False) * 2
    assert cfg.sliding_layers == tuple(t == "sliding_attention" for t in ref.layer_types)
