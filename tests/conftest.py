"""Shared fixtures: a tiny random-initialised Llama saved as an HF folder (with a real byte-level
BPE tokenizer trained here), the same model in transformers as the reference, and the real
SmolLM2 for the few integration tests (marked slow)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

TINY_VOCAB = 400
# torch's CPU torch._scaled_mm takes row-wise scales (fp8-official's kernel) from 2.13 on; earlier
# versions fail an internal assert, and the recipe falls back to the simulation
needs_cpu_rowwise_scaled_mm = pytest.mark.skipif(
    torch.__version__ < "2.13", reason="torch's CPU _scaled_mm takes row-wise scales from 2.13 on")
CORPUS = [
    "The following are multiple choice questions (with answers) about anatomy.",
    "Question: What is the largest bone in the human body? Answer: A. Femur B. Tibia C. Skull D. Rib",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) . , ; : ! ?",
]


def on_meta_default(fn):
    """``fn()`` with torch's default device set to "meta": a tensor made without the model's
    device lands there, and the first operation mixing it with the CPU model fails."""
    torch.set_default_device("meta")
    try:
        return fn()
    finally:
        torch.set_default_device(None)


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def calibration_sequences(tiny_dir, folder, text: str) -> tuple[dict, list[list[int]]]:
    """A calibration text file in ``folder`` (``text`` thirty times), its spec as a recipe's
    ``calibration`` setting (6 samples of 48 tokens), and the token sequences the recipe reads."""
    from evalsuite.engine.load import load
    from evalsuite.quant.calibrate import corpus
    from evalsuite.quant.configs import CalibrationSpec

    (folder / "calibration.txt").write_text(text * 30)
    spec = {"source": str(folder / "calibration.txt"), "num_samples": 6, "seq_len": 48}
    return spec, corpus(load(str(tiny_dir), "float32"), CalibrationSpec(**spec))


def changed_config_groups(folder, change: dict) -> dict:
    """config.json of a compressed-tensors checkpoint in ``folder`` with ``change`` applied to its
    ``quantization_config.config_groups`` (keys are dotted paths: "group_0.weights.strategy")."""
    import json

    hf = json.loads((folder / "config.json").read_text())
    for path, value in change.items():
        *parents, leaf = path.split(".")
        node = hf["quantization_config"]["config_groups"]
        for p in parents:
            node = node[p]
        node[leaf] = value
    return hf


def llm_compressor_oneshot(model_dir, tokenizer_dir, sequences, recipe, out):
    """llm-compressor's ``oneshot`` on the float32 model in ``model_dir`` with ``recipe`` (its
    modifiers) on ``sequences`` (one per calibration sample, unshuffled), saved to ``out``
    (compressed where quantized)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    data = Dataset.from_dict({"input_ids": sequences, "attention_mask": [[1] * len(s) for s in sequences]})
    oneshot(model=hf, processor=str(tokenizer_dir), dataset=data, num_calibration_samples=len(sequences),
            max_seq_length=max(map(len, sequences)), shuffle_calibration_samples=False, recipe=recipe)
    hf.save_pretrained(str(out), save_compressed=True)
    return out


def tiny_hf_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              tie_word_embeddings=False, rms_norm_eps=1e-5, eos_token_id=0, bos_token_id=0, pad_token_id=0,
              rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 64})
    kw.update(overrides)
    return LlamaConfig(**kw)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """HF folder: random Llama (float32 safetensors) + tokenizer."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_hf_config()).eval()
    # Larger-than-default weights make the tiny model's distributions far from uniform, so
    # predictions and greedy tokens are decided by real margins.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf_tiny(tiny_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """The engine's float32 copy of the tiny model (model, tokenizer, info)."""
    from evalsuite.engine.load import load

    return load(str(tiny_dir), "float32")


def tiny_gemma3(window: int = 8, vocab: int = TINY_VOCAB):
    """transformers' Gemma 3 (text), tiny and random: sliding layers with their own RoPE base
    around one full-attention layer with linear RoPE scaling, queries scaled by
    query_pre_attn_scalar (24, not head_dim), norms and weights drawn large enough to matter."""
    import transformers

    cfg = transformers.Gemma3TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, sliding_window=window, query_pre_attn_scalar=24,
        max_position_embeddings=256, pad_token_id=0, bos_token_id=0, eos_token_id=0,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}})
    hf = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # the norms' weights start at zero (1 + w): make them matter too; embeddings
        for name, w in hf.named_parameters():  # small, or sqrt(hidden) x them drowns the layers' output
            w.normal_(0, 0.02 if "embed" in name else 0.15) if w.dim() == 2 else w.normal_(0, 0.5)
    return hf


def tiny_gemma2(window: int = 8, vocab: int = TINY_VOCAB):
    """transformers' Gemma 2, tiny and random, with eager attention (its scores capped at 50, here
    at 2 so that the cap matters; logits at 30, here at 1.5): sliding and full layers alternating,
    queries scaled by query_pre_attn_scalar (24, not head_dim)."""
    import transformers

    cfg = transformers.Gemma2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, sliding_window=window, query_pre_attn_scalar=24,
        max_position_embeddings=256, pad_token_id=0, bos_token_id=0, eos_token_id=0,
        attn_logit_softcapping=2.0, final_logit_softcapping=1.5)
    hf = transformers.Gemma2ForCausalLM(cfg).eval()
    hf.config._attn_implementation = "eager"  # the reference for capped scores (SDPA would not cap them)
    with torch.no_grad():
        for name, w in hf.named_parameters():
            w.normal_(0, 0.02 if "embed" in name else 0.15) if w.dim() == 2 else w.normal_(0, 0.5)
    return hf


def tiny_moe(arch: str = "qwen3_moe", window: int | None = None, vocab: int = TINY_VOCAB):
    """transformers' Mixtral, Qwen2-MoE or Qwen3-MoE, tiny and random: 4 experts, 2 per token
    (Qwen3-MoE's renormalised over the chosen, its second layer a dense MLP; Qwen2-MoE's not
    renormalised, with a shared expert and qkv biases, its third layer dense), weights large
    enough that the router's choices and the experts matter."""
    import transformers

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, num_experts_per_tok=2, pad_token_id=0)
    if arch == "mixtral":
        hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **common, num_local_experts=4, sliding_window=window))
    elif arch == "qwen2_moe":
        hf = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            **common, num_experts=4, moe_intermediate_size=48, shared_expert_intermediate_size=80,
            mlp_only_layers=[2]))
    else:
        hf = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            **common, num_experts=4, moe_intermediate_size=48, head_dim=16, norm_topk_prob=True,
            mlp_only_layers=[1]))
    with torch.no_grad():
        for w in hf.parameters():
            w.normal_(0, 0.15) if w.dim() >= 2 else None
            if arch == "qwen2_moe":  # qkv biases: nonzero
                for layer in hf.model.layers:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        proj.bias.normal_(0, 0.1)
    return hf.eval()


def fused_and_separate(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``model``'s float logits with q/k/v and gate/up run as the recipe fused them, then with
    every projection run apart (the fusions dropped)."""
    fused = model(tokens).float()
    for layer in model.model.layers:
        layer.self_attn._fused = layer.mlp._fused = None
    return fused, model(tokens).float()


def tiny_granite(vocab: int = TINY_VOCAB):
    """transformers' Granite, tiny and random: its four multipliers away from 1 (embeddings x12,
    sublayer outputs x0.22, attention scale 1/64, logits / 8) and MLP biases."""
    import transformers

    hf = transformers.GraniteForCausalLM(transformers.GraniteConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, embedding_multiplier=12.0, residual_multiplier=0.22,
        attention_multiplier=1 / 64, logits_scaling=8.0, tie_word_embeddings=True, mlp_bias=True))
    with torch.no_grad():
        for name, w in hf.named_parameters():
            w.normal_(0, 0.2) if w.dim() == 2 else w.normal_(0 if name.endswith("bias") else 1, 0.3)
    return hf.eval()


def tiny_olmo(arch: str = "olmo2", window: int | None = None, vocab: int = TINY_VOCAB):
    """transformers' OLMo 2 or OLMo 3, tiny and random: norms after attention and the MLP only,
    q and k normalised over all heads (their weights away from 1). OLMo 3: layers 0-2 slide over
    ``window`` (default 12) with plain RoPE, layer 3 sees all with YaRN (attention factor != 1)."""
    import transformers

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    if arch == "olmo2":
        hf = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**common, rope_theta=500.0))
    else:
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
                "full_attention": {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0,
                                   "original_max_position_embeddings": 64}}
        hf = transformers.Olmo3ForCausalLM(transformers.Olmo3Config(**common, sliding_window=window or 12,
                                                                    rope_parameters=rope))
    with torch.no_grad():
        for w in hf.parameters():
            w.normal_(0, 0.2) if w.dim() == 2 else w.normal_(1, 0.3)
    return hf.eval()


def tiny_smollm3(window: int | None = None, vocab: int = TINY_VOCAB):
    """transformers' SmolLM3, tiny and random: every other layer without RoPE (NoPE), those
    layers sliding over ``window`` positions where given."""
    import transformers

    hf = transformers.SmolLM3ForCausalLM(transformers.SmolLM3Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, no_rope_layer_interval=2,
        use_sliding_window=window is not None, sliding_window=window, pad_token_id=0, bos_token_id=1,
        eos_token_id=2))
    with torch.no_grad():
        for w in hf.parameters():
            w.normal_(0, 0.2) if w.dim() == 2 else w.normal_(1, 0.3)
    return hf.eval()


def tiny_gpt_oss(window: int = 8, vocab: int = TINY_VOCAB):
    """transformers' gpt-oss, tiny and random: 4 experts, 2 per token, sinks, biases everywhere,
    every other layer sliding, YaRN over 64 original positions, the experts' clamp at 1.5; biases
    and sinks drawn (they start at zero) and weights large enough that routing, clamps and sinks
    matter."""
    import transformers

    cfg = transformers.GptOssConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=window,
        max_position_embeddings=256, pad_token_id=0, swiglu_limit=1.5,  # gate and up reach it here
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64})
    hf = transformers.GptOssForCausalLM(cfg)
    with torch.no_grad():
        for name, w in hf.named_parameters():
            w.normal_(0, 0.15) if w.dim() >= 2 else w.normal_(0 if name.endswith(("bias", "sinks")) else 1, 0.3)
    return hf.eval()


def _moe_dir(arch: str, folder):
    """``tiny_moe(arch)`` saved as an HF folder with the tiny tokenizer."""
    torch.manual_seed(9)
    tiny_moe(arch).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture()
def qwen3_moe_dir(tmp_path):
    return _moe_dir("qwen3_moe", tmp_path / "moe")


@pytest.fixture()
def qwen2_moe_dir(tmp_path):
    return _moe_dir("qwen2_moe", tmp_path / "moe")


LONGROPE_ORIGINAL = 40  # the tiny Phi-3.5's original context: LongRoPE's long factors past it


@pytest.fixture(scope="session")
def longrope(tmp_path_factory):
    """A tiny Phi-3.5 (LongRoPE over 40 original positions stretched to 256, on 3/4 of each head):
    transformers' model (``hf``) and the engine's float32 copy (``model``)."""
    import types

    import transformers

    from evalsuite.engine.load import load_folder

    torch.manual_seed(6)
    cfg = transformers.Phi3Config(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                  partial_rotary_factor=0.75, max_position_embeddings=256,
                                  original_max_position_embeddings=LONGROPE_ORIGINAL,
                                  rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.5 * i for i in range(6)],
                                                "long_factor": [4.0 + i for i in range(6)]})
    hf = transformers.Phi3ForCausalLM(cfg).eval()
    with torch.no_grad():  # weights large enough that positions (RoPE) move the logits and greedy choices
        for w in hf.parameters():
            w.normal_(0, 0.15) if w.dim() == 2 else None
    path = tmp_path_factory.mktemp("longrope")
    hf.save_pretrained(path)
    return types.SimpleNamespace(hf=hf, model=load_folder(path, torch.float32), path=path)


@pytest.fixture(scope="session")
def smollm2():
    from evalsuite.engine.load import load

    return load("smollm2-135m", "bfloat16")


@pytest.fixture()
def calib_file(tmp_path, monkeypatch):
    """A small calibration text file, with the calibration cache in a fresh folder."""
    monkeypatch.setenv("EVALSUITE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "calib.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. 0123456789 " * 40)
    return path


@pytest.fixture(autouse=True)
def _private_run_index(tmp_path_factory, monkeypatch):
    """Runs that tests make are recorded in a run index of the tests' own, never in reports/."""
    monkeypatch.setenv("EVALSUITE_INDEX", str(tmp_path_factory.getbasetemp() / "index.sqlite"))


@pytest.fixture(autouse=True)
def _empty_judgment_cache(tmp_path, monkeypatch):
    """Every test judges on an empty judgment cache of its own: a judgment cached by an earlier
    test, or an earlier run of the suite on this machine, would skip the judge it tests."""
    monkeypatch.setenv("EVALSUITE_JUDGMENTS", str(tmp_path / "judgments.sqlite"))


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="session")
def tiny_chat_dir(tiny_dir, tmp_path_factory):
    """The tiny model with a chat template (the tokenizer above has none)."""
    import json
    import shutil

    d = tmp_path_factory.mktemp("tiny-chat-session") / "tiny"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    model_cfg = json.loads((d / "config.json").read_text())
    model_cfg["max_position_embeddings"] = 4096  # room for MT-Bench's judge prompts in this byte-level vocabulary
    (d / "config.json").write_text(json.dumps(model_cfg))
    return d


@pytest.fixture(scope="session")
def tiny_chat(tiny_chat_dir):
    from evalsuite.engine.load import load

    return load(str(tiny_chat_dir), "float32")


@contextmanager
def app_on_localhost(app) -> Iterator[str]:
    """Serve an ASGI app (a test's scripted stand-in server) on a free localhost port in a
    thread; yields its /v1 URL and stops it on leaving, also when the test fails."""
    import uvicorn

    from evalsuite.server.serve import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
