"""The Model Optimizer recipes against NVIDIA Model Optimizer itself (nvidia-modelopt, pinned in
scripts/reference.txt), run on the CPU on the same transformers model and calibration tokens:

* fp8-modelopt (each projection its own scales) is FP8_DEFAULT_CFG + FP8_KV_CFG calibrated by max,
  and its default form holds what Model Optimizer's HF export writes for it; on a mixture of
  experts its scales are those of Model Optimizer's fused experts;
* int4-awq with ``resmooth=false`` is INT4_AWQ_CFG's awq_lite search, and its default (exported)
  form is what Model Optimizer's HF checkpoint export writes: the same codes, block scales, norms
  and pre-quant scales, for Llama's, Gemma's and OLMo's norms;
* nvfp4's weight and activation codes and scales are those of Model Optimizer's NVFP4 tensor
  quantizer (NVFP4QTensor, what its export runs).

What Model Optimizer runs only on CUDA is not compared here: its NVFP4 fake quantization in a
forward (dynamic blocks) and its FP8 attention (the softmax quantizer needs its Triton kernel).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import evalsuite
from evalsuite.engine.load import load
from evalsuite.quant import calibrate as calib
from evalsuite.quant.api import apply_recipe
from evalsuite.quant.configs import CalibrationSpec

from .conftest import on_meta_default

with warnings.catch_warnings():  # it warns that it was not tested with this transformers
    warnings.simplefilter("ignore")
    import modelopt.torch.quantization as mtq


@pytest.fixture
def pair(tiny_dir, calib_file):
    """(transformers' model, the engine's, the calibration spec, its token sequences, probe
    tokens), both float32 from one folder. Four sequences of 16 tokens: Model Optimizer averages
    per forward call and the engine per token, which agree for calls of one length."""
    from transformers import LlamaForCausalLM

    spec = {"source": str(calib_file), "num_samples": 4, "seq_len": 16}
    lm = load(str(tiny_dir), "float32")
    seqs = calib.corpus(lm, CalibrationSpec(**spec))
    assert [len(s) for s in seqs] == [16] * 4
    hf = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    tokens = torch.tensor([lm.tokenizer.encode("The lazy dog jumps over the quick brown fox. " * 3)[:30]])
    return hf, lm, spec, seqs, tokens


def _modelopt(hf, cfg: dict, seqs) -> torch.Tensor:
    """``hf`` quantized in place by Model Optimizer, calibrated on ``seqs`` one call each."""
    def forward_loop(model):
        for s in seqs:
            model(torch.tensor([s]))

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        mtq.quantize(hf, cfg, forward_loop)
    return hf


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _int4_awq_cfg(block: int) -> dict:
    cfg = copy.deepcopy(mtq.INT4_AWQ_CFG)
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") == "*weight_quantizer":
            entry["cfg"]["block_sizes"] = {-1: block, "type": "static"}
    return cfg


def test_fp8_modelopt_is_model_optimizers_fp8(pair):
    hf, lm, spec, seqs, tokens = pair
    with torch.no_grad():
        unquantized = hf(tokens).logits
    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    cfg["quant_cfg"] = cfg["quant_cfg"] + mtq.FP8_KV_CFG["quant_cfg"]
    _modelopt(hf, cfg, seqs)
    apply_recipe(lm, "fp8-modelopt", {"calibration": spec, "fused_scales": False, "quantize_attention": False})
    for i, layer in enumerate(lm.model.model.layers):
        theirs = hf.model.layers[i]
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            ours, ref = layer.get_submodule(name), theirs.get_submodule(name)
            assert ours.input_scale == pytest.approx(ref.input_quantizer.amax.item() / 448, rel=1e-6), name
            assert ours.weight_scale == pytest.approx(ref.weight_quantizer.amax.item() / 448, rel=1e-6), name
        for kv in "kv":  # the KV cache: K after RoPE, and V
            ref_scale = getattr(theirs.self_attn, f"{kv}_bmm_quantizer").amax.item() / 448
            assert getattr(layer.self_attn, f"{kv}_cache_quant").scale == pytest.approx(ref_scale, rel=1e-6)
    with torch.no_grad():
        theirs, ours = hf(tokens).logits, lm.model(tokens)
    assert _rel(theirs, unquantized) > 0.05  # FP8 moved this model's logits ...
    assert _rel(ours, theirs) < 1e-5  # ... and the engine moved them as Model Optimizer did


def test_fp8_modelopt_scales_of_a_mixture_of_experts_are_model_optimizers(calib_file, tmp_path):
    """Qwen3-MoE, whose experts transformers holds as 3-D tensors, which Model Optimizer quantizes as
    fused experts: one input scale per projection for all of a layer's experts (the largest, as
    the engine gives them), a weight scale per expert for gate and up together (the engine's
    gate/up scale shared as one GEMM) and one for down; the router left unquantized."""
    from transformers import AutoModelForCausalLM

    from .conftest import make_tokenizer, tiny_moe

    torch.manual_seed(0)
    folder = tmp_path / "moe"
    tiny_moe("qwen3_moe", vocab=400).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    spec = {"source": str(calib_file), "num_samples": 4, "seq_len": 16}
    lm = load(str(folder), "float32")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    _modelopt(hf, cfg, calib.corpus(lm, CalibrationSpec(**spec)))
    apply_recipe(lm, "fp8-modelopt", {"calibration": spec, "quantize_attention": False})
    checked = 0
    for i, layer in enumerate(lm.model.model.layers):
        theirs = hf.model.layers[i].mlp
        if not hasattr(theirs, "experts"):  # the dense layer
            continue
        assert not hasattr(theirs.gate, "input_quantizer") or not theirs.gate.input_quantizer.is_enabled
        e = theirs.experts
        for n, ours in enumerate(layer.mlp.experts):
            assert ours.gate_proj.input_scale == ours.up_proj.input_scale == \
                pytest.approx(e.gate_up_proj_input_quantizer.amax.item() / 448, rel=1e-6)
            assert ours.down_proj.input_scale == pytest.approx(e.down_proj_input_quantizer.amax.item() / 448, rel=1e-6)
            assert ours.gate_proj.weight_scale == ours.up_proj.weight_scale == \
                pytest.approx(e.gate_up_proj_weight_quantizers[n].amax.item() / 448, rel=1e-6)
            assert ours.down_proj.weight_scale == \
                pytest.approx(e.down_proj_weight_quantizers[n].amax.item() / 448, rel=1e-6)
            checked += 1
    assert checked == 4 * (lm.model.config.num_layers - 1)


def test_fp8_modelopt_holds_model_optimizers_fp8_checkpoint(pair, tmp_path):
    """What Model Optimizer's HF export writes for FP8: each projection's E4M3 weight and weight
    scale (the engine's with ``fused_scales=false``, byte for byte), one input scale for q/k/v and
    one for gate/up, the largest of the group's, and K and V cache scales amax / 448 (the
    engine's default form: ``fused_scales`` and ``kv_scale_mode=simulate``)."""
    from safetensors.torch import load_file

    _hf, lm, spec, _seqs, _ = pair
    exported = _modelopt_fp8_export(pair, tmp_path / "exported")
    quant = json.loads((exported / "hf_quant_config.json").read_text())["quantization"]
    assert (quant["quant_algo"], quant["kv_cache_quant_algo"]) == ("FP8", "FP8")
    tensors = load_file(exported / "model.safetensors")
    apart = load(str(lm.folder), "float32")
    apply_recipe(apart, "fp8-modelopt", {"calibration": spec, "fused_scales": False})
    apply_recipe(lm, "fp8-modelopt", {"calibration": spec})
    compared = 0
    for key, value in tensors.items():
        module_name, _, what = key.rpartition(".")
        if not key.startswith("model.layers.") or what not in ("weight", "weight_scale", "input_scale", "k_scale",
                                                                "v_scale"):
            continue
        if what in ("k_scale", "v_scale"):
            attention = lm.model.get_submodule(module_name.rpartition(".")[0])
            assert getattr(attention, f"{what[0]}_cache_quant").scale == pytest.approx(value.item(), rel=1e-6), key
        elif what == "input_scale":
            assert lm.model.get_submodule(module_name).input_scale == pytest.approx(value.item(), rel=1e-6), key
        elif what == "weight_scale":
            assert apart.model.get_submodule(module_name).weight_scale == pytest.approx(value.item(), rel=1e-6), key
        elif value.dtype == torch.float8_e4m3fn:
            assert torch.equal(apart.model.get_submodule(module_name).qweight.view(torch.uint8),
                               value.view(torch.uint8)), key
        else:
            continue
        compared += 1
    assert compared == lm.model.config.num_layers * (7 * 3 + 2)


def test_int4_awq_is_model_optimizers_awq_lite(pair):
    hf, lm, spec, seqs, tokens = pair
    with torch.no_grad():
        unquantized = hf(tokens).logits
    _modelopt(hf, _int4_awq_cfg(32), seqs)
    apply_recipe(lm, "int4-awq", {"calibration": spec, "block_size": 32, "resmooth": False, "kernel": "off"})
    for name, ref in hf.named_modules():
        if name.startswith("model.layers.") and name.endswith("_proj"):
            ours = lm.model.get_submodule(name)
            torch.testing.assert_close(ours.pre_quant_scale, ref.input_quantizer.pre_quant_scale, rtol=1e-6, atol=0)
    with torch.no_grad():
        theirs, ours = hf(tokens).logits, lm.model(tokens)
    assert _rel(theirs, unquantized) > 0.05
    assert _rel(ours, theirs) < 1e-5


def _unpack_modelopt_int4(packed: torch.Tensor) -> torch.Tensor:
    """Model Optimizer's W4A16_AWQ weight [out / 2, in] uint8: rows 2j (low nibble) and 2j + 1
    (high nibble), two's complement (quant_utils.pack_int4_in_uint8)."""
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=1).to(torch.int16)  # [out / 2, 2, in]
    signed = torch.where(nibbles >= 8, nibbles - 16, nibbles)
    return signed.reshape(-1, packed.shape[1]).to(torch.int8)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "olmo2"])
def test_int4_awq_export_form_is_model_optimizers_checkpoint(arch, tiny_dir, calib_file, tmp_path):
    """The default int4-awq (resmooth=true) is the model Model Optimizer's HF export writes: q/k/v's
    and gate/up's shared pre-quant scale folded into the norm before them (Gemma's multiplies by
    1 + weight; OLMo has none there, and each projection of the group keeps that shared scale),
    every projection's INT4 codes and block scales, o_proj's and down_proj's own pre-quant scales;
    for Llama with an FP8 KV cache (``fp8_kv_cache``, hf_ptq's default), its K and V scales too.
    That checkpoint, loaded as published (its inputs scaled by its pre_quant_scale, nothing
    calibrated), computes the recipe's logits."""
    from modelopt.torch.export import export_hf_checkpoint
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from evalsuite.models import load_model_and_recipe

    from .conftest import make_tokenizer, tiny_gemma2, tiny_olmo

    folder = tiny_dir
    if arch != "llama":
        torch.manual_seed(0)
        folder = tmp_path / arch
        (tiny_gemma2(vocab=400) if arch == "gemma2" else tiny_olmo(arch, vocab=400)).save_pretrained(folder)
        make_tokenizer().save_pretrained(folder)
    spec = {"source": str(calib_file), "num_samples": 4, "seq_len": 16}
    kv = arch == "llama"
    lm = load(str(folder), "float32")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if arch == "gemma2":
        hf.config._attn_implementation = "eager"  # its capped scores
    cfg = _int4_awq_cfg(32)
    if kv:
        cfg["quant_cfg"] = cfg["quant_cfg"] + mtq.FP8_KV_CFG["quant_cfg"]
    _modelopt(hf, cfg, calib.corpus(lm, CalibrationSpec(**spec)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_hf_checkpoint(hf, export_dir=tmp_path / "exported")
    quant = json.loads((tmp_path / "exported" / "hf_quant_config.json").read_text())["quantization"]
    assert (quant["quant_algo"], quant["group_size"], quant["has_zero_point"]) == ("W4A16_AWQ", 32, False)
    assert quant["kv_cache_quant_algo"] == ("FP8" if kv else None)
    tensors = load_file(tmp_path / "exported" / "model.safetensors")
    settings = {"block_size": 32, "kernel": "off", "fp8_kv_cache": kv}
    apply_recipe(lm, "int4-awq", {**settings, "calibration": spec})
    compared = {"norm": 0, "codes": 0, "scale": 0, "pre_quant_scale": 0, "kv": 0}
    for key, value in tensors.items():
        if not key.startswith("model.layers."):
            continue
        module_name, _, what = key.rpartition(".")
        ours = lm.model.get_submodule(module_name)
        if key.endswith("norm.weight"):
            torch.testing.assert_close(ours.weight, value, rtol=1e-5, atol=1e-6)  # Gemma: (1 + w) · p - 1
            compared["norm"] += 1
        elif what == "weight":
            assert torch.equal(ours.codes, _unpack_modelopt_int4(value)), key
            compared["codes"] += 1
        elif what == "weight_scale":
            torch.testing.assert_close(ours.scale, value, rtol=1e-6, atol=0)
            compared["scale"] += 1
        elif what == "pre_quant_scale":
            torch.testing.assert_close(ours.pre_quant_scale, value, rtol=1e-6, atol=0)
            compared["pre_quant_scale"] += 1
        elif what in ("k_scale", "v_scale"):
            quantizer = getattr(lm.model.get_submodule(module_name.rsplit(".", 1)[0]), f"{what[0]}_cache_quant")
            assert quantizer.scale == pytest.approx(value.item(), rel=1e-6), key
            compared["kv"] += 1
    layers = lm.model.config.num_layers
    norms = {"llama": 2, "gemma2": 4, "olmo2": 4}[arch]  # OLMo's: after attention and MLP, and q/k's
    scaled_inputs = 7 if arch == "olmo2" else 2  # where no norm precedes, every projection keeps one
    assert compared == {"norm": norms * layers, "codes": 7 * layers, "scale": 7 * layers,
                        "pre_quant_scale": scaled_inputs * layers, "kv": 2 * layers if kv else 0}
    if arch == "olmo2":  # one scale for the group, the mean of theirs, as the engine keeps it
        attention = lm.model.model.layers[0].self_attn
        assert torch.equal(attention.q_proj.pre_quant_scale, attention.v_proj.pre_quant_scale)
    published, record = on_meta_default(  # a tensor made off the model's device fails there
        lambda: load_model_and_recipe(str(tmp_path / "exported"), "int4-awq", "float32", settings))
    assert published.model.config.modelopt == "W4A16_AWQ" and "published" in record
    tokens = torch.tensor([lm.tokenizer.encode("The lazy dog jumps over the quick brown fox. " * 3)[:30]])
    with torch.no_grad():
        assert _rel(on_meta_default(lambda: published.model(tokens)), lm.model(tokens)) < 1e-6
    if kv:  # the engine's own checkpoint holds it (pre_quant_scale, K and V scales); --format hf writes it
        from evalsuite.quant.checkpoint import load_quantized, save_quantized

        back, _ = load_quantized(save_quantized(published, record, tmp_path / "saved"), "float32")
        with torch.no_grad():
            assert torch.equal(back.model(tokens), published.model(tokens))
        _assert_quantize_format_hf_writes(tmp_path / "exported", folder, "int4-awq",
                                          {**settings, "calibration": spec}, tmp_path / "ours")


def test_nvfp4_codes_and_scales_are_model_optimizers():
    """Weights (per-tensor scale from their absmax) and activations (the calibrated tensor scale,
    block scales from each token) through Model Optimizer's NVFP4QTensor and the engine's
    quantizer: the same packed E2M1 codes and E4M3 block scales, exact ties, a zero block and
    blocks at E4M3's smallest scale included (activations are kept clear of that floor, where
    the deployed kernel, which zeroes such a block, and the export's tensor quantizer differ)."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    from evalsuite.quant.nvfp4 import NVFP4Linear, e2m1_codes, global_scale, quantize_blocks

    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(48, 64, generator=g) * torch.exp(torch.randn(48, 1, generator=g))).bfloat16()
    weight[0, :16] = 0  # an all-zero block (scale 1 in the checkpoint) and blocks whose scales would
    weight[1, 16:32] *= 1e-5  # round below E4M3's smallest value (2^-9 there, and some of its values nonzero)
    weight[2, 32:48] *= 3e-6
    linear = torch.nn.Linear(64, 48, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    linear.weight.copy_(weight)
    ours, _ = NVFP4Linear.from_linear(linear, float(weight.abs().max()), 1.0).export()
    ref, block_scale, tensor_scale = NVFP4QTensor.quantize(weight, 16)
    assert tensor_scale.item() == pytest.approx(global_scale(float(weight.abs().max())), rel=1e-7)
    assert torch.equal(ours["weight_packed"], ref._quantized_data)
    assert torch.equal(ours["weight_scale"].view(torch.uint8), block_scale.view(torch.uint8))
    # activations: one row of ties (each value a midpoint between E2M1 neighbours, block scale 2 at
    # tensor scale 0.5, so the values reach the rounding as they are) and random rows
    ties = torch.tensor([[6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0,
                          0.0]])
    for x, scale in ((ties, 0.5), (torch.randn(5, 64, generator=g).bfloat16() * 3, 0.02)):
        values, blocks = quantize_blocks(x, scale)
        ref, ref_blocks, _ = NVFP4QTensor.quantize(x, 16, weights_scaling_factor_2=torch.tensor(scale))
        codes = e2m1_codes(values)
        assert torch.equal(codes[..., 0::2] | (codes[..., 1::2] << 4), ref._quantized_data)
        assert torch.equal(blocks.to(torch.float8_e4m3fn).view(torch.uint8), ref_blocks.view(torch.uint8))


def _modelopt_fp8_export(pair, folder):
    """Model Optimizer's FP8 (+ FP8 KV cache) of the pair's model, calibrated on its sequences and
    saved by Model Optimizer's HF export, with the tokenizer beside it."""
    return _modelopt_export(pair, mtq.FP8_DEFAULT_CFG, folder)


def _modelopt_export(pair, cfg: dict, folder):
    """The pair's model quantized by Model Optimizer with ``cfg`` + its FP8 KV cache, calibrated on
    the pair's sequences and saved by its HF export, with the tokenizer beside it."""
    from modelopt.torch.export import export_hf_checkpoint

    hf, lm, _spec, seqs, _ = pair
    cfg = copy.deepcopy(cfg)
    cfg["quant_cfg"] = cfg["quant_cfg"] + mtq.FP8_KV_CFG["quant_cfg"]
    _modelopt(hf, cfg, seqs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_hf_checkpoint(hf, export_dir=folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def test_a_published_model_optimizer_fp8_checkpoint_runs_as_published(pair, tmp_path):
    """Model Optimizer's own FP8 checkpoint, loaded with fp8-modelopt: its E4M3 weights, weight,
    input and K/V scales are the model's (nothing calibrated), so it computes what the recipe
    computes on the unquantized model (whose scales test_fp8_modelopt_holds_model_optimizers_fp8_
    checkpoint checks against that export), in the default fused form and with every projection
    its own weight scale. Without quantization_config in config.json, hf_quant_config.json says
    the same (as NVIDIA's earlier checkpoints have it)."""
    from evalsuite.models import load_model_and_recipe
    from evalsuite.quant.checkpoint import quantized_modules

    _hf, lm, spec, _seqs, tokens = pair
    exported = _modelopt_fp8_export(pair, tmp_path / "exported")
    config = json.loads((exported / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelopt"
    for fused in (True, False):
        settings = {"quantize_attention": False, "fused_scales": fused}
        published, record = load_model_and_recipe(str(exported), "fp8-modelopt", "float32", settings)
        assert record["name"] == "fp8-modelopt" and published.model.config.modelopt == "FP8" and "published" in record
        assert set(quantized_modules(published.model).values()) == {"FP8StaticLinear", "FP8StaticQuantizer"}
        assert published.model.model.layers[1].self_attn.v_cache_quant is not None
        ours, _ = load_model_and_recipe(str(lm.folder), "fp8-modelopt", "float32", {**settings, "calibration": spec})
        if not fused:  # the export keeps each projection's weight scale but gives q/k/v one input scale
            for layer in ours.model.model.layers:
                for group in (("q", "k", "v"), ("gate", "up")):
                    mods = [layer.get_submodule(f"{'self_attn' if g in 'qkv' else 'mlp'}.{g}_proj") for g in group]
                    for m in mods:
                        m.input_scale = max(x.input_scale for x in mods)
                        m.input_scale_t.fill_(m.input_scale)
        with torch.no_grad():
            want = ours.model(tokens)
        assert _rel(published.model(tokens), want) < 1e-6, fused
    del config["quantization_config"]
    (exported / "config.json").write_text(json.dumps(config))
    earlier, _ = load_model_and_recipe(str(exported), "fp8-modelopt", "float32", {"quantize_attention": False})
    assert earlier.model.config.modelopt == "FP8"


def test_a_published_model_optimizer_fp8_checkpoint_refuses_other_settings_before_it_loads(pair, tmp_path,
                                                                                         monkeypatch):
    from evalsuite.engine.config import ModelConfig, UnsupportedModelError
    from evalsuite.models import check_model_args

    exported = _modelopt_fp8_export(pair, tmp_path / "exported")
    monkeypatch.setattr("evalsuite.engine.load.load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match=r"recipe 'fp8-modelopt': quantize_attention=true, and the checkpoint holds "
                                         r"Model Optimizer's FP8 with an FP8 KV cache \(no scale for attention's FP8 "
                                         r"query inputs\); valid: quantize_attention=false"):
        check_model_args(str(exported), "fp8-modelopt")
    with pytest.raises(ValueError, match=r"recipe 'int4-awq': the checkpoint is published in Model Optimizer's FP8"):
        check_model_args(str(exported), "int4-awq")
    hf = json.loads((exported / "config.json").read_text())
    for algo, kv in (("W4A8_AWQ", "FP8"), ("FP8", None), ("MIXED_PRECISION", None)):
        hf["quantization_config"] = {"quant_method": "modelopt", "quant_algo": algo, "kv_cache_quant_algo": kv}
        with pytest.raises(UnsupportedModelError, match=rf"Model Optimizer checkpoint with quant_algo '{algo}', KV "
                                                         rf"cache {kv!r}.*; the engine loads Model Optimizer's FP8"):
            ModelConfig.from_hf(hf)


def test_e4m3_weights_without_a_declared_form_are_refused(pair, tmp_path):
    """Model Optimizer's export with neither quantization_config nor hf_quant_config.json: E4M3
    tensors whose scaling nothing declares are refused, not read as weights."""
    from evalsuite.engine.load import ModelLoadError, load

    exported = _modelopt_fp8_export(pair, tmp_path / "exported")
    config = json.loads((exported / "config.json").read_text())
    del config["quantization_config"]
    (exported / "config.json").write_text(json.dumps(config))
    (exported / "hf_quant_config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"tensors in .* are E4M3 .*declares no quantization_config"):
        load(str(exported), "float32")


def test_quantize_format_hf_writes_model_optimizers_fp8_checkpoint(pair, tmp_path):
    """``quantize --format hf`` with fp8-modelopt writes what Model Optimizer's HF export writes:
    with ``fused_scales=false`` every tensor of its export (E4M3 weights byte for byte, the weight,
    group input and K/V scales), its config.json quantization_config and hf_quant_config.json but
    for the producer; the default (fused) export loads back as published to the recipe's logits."""
    from safetensors.torch import load_file

    from evalsuite.cli import main
    from evalsuite.models import load_model_and_recipe

    _hf, lm, spec, _seqs, tokens = pair
    theirs = _modelopt_fp8_export(pair, tmp_path / "theirs")
    common = ["quantize", "--model", str(lm.folder), "--recipe", "fp8-modelopt", "--dtype", "float32", "--format",
              "hf", "--recipe-config", f"calibration={json.dumps(spec)}", "quantize_attention=false"]
    assert main([*common, "fused_scales=false", "--output", str(tmp_path / "apart")]) == 0
    got, want = load_file(tmp_path / "apart" / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        if value.dtype == torch.float8_e4m3fn:
            assert torch.equal(got[key].view(torch.uint8), value.view(torch.uint8)), key
        else:
            torch.testing.assert_close(got[key], value, rtol=1e-6, atol=0)
    for name in ("config.json", "hf_quant_config.json"):
        ours, ref = (json.loads((folder / name).read_text()) for folder in (tmp_path / "apart", theirs))
        quant = (lambda c: c["quantization_config"]) if name == "config.json" else (lambda c: c)
        assert quant(ours).pop("producer") == {"name": "evalsuite", "version": evalsuite.__version__}
        quant(ref).pop("producer")
        assert quant(ours) == quant(ref), name
    assert main([*common, "--output", str(tmp_path / "fused")]) == 0
    published, _ = load_model_and_recipe(str(tmp_path / "fused"), "fp8-modelopt", "float32",
                                         {"quantize_attention": False})
    ours, _ = load_model_and_recipe(str(lm.folder), "fp8-modelopt", "float32",
                                    {"quantize_attention": False, "calibration": spec})
    with torch.no_grad():
        assert _rel(published.model(tokens), ours.model(tokens)) < 1e-6


def _assert_quantize_format_hf_writes(theirs, source, recipe: str, settings: dict, out) -> None:
    """``quantize --format hf`` of ``source`` with ``recipe`` writes Model Optimizer's export
    ``theirs``: the same tensors (low-bit ones byte for byte; scales of the calibrated activations
    and AWQ's to 1e-6, where the engine's and transformers' float32 forwards round apart), the same
    config.json quantization_config and hf_quant_config.json but for the producer."""
    from safetensors.torch import load_file

    from evalsuite.cli import main

    assert main(["quantize", "--model", str(source), "--recipe", recipe, "--dtype", "float32", "--format", "hf",
                 "--output", str(out), "--recipe-config", *(f"{k}={json.dumps(v)}" for k, v in settings.items())]) == 0
    got, want = load_file(out / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        if value.dtype in (torch.uint8, torch.float8_e4m3fn):
            assert torch.equal(got[key].view(torch.uint8), value.view(torch.uint8)), key
        else:
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)
    for name in ("config.json", "hf_quant_config.json"):
        ours, ref = (json.loads((folder / name).read_text()) for folder in (out, theirs))
        quant = (lambda c: c["quantization_config"]) if name == "config.json" else (lambda c: c)
        assert quant(ours).pop("producer") == {"name": "evalsuite", "version": evalsuite.__version__}
        quant(ref).pop("producer")
        assert quant(ours) == quant(ref), name


@pytest.mark.parametrize("recipe, settings, message", [
    ("nvfp4", ["fused_scales=false"], "NVFP4 checkpoint form gives q/k/v and gate/up one weight and one input scale "
     "each, so it cannot hold fused_scales=false; valid: --recipe-config fused_scales=true"),
    ("int4-awq", ["block_size=32", "resmooth=false"], "so it cannot hold resmooth=false; valid: --recipe-config "
     "resmooth=true"),
    ("int4-awq", [], "W4A16_AWQ form holds whole groups of block_size=128 along every input, and mlp.down_proj (160 "
     "inputs), mlp.gate_proj (64 inputs), mlp.up_proj (64 inputs) are not; valid: --recipe-config block_size=32, "
     "--recipe-config block_size=16"),
])
def test_quantize_format_hf_refuses_what_model_optimizers_forms_cannot_hold_before_loading(
        tiny_dir, tmp_path, monkeypatch, capsys, recipe, settings, message):
    from evalsuite.cli import main

    monkeypatch.setattr("evalsuite.engine.load.load", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["quantize", "--model", str(tiny_dir), "--recipe", recipe, "--format", "hf", "--output",
                 str(tmp_path / "hf"), *(["--recipe-config", *settings] if settings else [])]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_quantize_format_hf_refuses_fp8_attention_before_loading(tiny_dir, tmp_path, monkeypatch, capsys):
    from evalsuite.cli import main

    monkeypatch.setattr("evalsuite.engine.load.load", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["quantize", "--model", str(tiny_dir), "--recipe", "fp8-modelopt", "--format", "hf", "--output",
                 str(tmp_path / "hf")]) == 2
    assert "cannot hold quantize_attention=true; valid: --recipe-config quantize_attention=false" in \
        capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_nvfp4_is_model_optimizers_nvfp4_checkpoint_and_runs_it_as_published(pair, tmp_path):
    """Model Optimizer's NVFP4 (NVFP4_DEFAULT_CFG + FP8 KV cache) exported by its HF export, the
    form of NVIDIA's *-FP4 checkpoints: the default nvfp4 holds every tensor of it (packed E2M1
    codes and E4M3 block scales byte for byte, each group's shared weight and input tensor scales,
    the K and V scales), and that checkpoint, loaded as published (nothing calibrated), computes
    the recipe's logits."""
    from safetensors.torch import load_file

    from evalsuite.models import load_model_and_recipe
    from evalsuite.quant.checkpoint import quantized_modules

    _hf, lm, spec, _seqs, tokens = pair
    exported = _modelopt_export(pair, mtq.NVFP4_DEFAULT_CFG, tmp_path / "exported")
    ours, _ = load_model_and_recipe(str(lm.folder), "nvfp4", "float32", {"calibration": spec})
    compared = dict.fromkeys(("weight", "weight_scale", "weight_scale_2", "input_scale", "k_scale", "v_scale"), 0)
    for key, value in load_file(exported / "model.safetensors").items():
        module_name, _, what = key.rpartition(".")
        if what not in compared or not module_name.endswith("_proj"):  # lm_head, embeddings, norms: as stored
            continue
        if what in ("k_scale", "v_scale"):
            attention = ours.model.get_submodule(module_name.rsplit(".", 1)[0])
            # activations: the engine's and transformers' float32 forwards round alike to about 1e-7
            assert getattr(attention, f"{what[0]}_cache_quant").scale == pytest.approx(value.item(), rel=1e-6), key
        else:
            exported_form, attrs = ours.model.get_submodule(module_name).export()
            mine = {"weight": exported_form["weight_packed"], "weight_scale": exported_form["weight_scale"],
                    "weight_scale_2": attrs["weight_tensor_scale"], "input_scale": attrs["input_scale"]}[what]
            if what == "input_scale":
                assert mine == pytest.approx(value.item(), rel=1e-6), key
            elif what == "weight_scale_2":
                assert mine == value.item(), key
            else:
                assert mine.dtype == value.dtype and torch.equal(mine.view(torch.uint8), value.view(torch.uint8)), key
        compared[what] += 1
    layers = lm.model.config.num_layers
    assert compared == {"weight": 7 * layers, "weight_scale": 7 * layers, "weight_scale_2": 7 * layers,
                        "input_scale": 7 * layers, "k_scale": layers, "v_scale": layers}
    _assert_quantize_format_hf_writes(exported, lm.folder, "nvfp4", {"calibration": spec}, tmp_path / "ours")
    # loaded and run under the "meta" default device, where a tensor made off the model's device fails
    published, record = on_meta_default(lambda: load_model_and_recipe(str(exported), "nvfp4", "float32"))
    assert published.model.config.modelopt == "NVFP4" and "published" in record
    assert set(quantized_modules(published.model).values()) == {"NVFP4Linear", "FP8StaticQuantizer"}
    with torch.no_grad():
        want = ours.model(tokens)
        assert _rel(want, lm.model(tokens)) > 0.05  # NVFP4 moves them
        assert _rel(on_meta_default(lambda: published.model(tokens)), want) < 1e-6


@pytest.mark.parametrize("algo, kv, recipe, settings, message", [
    ("NVFP4", "FP8", "nvfp4", {"fused_scales": False},
     r"fused_scales=false, and the checkpoint holds Model Optimizer's NVFP4 with an FP8 KV cache \(one weight and one "
     r"input scale per q/k/v and gate/up\); valid: fused_scales=true"),
    ("NVFP4", None, "nvfp4", {}, r"fp8_kv_cache=true, .*NVFP4 with no FP8 KV cache; valid: fp8_kv_cache=false"),
    ("NVFP4", "FP8", "fp8-modelopt", {}, r"the checkpoint is published in Model Optimizer's NVFP4 with an FP8 KV "
     r"cache, which runs as published \(--recipe nvfp4 --recipe-config fp8_kv_cache=true\)"),
    ("W4A16_AWQ", "FP8", "int4-rtn", {}, r"the checkpoint is published in Model Optimizer's W4A16_AWQ in groups of 64 "
     r"with an FP8 KV cache, which runs as published \(--recipe int4-awq --recipe-config block_size=64 "
     r"fp8_kv_cache=true\)"),
    ("W4A16_AWQ", "FP8", "int4-awq", {"block_size": 64, "resmooth": False},
     r"resmooth=false, fp8_kv_cache=false, and the checkpoint holds .*; valid: resmooth=true fp8_kv_cache=true"),
    ("W4A16_AWQ", None, "int4-awq", {}, r"block_size=128, and the checkpoint holds Model Optimizer's W4A16_AWQ in "
     r"groups of 64 with no FP8 KV cache; valid: block_size=64"),
])
def test_published_model_optimizer_checkpoints_refuse_other_settings_before_loading(
        tiny_dir, tmp_path, monkeypatch, algo, kv, recipe, settings, message):
    """NVFP4 and W4A16_AWQ checkpoints (their form in hf_quant_config.json, as NVIDIA's earlier
    checkpoints carry it) run with their recipe and the settings they hold, and nothing else."""
    from evalsuite.models import check_model_args

    folder = tmp_path / "published"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_dir / "config.json").read_text())
    quant = {"quant_algo": algo, "kv_cache_quant_algo": kv, "group_size": 64 if algo == "W4A16_AWQ" else 16,
             "exclude_modules": ["lm_head"]}
    (folder / "hf_quant_config.json").write_text(json.dumps({"quantization": quant}))
    monkeypatch.setattr("evalsuite.engine.load.load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match=rf"recipe '{recipe}': {message}"):
        check_model_args(str(folder), recipe, settings)
    fits = {"NVFP4": "nvfp4", "W4A16_AWQ": "int4-awq"}[algo]
    check_model_args(str(folder), fits, {"fp8_kv_cache": kv == "FP8"} | ({"block_size": 64} if fits == "int4-awq"
                                                                           else {}))
