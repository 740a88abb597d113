"""Capacity planner: parameter counts against the published ones, byte counts against hand counts
and against the bytes a saved checkpoint really holds, and the reference case's claims."""

from __future__ import annotations

import json

import pytest
import torch

from evalsuite.cli import main
from evalsuite.engine.config import ModelConfig, UnsupportedModelError, rope_inv_freq
from evalsuite.engine.load import load, read_config
from evalsuite.plan import PLAN_RECIPES, deployed_weight_bytes, kv_bytes_per_token, plan
from evalsuite.quant.api import apply_recipe
from evalsuite.quant.checkpoint import deployed_weight_bytes as checkpoint_bytes
from evalsuite.quant.checkpoint import save_quantized


@pytest.mark.parametrize("name,params", [
    # parameter counts published with the checkpoints (safetensors metadata / model cards)
    ("llama-3.1-8b", 8_030_261_248), ("llama-3.1-70b", 70_553_706_496),
    ("llama-3.1-405b", 405_853_388_800), ("smollm2-135m", 134_515_008)])
def test_parameter_counts(name, params):
    assert ModelConfig.from_name(name).num_parameters() == params


# Llama 3.1 8B by hand: per layer q 4096x4096, k and v 1024x4096, o 4096x4096, gate and up
# 14336x4096, down 4096x14336 = 218,103,808 projection weights; x32 = 6,979,321,856; the rest
# (embeddings, lm_head, norms) = 8,030,261,248 - 6,979,321,856 = 1,050,939,392, in BF16 = 2,101,878,784.
LLAMA_8B_BYTES = {
    "bf16": 2 * 8_030_261_248,
    # 30 inner layers' FFN (176,160,768 weights) in 1 byte + a float32 per output channel
    # (2 x 14336 + 4096 = 32,768 channels): 30 x (176,160,768 + 131,072) = 5,288,755,200; the other
    # 8,030,261,248 - 5,284,823,040 = 2,745,438,208 parameters in BF16 = 5,490,876,416
    "fp8-official": 5_288_755_200 + 5_490_876_416,
    # every projection in 1 byte + 2 float32 scales (7 x 8 = 56 B) + 4 float32 attention scales (16 B)
    "fp8-modelopt": 32 * (218_103_808 + 56 + 16) + 2_101_878_784,
    # per layer: codes 109,051,904 B (half a byte each) + block scales 1,703,936 x 4 B = 6,815,744
    # + BF16 pre-scales of o_proj and down_proj over 4096 + 14336 = 18,432 inputs = 36,864 (q/k/v
    # and gate/up have theirs folded into the norms)
    "int4-awq": 32 * (109_051_904 + 6_815_744 + 36_864) + 2_101_878_784,
    "int4-rtn": 32 * (109_051_904 + 6_815_744) + 2_101_878_784,
    "int4-gptq": 32 * (109_051_904 + 6_815_744) + 2_101_878_784,  # GPTQ moves codes, not their layout
    # + a 4-bit zero point per block: 1,703,936 / 2 = 851,968 B per layer
    "int4-awq-asym": 32 * (109_051_904 + 6_815_744 + 851_968) + 2_101_878_784,
    # every projection in 1 byte + a float32 scale per output channel: 4096 + 2 x 1024 + 4096 + 2 x
    # 14336 + 4096 = 43,008 channels x 4 B = 172,032 B per layer
    "int8-w8a8": 32 * (218_103_808 + 172_032) + 2_101_878_784,
}


@pytest.mark.parametrize("recipe", list(LLAMA_8B_BYTES))
def test_bytes_by_hand(recipe):
    assert deployed_weight_bytes(ModelConfig.from_name("llama-3.1-8b"), recipe) == LLAMA_8B_BYTES[recipe]


def test_kv_bytes_by_hand():
    cfg = ModelConfig.from_name("llama-3.1-8b")
    # K and V, 32 layers, 8 KV heads of 128: 2 * 32 * 8 * 128 * 2 bytes = 131,072 per token in BF16
    assert kv_bytes_per_token(cfg, "bf16") == 131_072
    assert kv_bytes_per_token(cfg, "fp8-modelopt") == 65_536


def _file_bytes(folder) -> int:
    """What a saved checkpoint holds: every tensor's bytes in model.safetensors, read back from
    the file, plus a float32 for each scalar scale recorded in quantization.json."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            total += t.numel() * t.element_size()
    meta = json.loads((folder / "quantization.json").read_text())
    scalars = sum(1 for m in meta["modules"].values() for k, v in m["attrs"].items()
                  if k.endswith("scale") and isinstance(v, float))
    return total + 4 * scalars


@pytest.mark.parametrize("recipe", PLAN_RECIPES)
def test_planner_counts_what_a_checkpoint_stores(recipe, tiny_dir, calib_file, tmp_path):
    """The planner's count from the architecture alone equals the bytes of the checkpoint the
    engine writes for the tiny model (BF16, default block size: its 64 and 160 inputs are padded
    to whole blocks of 128), and the engine's own count of the loaded model."""
    lm = load(str(tiny_dir), "bfloat16")
    from evalsuite.quant.api import get_recipe
    from evalsuite.quant.configs import calibrates

    over = {} if not calibrates(get_recipe(recipe).config) else {
        "calibration": {"source": str(calib_file), "num_samples": 2, "seq_len": 16}}
    record = apply_recipe(lm, recipe, over)
    out = save_quantized(lm, record, tmp_path / "q")
    planned = deployed_weight_bytes(read_config(tiny_dir), recipe)
    assert planned == _file_bytes(out) == checkpoint_bytes(lm.model)


def test_int4_awq_fits_405b_on_two_h200():
    p = plan("llama-3.1-405b", "int4-awq", "h200", context=8192, batch=1)
    assert p.gpus == 2
    assert plan("llama-3.1-405b", "int4-awq", "h100").gpus == 4
    assert plan("llama-3.1-405b", "int4-awq-asym", "h200").gpus == 2


def test_405b_bf16_and_fp8_footprints():
    assert plan("llama-3.1-405b", "bf16", "h200").gpus == 8
    assert plan("llama-3.1-405b", "bf16", "h100").gpus == 16
    assert plan("llama-3.1-405b", "fp8-modelopt", "h100").gpus == 8  # FP8 405B on one 8xH100 node
    assert plan("llama-3.1-8b", "bf16", "h100").gpus == 1


def test_bad_plan_inputs():
    with pytest.raises(KeyError, match="valid: a100-40gb, a100-80gb, l40s, h100, h200, b200"):
        plan("llama-3.1-8b", "bf16", "a100")
    with pytest.raises(KeyError, match="'no-such-model': not a preset"):
        plan("no-such-model", "bf16", "h100")
    with pytest.raises(KeyError, match="valid: bf16, fp8-official"):
        plan("llama-3.1-8b", "int8", "h100")
    with pytest.raises(ValueError, match="exceeds llama-3.1-8b's 131072 positions"):
        plan("llama-3.1-8b", "bf16", "h100", context=200_000)


def test_plan_cli(capsys):
    assert main(["plan", "--recipe", "int4-awq", "--gpu", "h200"]) == 0
    out = capsys.readouterr().out
    assert "llama-3.1-405b / int4-awq on h200" in out and "-> 2 GPU(s)" in out


def test_meta_model_bf16_bytes_are_twice_the_published_parameter_count():
    from evalsuite.engine.model import CausalLM

    with torch.device("meta"):
        model = CausalLM(ModelConfig.from_name("smollm2-135m"))
    assert checkpoint_bytes(model) == 2 * 134_515_008


# meta-llama/Llama-3.1-8B's config.json as published on the hub (the keys the planner reads, and
# some it ignores)
LLAMA_31_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256}


def test_plan_reads_a_model_folder_or_config_file(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_31_8B_CONFIG))
    by_folder = plan(str(tmp_path), "int4-awq", "h100")
    by_file = plan(str(tmp_path / "config.json"), "int4-awq", "h100")
    assert by_folder.deployed_weight_bytes == by_file.deployed_weight_bytes == LLAMA_8B_BYTES["int4-awq"]
    assert main(["plan", "--model-config", str(tmp_path), "--recipe", "bf16", "--gpu", "l40s"]) == 0
    assert "weights 16.1 GB" in capsys.readouterr().out
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ValueError, match="lacks vocab_size, intermediate_size"):
        plan(str(tmp_path), "bf16", "h100")


# Qwen/Qwen2.5-7B-Instruct's config.json (the keys the planner reads): q/k/v biases, untied
# embeddings; 7,615,616,512 parameters (its safetensors index: total_size 15,231,233,024 bytes in BF16)
QWEN25_7B_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072,
    "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 152064}


def test_plan_of_a_qwen2_config_counts_its_published_size(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_7B_CONFIG))
    p = plan(str(tmp_path), "bf16", "l40s", context=32768, batch=1)
    assert p.deployed_weight_bytes == 15_231_233_024
    # KV: 2 x 28 layers x 4 heads x 128 x 2 bytes = 57,344 B per token
    assert p.kv_bytes == 57_344 * 32768 and p.gpus == 1


def _on_meta(model_class, hf_config):
    """transformers' own model of ``hf_config``, built on the meta device (shapes, no memory)."""
    with torch.device("meta"):
        return model_class(hf_config)


# microsoft/Phi-3.5-mini-instruct's config.json in its published (pre-transformers-5) layout: fused
# projections, LongRoPE over 4,096 original positions stretched to 131,072; its 48 short and long
# factors are stood in for by others of the same count (only their count matters here)
PHI35_MINI_CONFIG = {
    "architectures": ["Phi3ForCausalLM"], "hidden_act": "silu", "hidden_size": 3072, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "model_type": "phi3", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
    "rope_scaling": {"type": "longrope", "short_factor": [1.0 + i / 16 for i in range(48)],
                     "long_factor": [1.5 + i for i in range(48)]},
    "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": False, "vocab_size": 32064}
# microsoft/phi-4's: grouped KV heads, plain RoPE
PHI4_CONFIG = {
    "architectures": ["Phi3ForCausalLM"], "hidden_act": "silu", "hidden_size": 5120, "intermediate_size": 17920,
    "max_position_embeddings": 16384, "model_type": "phi3", "num_attention_heads": 40, "num_hidden_layers": 40,
    "num_key_value_heads": 10, "original_max_position_embeddings": 16384, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 250000, "sliding_window": None, "tie_word_embeddings": False,
    "vocab_size": 100352}


@pytest.mark.parametrize("published", [PHI35_MINI_CONFIG, PHI4_CONFIG], ids=["phi-3.5-mini", "phi-4"])
def test_phi3_configs_count_as_transformers_builds_them(published, tmp_path):
    """Parameters as transformers' own Phi3ForCausalLM counts them (built on the meta device), the
    planner's BF16 bytes twice that, and LongRoPE's attention factor as transformers computes it."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = transformers.Phi3Config(**published)
    n = sum(p.numel() for p in _on_meta(transformers.Phi3ForCausalLM, hf_cfg).parameters())
    cfg = ModelConfig.from_hf(published)
    assert cfg.num_parameters() == n
    (tmp_path / "config.json").write_text(json.dumps(published))
    assert plan(str(tmp_path), "bf16", "h100").deployed_weight_bytes == 2 * n
    if published is PHI35_MINI_CONFIG:
        inv_freq, attention = ROPE_INIT_FUNCTIONS["longrope"](hf_cfg)
        assert cfg.rope_scaling.attention_factor == pytest.approx(attention, rel=1e-12)
        assert attention == pytest.approx(1.190238, abs=1e-6)  # sqrt(1 + ln 32 / ln 4096), by hand
        assert torch.equal(rope_inv_freq(cfg), inv_freq)
        # the long factors, which transformers uses past the original 4,096 positions
        long_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](hf_cfg, seq_len=4097)
        assert torch.equal(rope_inv_freq(cfg, long=True), long_inv_freq)
        assert not torch.equal(long_inv_freq, inv_freq)
        assert not cfg.long_rope(4096) and cfg.long_rope(4097)
    else:
        assert cfg.rope_scaling is None and not cfg.long_rope(16384)


def test_kv_cache_splits_no_finer_than_by_kv_head():
    """Llama 3.1 8B, 8 KV heads, full 131,072-token context, BF16: 131,072 B of KV per token
    (test_kv_bytes_by_hand), so a batch of 48 holds 48 x 131,072 x 131,072 = 824.6 GB of cache;
    weights 16.06 GB. On H200s (126.9 GB usable): 8 GPUs hold 2.0 + 824.6 / 8 = 105.1 GB each.
    At batch 60 the cache is 1,030.8 GB, 128.8 GB per KV head: more GPUs only replicate heads,
    so no count of H200s holds it (splitting it 16 ways would have claimed 65.4 GB each)."""
    p = plan("llama-3.1-8b", "bf16", "h200", context=131072, batch=48)
    assert p.gpus == 8 and p.per_gpu_bytes == pytest.approx(2.007e9 + 103.08e9, rel=1e-3)
    with pytest.raises(ValueError, match="one of llama-3.1-8b's 8 KV heads .128.8 GB.*lower --batch or --context"):
        plan("llama-3.1-8b", "bf16", "h200", context=131072, batch=60)
    # 405B BF16 on 16 H100s: each of the 16 holds one of the 8 KV heads (4.23 GB / 8), not 1/16
    p = plan("llama-3.1-405b", "bf16", "h100")
    assert p.gpus == 16 and p.per_gpu_bytes == pytest.approx(811.7e9 / 16 + 4.228e9 / 8, rel=1e-3)
    assert any("exceed the 8 KV heads" in n for n in p.notes)


def test_plan_notes_what_the_count_does_not_show():
    # SmolLM2-135M's 9 attention heads split over no power of two
    p = plan("smollm2-135m", "bf16", "l40s", context=8192, batch=256)
    assert p.gpus == 2 and any("divide the 9 attention heads" in n for n in p.notes)
    # an A100 (sm_80) stores FP8 weights but has no FP8 GEMM
    assert any("no FP8 tensor cores" in n for n in plan("llama-3.1-8b", "fp8-modelopt", "a100-80gb").notes)
    assert not plan("llama-3.1-8b", "fp8-modelopt", "l40s").notes
    assert not plan("llama-3.1-8b", "int4-awq", "a100-40gb").notes


def test_plan_notes_a_sliding_window_shorter_than_the_context(tmp_path):
    """Phi-3.5-mini's window (262,144) exceeds any context it takes: no note; Mistral-7B-v0.1's
    4,096 does not at 32,768."""
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768,
        "sliding_window": 4096, "vocab_size": 32000}))
    p = plan(str(tmp_path), "bf16", "h100", context=32768)
    assert any("32 of the 32 layers attend to the last 4096 tokens only" in n for n in p.notes)
    assert not any("window" in n for n in plan(str(tmp_path), "bf16", "h100", context=4096).notes)
    (tmp_path / "config.json").write_text(json.dumps(PHI35_MINI_CONFIG))
    assert not any("window" in n for n in plan(str(tmp_path), "bf16", "h100", context=131072).notes)


# google/gemma-3-1b-it's config.json in its published (transformers 4.50) layout: the sliding
# layers' RoPE base beside the full layers', every sixth layer attending to all positions
GEMMA3_1B_CONFIG = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attn_logit_softcapping": None,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
    "intermediate_size": 6912, "max_position_embeddings": 32768, "model_type": "gemma3_text",
    "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": 512, "sliding_window_pattern": 6, "vocab_size": 262144}
# the text model of google/gemma-3-4b-it: linear RoPE scaling on the full layers
GEMMA3_4B_TEXT_CONFIG = {
    **GEMMA3_1B_CONFIG, "hidden_size": 2560, "intermediate_size": 10240, "num_attention_heads": 8,
    "num_hidden_layers": 34, "num_key_value_heads": 4, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
    "sliding_window": 1024, "vocab_size": 262208, "max_position_embeddings": 131072}


@pytest.mark.parametrize("published", [GEMMA3_1B_CONFIG, GEMMA3_4B_TEXT_CONFIG], ids=["gemma-3-1b", "gemma-3-4b"])
def test_gemma3_configs_read_as_transformers_reads_them(published, tmp_path):
    """Parameters as transformers' Gemma3ForCausalLM counts them (on the meta device), which layers
    slide, and each kind of layer's RoPE frequencies as transformers computes them."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = transformers.Gemma3TextConfig(**published)
    n = sum(p.numel() for p in _on_meta(transformers.Gemma3ForCausalLM, hf_cfg).parameters())
    cfg = ModelConfig.from_hf(published)
    assert cfg.num_parameters() == n
    assert cfg.sliding_layers == tuple(t == "sliding_attention" for t in hf_cfg.layer_types)
    assert cfg.sliding_layers.count(False) == published["num_hidden_layers"] // 6
    full = hf_cfg.rope_parameters["full_attention"]
    init = ROPE_INIT_FUNCTIONS[full["rope_type"]] if full["rope_type"] != "default" else \
        transformers.models.gemma3.modeling_gemma3.Gemma3RotaryEmbedding.compute_default_rope_parameters
    assert torch.equal(rope_inv_freq(cfg), init(hf_cfg, layer_type="full_attention")[0])
    local = transformers.models.gemma3.modeling_gemma3.Gemma3RotaryEmbedding.compute_default_rope_parameters(
        hf_cfg, layer_type="sliding_attention")[0]
    assert torch.equal(rope_inv_freq(cfg, local=True), local)
    (tmp_path / "config.json").write_text(json.dumps(published))
    assert plan(str(tmp_path), "bf16", "h100").deployed_weight_bytes == 2 * n


def test_bidirectional_gemma_and_other_activations_are_refused_by_name():
    with pytest.raises(UnsupportedModelError, match="use_bidirectional_attention"):
        ModelConfig.from_hf({**GEMMA3_1B_CONFIG, "use_bidirectional_attention": True})
    with pytest.raises(UnsupportedModelError, match="'gelu_pytorch_tanh'"):
        ModelConfig.from_hf({**GEMMA3_1B_CONFIG, "hidden_activation": "relu"})


# google/gemma-2-9b-it's and gemma-2-27b-it's config.json as published (transformers 4.42): no
# layer kinds named (every other layer slides), scores and logits capped; the 27B scales its
# queries by 144 ** -0.5 with 128-dimensional heads
GEMMA2_9B_CONFIG = {
    "architectures": ["Gemma2ForCausalLM"], "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
    "head_dim": 256, "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 3584, "intermediate_size": 14336, "max_position_embeddings": 8192, "model_type": "gemma2",
    "num_attention_heads": 16, "num_hidden_layers": 42, "num_key_value_heads": 8, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "vocab_size": 256000}
GEMMA2_27B_CONFIG = {
    **GEMMA2_9B_CONFIG, "head_dim": 128, "hidden_size": 4608, "intermediate_size": 36864, "num_attention_heads": 32,
    "num_hidden_layers": 46, "num_key_value_heads": 16, "query_pre_attn_scalar": 144}


@pytest.mark.parametrize("published", [GEMMA2_9B_CONFIG, GEMMA2_27B_CONFIG], ids=["gemma-2-9b", "gemma-2-27b"])
def test_gemma2_configs_read_as_transformers_reads_them(published):
    import transformers

    hf_cfg = transformers.Gemma2Config(**published)
    n = sum(p.numel() for p in _on_meta(transformers.Gemma2ForCausalLM, hf_cfg).parameters())
    cfg = ModelConfig.from_hf(published)
    assert cfg.num_parameters() == n
    assert cfg.sliding_layers == tuple(t == "sliding_attention" for t in hf_cfg.layer_types)
    assert cfg.sliding_layers[:2] == (True, False) and cfg.sliding_window == 4096
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (50.0, 30.0)
    assert cfg.attention_scale == (None if published is GEMMA2_9B_CONFIG else 144 ** -0.5)
    assert not cfg.qk_norm and cfg.local_rope_theta is None and cfg.tie_word_embeddings


# mistralai/Mixtral-8x7B-v0.1's, Qwen/Qwen3-30B-A3B's, Qwen/Qwen1.5-MoE-A2.7B's and
# openai/gpt-oss-20b's config.json as published
MIXTRAL_8X7B_CONFIG = {
    "architectures": ["MixtralForCausalLM"], "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32, "num_experts_per_tok": 2,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False, "vocab_size": 32000}
QWEN3_30B_A3B_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"], "decoder_sparse_step": 1, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 40960, "mlp_only_layers": [],
    "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32,
    "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
    "use_sliding_window": False, "vocab_size": 151936}
QWEN15_MOE_A27B_CONFIG = {
    "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 5632, "max_position_embeddings": 8192, "max_window_layers": 21, "model_type": "qwen2_moe",
    "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 16, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936, "decoder_sparse_step": 1,
    "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4,
    "num_experts": 60, "norm_topk_prob": False, "output_router_logits": False, "router_aux_loss_coef": 0.001}
GPT_OSS_20B_CONFIG = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
    "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                            "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                            "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "use_cache": True, "vocab_size": 201088}


@pytest.mark.parametrize("published", [MIXTRAL_8X7B_CONFIG, QWEN3_30B_A3B_CONFIG, QWEN15_MOE_A27B_CONFIG,
                                       GPT_OSS_20B_CONFIG],
                         ids=["mixtral-8x7b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b", "gpt-oss-20b"])
def test_mixture_of_experts_configs_count_as_transformers_builds_them(published, tmp_path):
    """Every expert's parameters and the routers' (transformers' own model, on the meta device);
    the planner's BF16 bytes twice that."""
    import transformers

    model_class, config_class = {"mixtral": (transformers.MixtralForCausalLM, transformers.MixtralConfig),
                                 "qwen2_moe": (transformers.Qwen2MoeForCausalLM, transformers.Qwen2MoeConfig),
                                 "gpt_oss": (transformers.GptOssForCausalLM, transformers.GptOssConfig),
                                 "qwen3_moe": (transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig)}[
        published["model_type"]]
    hf = _on_meta(model_class, config_class(**{k: v for k, v in published.items() if k != "quantization_config"}))
    n = sum(p.numel() for p in hf.parameters())
    routers = sum(p.numel() for name, p in hf.named_parameters() if name.endswith(("mlp.gate.weight",
                                                                                   "mlp.router.weight")))
    cfg = ModelConfig.from_hf(published)
    assert cfg.num_parameters() == n and routers > 0
    if published is QWEN15_MOE_A27B_CONFIG:  # 14.3B parameters, its model card says; qkv biases, no window
        assert round(n / 1e9, 1) == 14.3 and cfg.qkv_bias and cfg.sliding_window is None
        assert cfg.experts_per_token == 4 and not cfg.norm_topk_prob and cfg.moe_layers is None
    if published is GPT_OSS_20B_CONFIG:  # 21B parameters, its model card says; every other layer slides over 128
        assert round(n / 1e9) == 21 and cfg.sliding_layers[:2] == (True, False) and cfg.sliding_window == 128
        assert cfg.rope_scaling.factor == 32.0 and not cfg.rope_scaling.truncate and cfg.attention_sinks
    (tmp_path / "config.json").write_text(json.dumps(published))
    assert plan(str(tmp_path), "bf16", "h100").deployed_weight_bytes == 2 * n


@pytest.mark.parametrize("arch, recipe", [("qwen3_moe", r) for r in
                                          ("bf16", "fp8-official", "fp8-modelopt", "int4-awq-asym", "int4-rtn")]
                         + [("qwen2_moe", "fp8-modelopt"), ("qwen2_moe", "int4-rtn")])
def test_planner_counts_what_a_mixture_of_experts_checkpoint_stores(arch, recipe, calib_file, tmp_path):
    """The same for Qwen3-MoE and Qwen2-MoE: each expert's projections quantized (the shared
    expert's too), the routers in BF16."""
    from .conftest import _moe_dir

    folder = _moe_dir(arch, tmp_path / arch)
    lm = load(str(folder), "bfloat16")
    over = {"calibration": {"source": str(calib_file), "num_samples": 2, "seq_len": 16}} \
        if recipe in ("fp8-modelopt", "int4-awq-asym") else {}
    record = apply_recipe(lm, recipe, over)
    out = save_quantized(lm, record, tmp_path / "q")
    assert deployed_weight_bytes(read_config(folder), recipe) == _file_bytes(out) == \
        checkpoint_bytes(lm.model)


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_granite_counts_as_transformers_builds_it(mlp_bias, tmp_path):
    """Granite 3.1 8B's shapes (tied embeddings, 49,155 tokens, 40 layers of 4,096 / 12,800) and
    its multipliers, with and without MLP biases: transformers' own count on the meta device."""
    import transformers

    config = {"model_type": "granite", "hidden_size": 4096, "intermediate_size": 12800, "num_hidden_layers": 40,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 49155, "tie_word_embeddings": True,
              "max_position_embeddings": 131072, "rope_theta": 10000000.0, "embedding_multiplier": 12.0,
              "residual_multiplier": 0.22, "attention_multiplier": 0.0078125, "logits_scaling": 16.0,
              "mlp_bias": mlp_bias, "rms_norm_eps": 1e-05}
    cfg_class = {k: v for k, v in config.items() if k != "model_type"}
    n = sum(p.numel() for p in _on_meta(transformers.GraniteForCausalLM,
                                        transformers.GraniteConfig(**cfg_class)).parameters())
    cfg = ModelConfig.from_hf(config)
    assert cfg.num_parameters() == n and (cfg.attention_scale, cfg.logits_scaling) == (0.0078125, 16.0)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert plan(str(tmp_path), "bf16", "h100").deployed_weight_bytes == 2 * n


@pytest.mark.parametrize("arch", ["olmo2", "olmo3"])
def test_olmo_counts_as_transformers_builds_it(arch, tmp_path):
    """OLMo 2 and 3 at 7B shapes (q/k norms over all heads: 2 x 4,096 weights a layer), configs in
    transformers 4's layout: transformers' own count on the meta device. OLMo 3's one rope_theta
    serves the sliding layers unscaled and, with rope_scaling (YaRN), the full layers, as
    transformers' Olmo3Config resolves it; without layer_types three layers in four slide."""
    import transformers

    from evalsuite.engine.config import YarnRope

    config = {"model_type": arch, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 100352,
              "max_position_embeddings": 4096, "rope_theta": 500000.0, "rms_norm_eps": 1e-06,
              "tie_word_embeddings": False}
    if arch == "olmo3":
        config.update(max_position_embeddings=65536, sliding_window=4096, rope_scaling={
            "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192, "attention_factor": 1.2,
            "beta_fast": 32.0, "beta_slow": 1.0})
    classes = {"olmo2": (transformers.Olmo2ForCausalLM, transformers.Olmo2Config),
               "olmo3": (transformers.Olmo3ForCausalLM, transformers.Olmo3Config)}[arch]
    hf_config = classes[1](**{k: v for k, v in config.items() if k != "model_type"})
    n = sum(p.numel() for p in _on_meta(classes[0], hf_config).parameters())
    cfg = ModelConfig.from_hf(config)
    assert cfg.num_parameters() == n
    if arch == "olmo3":
        full, sliding = hf_config.rope_parameters["full_attention"], hf_config.rope_parameters["sliding_attention"]
        assert sliding["rope_type"] == "default" and cfg.local_rope_theta == sliding["rope_theta"] == 500000.0
        assert isinstance(cfg.rope_scaling, YarnRope) and full["rope_type"] == "yarn"
        assert (cfg.rope_scaling.factor, cfg.rope_scaling.attention_factor) == (full["factor"], 1.2)
        assert cfg.sliding_layers == tuple(t == "sliding_attention" for t in hf_config.layer_types)
        assert sum(cfg.sliding_layers) == 24 and cfg.sliding_window == 4096
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert plan(str(tmp_path), "bf16", "h100", context=4096).deployed_weight_bytes == 2 * n
