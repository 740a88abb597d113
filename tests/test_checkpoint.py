"""Quantize, save, load: the same logits, without calibrating again."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from evalsuite.cli import main
from evalsuite.engine.load import load
from evalsuite.quant import calibrate as calib
from evalsuite.quant.api import apply_recipe
from evalsuite.quant.checkpoint import load_quantized, quantized_modules, save_quantized
from evalsuite.quant.int4 import pack_nibbles, unpack_nibbles


def test_nibble_packing_round_trips():
    codes = torch.tensor([[-8, 7, 0, -1], [3, -3, 5, -8]], dtype=torch.int8)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 2)
    assert packed[0, 0].item() == 0 | (15 << 4)  # -8 -> 0 (low), 7 -> 15 (high)
    assert torch.equal(unpack_nibbles(packed), codes)


@pytest.mark.parametrize("recipe", ["fp8-official", "fp8-modelopt", "int4-awq", "int4-awq-asym", "int8-w8a8"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantize_save_load_same_logits(recipe, dtype, tiny_dir, calib_file, tmp_path, monkeypatch):
    lm = load(str(tiny_dir), dtype)
    over = {} if recipe == "fp8-official" else {
        "calibration": {"source": str(calib_file), "num_samples": 2, "seq_len": 16}}
    if recipe.startswith("int4"):
        over["block_size"] = 32
    record = apply_recipe(lm, recipe, over)
    tokens = torch.randint(0, 400, (2, 20))
    want = lm.model(tokens)
    out = save_quantized(lm, record, tmp_path / "q")
    monkeypatch.setattr(calib, "corpus", lambda *a: (_ for _ in ()).throw(AssertionError("calibrated on load")))
    back, back_record = load_quantized(out, dtype)
    assert back_record == record
    assert quantized_modules(back.model) == quantized_modules(lm.model)
    assert torch.equal(back.model(tokens), want)


@pytest.mark.parametrize("recipe", ["fp8-official", "fp8-modelopt", "int4-awq", "int4-awq-asym"])
def test_phi3_quantizes_as_the_llama_it_equals(recipe, calib_file, tmp_path, monkeypatch):
    """Phi-3 stores q/k/v and gate/up fused. With full RoPE and no window it is a Llama with those
    tensors split (as transformers' LlamaForCausalLM, loaded with them, confirms), so every recipe
    must quantize both alike: the same quantized modules and logits (fp8-modelopt's one scale per
    group is the scale of the fused tensor TensorRT-LLM and vLLM load for Phi-3); and the Phi-3
    checkpoint saves and loads without calibrating again."""
    import transformers

    from .conftest import make_tokenizer

    torch.manual_seed(3)
    phi = transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, rms_norm_eps=1e-5))
    with torch.no_grad():
        for w in phi.parameters():
            w.normal_(0, 0.15) if w.dim() == 2 else None
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, rms_norm_eps=1e-5))
    state = {}
    for k, v in phi.state_dict().items():
        if k.endswith("qkv_proj.weight"):
            state.update(zip([k.replace("qkv", n) for n in "qkv"], v.split([64, 32, 32])))
        elif k.endswith("gate_up_proj.weight"):
            state.update(zip([k.replace("gate_up", n) for n in ("gate", "up")], v.chunk(2)))
        else:
            state[k] = v
    llama.load_state_dict(state)
    tokens = torch.randint(0, 400, (2, 20))
    with torch.no_grad():
        assert torch.allclose(phi(tokens).logits, llama(tokens).logits, atol=1e-5)
    over = {} if recipe == "fp8-official" else {
        "calibration": {"source": str(calib_file), "num_samples": 2, "seq_len": 16}}
    if recipe.startswith("int4"):
        over["block_size"] = 32
    got = {}
    for name, hf in (("phi3", phi), ("llama", llama)):
        hf.save_pretrained(tmp_path / name)
        make_tokenizer().save_pretrained(tmp_path / name)
        lm = load(str(tmp_path / name), "float32")
        got[name] = (lm, apply_recipe(lm, recipe, over), lm.model(tokens))
    (lm, record, want), (llama_lm, _, llama_logits) = got["phi3"], got["llama"]
    assert quantized_modules(lm.model) == quantized_modules(llama_lm.model)
    assert "model.layers.1.mlp.gate_proj" in quantized_modules(lm.model)
    assert (want - llama_logits).abs().max() <= 1e-4
    out = save_quantized(lm, record, tmp_path / "q")
    monkeypatch.setattr(calib, "corpus", lambda *a: (_ for _ in ()).throw(AssertionError("calibrated on load")))
    back, _ = load_quantized(out, "float32")
    assert torch.equal(back.model(tokens), want)


def test_low_bit_tensors_are_stored_low_bit(tiny_dir, tmp_path):
    from safetensors import safe_open

    lm = load(str(tiny_dir), "bfloat16")
    record = apply_recipe(lm, "int4-rtn", {"block_size": 32})
    save_quantized(lm, record, tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        t = f.get_tensor("model.layers.0.mlp.up_proj.packed_codes")
        assert t.dtype == torch.uint8 and t.shape == (160, 32)  # 64 inputs: two codes per byte
    lm = load(str(tiny_dir), "bfloat16")
    record = apply_recipe(lm, "fp8-official")
    save_quantized(lm, record, tmp_path / "f")
    with safe_open(str(tmp_path / "f" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.up_proj.qweight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16


def test_quantize_cli_and_run_from_checkpoint(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_dir), "--recipe", "fp8-official", "--dtype", "float32",
                 "--recipe-config", "activation_scale_ub=600", "--output", str(out)]) == 0
    assert "3 quantized modules" in capsys.readouterr().out
    assert json.loads((out / "quantization.json").read_text())["recipe"]["config"]["activation_scale_ub"] == 600
    # the weights are as readable as the other files (the umask's mode), for a server run as another user
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~umask
    run = tmp_path / "run"
    assert main(["run", "mmlu", "--model", str(out), "--dtype", "float32", "--per-subject", "1",
                 "--subjects", "anatomy", "--formulation", "letter", "--output", str(run), "--no-progress"]) == 0
    assert json.loads((run / "run.json").read_text())["recipe"]["name"] == "fp8-official"
    assert main(["run", "mmlu", "--model", str(out), "--recipe", "int4-awq", "--output", str(tmp_path / "x")]) == 2
    assert "already quantized" in capsys.readouterr().err


def test_checkpoint_loads_on_the_commands_device(tiny_dir, tmp_path, monkeypatch):
    """--device reaches the checkpoint loader (it loaded on the CPU whatever was asked). On a CPU
    machine only the request can be observed: the loader is asked for the command's device."""
    import evalsuite.quant.checkpoint as ckpt

    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_dir), "--recipe", "fp8-official", "--dtype", "float32",
                 "--output", str(out)]) == 0
    asked = []
    real = ckpt.parse_device
    monkeypatch.setattr(ckpt, "parse_device", lambda device: asked.append(device) or real(device))
    assert main(["run", "mmlu", "--model", str(out), "--device", "cpu", "--dtype", "float32", "--per-subject", "1",
                 "--subjects", "anatomy", "--formulation", "letter", "--output", str(tmp_path / "run"),
                 "--no-progress"]) == 0
    assert asked == ["cpu"]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["backend"]["device"] == "cpu"


def test_fp8_kv_cache_placement_runs_when_a_checkpoint_loads(tiny_dir, calib_file, tmp_path, monkeypatch):
    """fp8-modelopt's E4M3 KV cache is a choice for the device (CUDA, FP8 kernels on): made when
    the recipe is applied and again when its checkpoint loads, from the recorded settings."""
    from types import SimpleNamespace

    from evalsuite.quant import api
    from evalsuite.quant.configs import FP8ModelOptConfig
    from evalsuite.quant.fp8 import place_kv_cache

    def on(device: str, kernel: str):
        lm = SimpleNamespace(model=SimpleNamespace(device=torch.device(device), cache_dtype=torch.bfloat16))
        place_kv_cache(lm, {"kernel": kernel})
        return lm.model.cache_dtype

    assert on("cuda", "scaled_mm") == torch.float8_e4m3fn
    assert on("cuda", "off") == on("cpu", "scaled_mm") == torch.bfloat16
    seen = []
    monkeypatch.setitem(api.PLACEMENTS, FP8ModelOptConfig, lambda lm, config: seen.append(config["kernel"]))
    lm = load(str(tiny_dir), "bfloat16")
    record = apply_recipe(lm, "fp8-modelopt", {"kernel": "scaled_mm", "calibration": {
        "source": str(calib_file), "num_samples": 2, "seq_len": 16}})
    save_quantized(lm, record, tmp_path / "q")
    load_quantized(tmp_path / "q")
    assert seen == ["scaled_mm", "scaled_mm"]  # applied, then loaded


def test_deployed_weight_bytes_by_hand(tiny_dir):
    from evalsuite.quant.checkpoint import deployed_weight_bytes

    lm = load(str(tiny_dir), "bfloat16")
    params = sum(p.numel() for p in lm.model.parameters())
    assert deployed_weight_bytes(lm.model) == 2 * params
    apply_recipe(lm, "fp8-official")
    # layer 1's FFN (3 x 64 x 160 weights) drops to 1 byte each and gains a float32 scale per
    # output channel (160 + 160 + 64)
    ffn = 3 * 64 * 160
    assert deployed_weight_bytes(lm.model) == 2 * (params - ffn) + ffn + 4 * (160 + 160 + 64)


@pytest.mark.parametrize("damage,msg", [
    (lambda d: (d / "quantization.json").write_text("{oops"), "quantization.json is not valid JSON"),
    (lambda d: (d / "quantization.json").write_text('{"modules": {}}'), "lacks its 'recipe' record"),
    (lambda d: (d / "model.safetensors").unlink(), "has quantization.json but no model.safetensors"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:200]),
     "corrupt or truncated"),
    (lambda d: _edit_meta(d, lambda m: m["modules"]["model.layers.1.mlp.up_proj"].update(type="FP4Linear")),
     "module model.layers.1.mlp.up_proj has unknown quantized type 'FP4Linear'; known: FP8BlockLinear, "
     "FP8RowwiseLinear"),
    (lambda d: _edit_meta(d, lambda m: m["modules"].update({"model.layers.9.mlp.up_proj":
                                                          m["modules"]["model.layers.1.mlp.up_proj"]})),
     "quantized module model.layers.9.mlp.up_proj does not exist"),
    (lambda d: _drop_tensor(d, "model.layers.1.mlp.up_proj.weight_scale"),
     "FP8RowwiseLinear model.layers.1.mlp.up_proj lacks 'weight_scale'"),
])
def test_load_quantized_errors_name_the_problem(damage, msg, tiny_dir, tmp_path, capsys):
    lm = load(str(tiny_dir), "float32")
    out = save_quantized(lm, apply_recipe(lm, "fp8-official"), tmp_path / "q")
    damage(out)
    from evalsuite.engine.load import ModelLoadError

    with pytest.raises(ModelLoadError, match=msg.replace("(", "\\(").replace("'", ".")):
        load_quantized(out)
    assert main(["run", "mmlu", "--model", str(out), "--output", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "evalsuite: error:" in capsys.readouterr().err


def _edit_meta(folder, change):
    meta = json.loads((folder / "quantization.json").read_text())
    change(meta)
    (folder / "quantization.json").write_text(json.dumps(meta))


def _drop_tensor(folder, name):
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    del state[name]
    save_file(state, str(folder / "model.safetensors"))


@pytest.fixture(params=["gemma2", "gemma3"])
def gemma_dir(request, tmp_path):
    from .conftest import make_tokenizer, tiny_gemma2, tiny_gemma3

    torch.manual_seed(7)
    hf = (tiny_gemma2 if request.param == "gemma2" else tiny_gemma3)()
    hf.save_pretrained(tmp_path / request.param)
    make_tokenizer().save_pretrained(tmp_path / request.param)
    return tmp_path / request.param, hf


def test_gemma_awq_scales_fold_into_its_norms(gemma_dir, calib_file):
    """Gemma's norms multiply by 1 + weight, and its MLP reads pre_feedforward_layernorm (its
    post_attention_layernorm follows attention). Both AWQ forms fold their scales into those
    norms: unquantized, the folded model still computes transformers' logits."""
    from evalsuite.quant.int4_awq import smoothed
    from evalsuite.quant.int4_awq_asym import Int4AutoAWQConfig, fold_scales, layer_batches, search_layer

    folder, hf = gemma_dir
    tokens = torch.randint(0, 400, (2, 30))
    with torch.no_grad():
        want = hf(tokens).logits
    # Model Optimizer's export: one pre-quant scale per group, in the norm before it
    model = load(str(folder), "float32").model
    g = torch.Generator().manual_seed(5)
    mods = {n: m for n, m in model.named_modules() if n.endswith("_proj")}
    pre = {n: torch.exp(torch.randn(m.weight.shape[1], generator=g) * 0.5) for n, m in mods.items()}
    weights, scales = smoothed(model, pre, resmooth=True)
    with torch.no_grad():
        for n, w in weights.items():
            if n not in scales:  # o_proj and down_proj keep a run-time scale: left as they were
                mods[n].weight.copy_(w)
        assert (model(tokens) - want).abs().max() <= 1e-4
    # AutoAWQ's: found by its search on the calibration text, every group's scale folded
    lm = load(str(folder), "float32")
    model = lm.model
    seqs = [lm.tokenizer.encode(calib_file.read_text())[:24]] * 2
    batches = layer_batches(model, seqs)
    with torch.no_grad():
        for layer in model.model.layers:
            found = search_layer(layer, batches, Int4AutoAWQConfig(block_size=32))
            assert not torch.allclose(found["mlp.scale"], torch.ones_like(found["mlp.scale"]))
            batches = [(layer(x, c, s, st), c, s, st) for x, c, s, st in batches]
            for name, w in fold_scales(layer, found).items():
                layer.get_submodule(name).weight.copy_(w)
        assert (model(tokens) - want).abs().max() <= 1e-4


@pytest.mark.parametrize("recipe", ["fp8-official", "fp8-modelopt", "int4-awq", "int4-awq-asym"])
def test_gemma_quantizes_saves_and_loads(recipe, gemma_dir, calib_file, tmp_path, monkeypatch):
    """Every recipe on Gemma 2 and 3: its projections quantized, its logits moved but not lost (this
    tiny random model is sensitive: INT4 moves a Llama of the same shapes and weights by 40-55%
    too), and the checkpoint loads back to the same logits without calibrating again. That the
    AWQ scales fold into Gemma's norms correctly is the test above."""
    folder, _ = gemma_dir
    tokens = torch.randint(0, 400, (2, 20), generator=torch.Generator().manual_seed(1))
    lm = load(str(folder), "float32")
    before = lm.model(tokens)
    over = {} if recipe == "fp8-official" else {
        "calibration": {"source": str(calib_file), "num_samples": 2, "seq_len": 16}}
    if recipe.startswith("int4"):
        over["block_size"] = 32
    record = apply_recipe(lm, recipe, over)
    want = lm.model(tokens)
    assert "model.layers.1.mlp.gate_proj" in quantized_modules(lm.model)
    assert 0 < (want - before).norm() < before.norm()
    _assert_loads_back_the_same(lm, record, tmp_path, monkeypatch, tokens)


def _assert_loads_back_the_same(lm, record: dict, tmp_path, monkeypatch, tokens=None) -> None:
    """``lm``'s quantized checkpoint, saved and loaded back without calibrating again, gives the
    logits ``lm`` gives."""
    tokens = torch.randint(0, 400, (2, 20)) if tokens is None else tokens
    want = lm.model(tokens)
    out = save_quantized(lm, record, tmp_path / "q")
    monkeypatch.setattr(calib, "corpus", lambda *a: (_ for _ in ()).throw(AssertionError("calibrated on load")))
    back, _ = load_quantized(out, "float32")
    assert torch.equal(back.model(tokens), want)


@pytest.mark.parametrize("recipe", ["fp8-official", "fp8-modelopt", "int4-awq-asym", "int4-rtn"])
def test_mixture_of_experts_quantizes_saves_and_loads(recipe, qwen3_moe_dir, calib_file, tmp_path, monkeypatch):
    """Qwen3-MoE: every expert's projections quantized as a dense MLP's (fp8-official's in the
    inner layers only), the routers left in BF16 as Model Optimizer leaves them; the checkpoint
    loads back to the same logits without calibrating again."""
    lm = load(str(qwen3_moe_dir), "float32")
    over = {"calibration": {"source": str(calib_file), "num_samples": 2, "seq_len": 16}} \
        if recipe in ("fp8-modelopt", "int4-awq-asym") else {}
    if recipe.startswith("int4"):
        over["block_size"] = 32
    record = apply_recipe(lm, recipe, over)
    names = quantized_modules(lm.model)
    experts = {f"model.layers.{i}.mlp.experts.{e}.{p}_proj" for i in (0, 2, 3) for e in range(4)
               for p in ("gate", "up", "down")}
    assert not any(n.endswith("mlp.gate") for n in names)  # the routers
    if recipe == "fp8-official":  # the FFN of the inner layers: layer 1's dense MLP, layer 2's experts
        assert set(names) == {f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")} | {
            n for n in experts if n.startswith("model.layers.2.")}
    else:
        assert experts <= set(names) and "model.layers.1.mlp.down_proj" in names
    _assert_loads_back_the_same(lm, record, tmp_path, monkeypatch)


@pytest.mark.parametrize("recipe", ["fp8-official", "fp8-modelopt", "int4-rtn"])
def test_gpt_oss_experts_quantize_with_their_biases_saves_and_loads(recipe, calib_file, tmp_path, monkeypatch):
    """gpt-oss: every expert's projections and o_proj quantized with their biases kept (BF16 in a
    deployed checkpoint), the routers and the sinks left as they are; the checkpoint loads back
    to the same logits."""
    from .conftest import make_tokenizer, tiny_gpt_oss

    torch.manual_seed(12)
    tiny_gpt_oss().save_pretrained(tmp_path / "g")
    make_tokenizer().save_pretrained(tmp_path / "g")
    lm = load(str(tmp_path / "g"), "float32")
    sinks = lm.model.model.layers[1].self_attn.sinks.clone()
    over = {"calibration": {"source": str(calib_file), "num_samples": 2, "seq_len": 16}} \
        if recipe == "fp8-modelopt" else {"block_size": 32} if recipe == "int4-rtn" else {}
    record = apply_recipe(lm, recipe, over)
    names = set(quantized_modules(lm.model))
    layers = (1, 2) if recipe == "fp8-official" else (0, 1, 2, 3)
    assert {f"model.layers.{i}.mlp.experts.{e}.{p}_proj" for i in layers for e in range(4)
            for p in ("gate", "up", "down")} <= names
    assert not any(n.endswith("mlp.gate") for n in names)
    expert = lm.model.model.layers[1].mlp.experts[3]
    assert expert.down_proj.bias is not None and expert.down_proj.bias.abs().sum() > 0
    assert torch.equal(lm.model.model.layers[1].self_attn.sinks, sinks)
    _assert_loads_back_the_same(lm, record, tmp_path, monkeypatch)


@pytest.mark.parametrize("recipe", ["fp8-official", "fp8-modelopt", "int4-rtn"])
def test_shared_expert_is_quantized_as_a_dense_mlp(recipe, qwen2_moe_dir, calib_file, tmp_path, monkeypatch):
    """Qwen2-MoE: the shared expert's projections are quantized as the experts' are (fp8-official:
    in the inner layers only), its sigmoid gate and the router stay BF16 (Model Optimizer's
    ``*mlp.shared_expert_gate.*`` exclusion); the checkpoint loads back to the same logits."""
    lm = load(str(qwen2_moe_dir), "float32")
    over = {"calibration": {"source": str(calib_file), "num_samples": 2, "seq_len": 16}} \
        if recipe == "fp8-modelopt" else {"block_size": 32} if recipe == "int4-rtn" else {}
    record = apply_recipe(lm, recipe, over)
    names = set(quantized_modules(lm.model))
    layers = (1,) if recipe == "fp8-official" else (0, 1, 3)  # layer 2 is a dense MLP
    shared = {f"model.layers.{i}.mlp.shared_expert.{p}_proj" for i in layers for p in ("gate", "up", "down")}
    assert shared <= names
    assert not any(n.endswith(("mlp.gate", "mlp.shared_expert_gate")) for n in names)  # the routers
    assert any(n.startswith("model.layers.1.mlp.experts.3.") for n in names)
    if recipe == "fp8-modelopt":  # the shared expert's gate and up: one weight scale (one GEMM deployed)
        mlp = lm.model.model.layers[0].mlp.shared_expert
        assert mlp.gate_proj.weight_scale == mlp.up_proj.weight_scale
    _assert_loads_back_the_same(lm, record, tmp_path, monkeypatch)


@pytest.mark.parametrize("arch, recipe", [("mixtral", "int4-awq"), ("qwen2_moe", "int4-awq"),
                                          ("qwen2_moe", "int4-awq-asym"), ("gpt_oss", "int4-awq"),
                                          ("gpt_oss", "int4-awq-asym")])
def test_awq_recipes_refuse_a_mixture_of_experts_before_calibrating(arch, recipe, tmp_path, monkeypatch):
    """int4-awq on any mixture (its experts share the norm its scales fold into); int4-awq-asym
    on a mixture with a shared expert (AutoAWQ folds two scales into that norm) and on gpt-oss
    (its experts' clamps and up + 1 let no scale fold from up into down)."""
    from .conftest import make_tokenizer, tiny_gpt_oss, tiny_moe

    (tiny_gpt_oss() if arch == "gpt_oss" else tiny_moe(arch)).save_pretrained(tmp_path / "moe")
    make_tokenizer().save_pretrained(tmp_path / "moe")
    from evalsuite.models import check_model_args

    why = {"qwen2_moe": "shared expert's and the routed experts' scales", "gpt_oss": "clamp gate and up"}.get(
        arch) if recipe == "int4-awq-asym" else "mixture of experts"
    fits = "int4-awq-asym, int4-gptq, int4-rtn, int8-w8a8" if arch == "mixtral" else "int4-gptq, int4-rtn, int8-w8a8"
    refusal = (f"recipe '{recipe}'.*{why}.*valid for this model: bf16, fp8-block, fp8-dynamic, fp8-modelopt, "
               f"fp8-official, {fits}, nvfp4$")
    with pytest.raises(ValueError, match=refusal):  # what a command checks before it loads the model
        check_model_args(str(tmp_path / "moe"), recipe, {"block_size": 32})
    lm = load(str(tmp_path / "moe"), "float32")
    monkeypatch.setattr(calib, "corpus", lambda *a: (_ for _ in ()).throw(AssertionError("calibrated")))
    with pytest.raises(ValueError, match=refusal):
        apply_recipe(lm, recipe, {"block_size": 32})


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_autoawq_scales_fold_into_a_mixture_of_experts(arch, calib_file, tmp_path):
    """AutoAWQ's form on a mixture of experts: one scale s for every expert's gate and up, folded
    into the norm they all read, and each expert's down after its own up, searched on the tokens
    routed to it. As AutoAWQ folds them, the router (not among the scaled projections) then reads
    the norm's output divided by s with its weights untouched, so routing may change; each
    expert computes on x / s what it computed on x. And the folded model's logits are what
    transformers computes with the same weights."""
    from evalsuite.quant.int4_awq_asym import Int4AutoAWQConfig, fold_scales, layer_batches, search_layer

    from .conftest import make_tokenizer, tiny_moe

    torch.manual_seed(10)
    hf = tiny_moe(arch)
    hf.save_pretrained(tmp_path / arch)
    make_tokenizer().save_pretrained(tmp_path / arch)
    lm = load(str(tmp_path / arch), "float32")
    model = lm.model
    ids = lm.tokenizer.encode(calib_file.read_text())
    batches = layer_batches(model, [ids[i:i + 32] for i in range(0, 128, 32)])
    x = torch.randn(50, 64)
    with torch.no_grad():
        for layer in model.model.layers:
            found = search_layer(layer, batches, Int4AutoAWQConfig(block_size=32))
            batches = [(layer(h, c, s, st), c, s, st) for h, c, s, st in batches]
            if not hasattr(layer.mlp, "experts"):
                continue
            assert {f"down.{e}.scale" for e in range(4)} <= set(found)
            router, before = layer.mlp.gate.weight.clone(), [expert(x) for expert in layer.mlp.experts]
            for name, w in fold_scales(layer, found).items():
                layer.get_submodule(name).weight.copy_(w)
            assert torch.equal(layer.mlp.gate.weight, router)
            after = [expert(x / found["mlp.scale"]) for expert in layer.mlp.experts]
            assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(after, before))
    hf.load_state_dict(_as_transformers_holds_it(model.state_dict(), hf.state_dict()))
    tokens = torch.randint(0, 400, (2, 30))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max() <= 1e-4


def _as_transformers_holds_it(ours: dict, theirs: dict) -> dict:
    """The engine's tensors under transformers 5's names: each layer's experts in one 3-D
    gate_up_proj (gate first) and down_proj."""
    out = {}
    for key, value in theirs.items():
        if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            prefix, what = key.rsplit(".", 1)
            parts = ["gate_proj", "up_proj"] if what == "gate_up_proj" else ["down_proj"]
            out[key] = torch.stack([torch.cat([ours[f"{prefix}.{e}.{p}.weight"] for p in parts])
                                    for e in range(value.shape[0])])
        else:
            out[key] = ours[key] if key in ours else ours["model.embed_tokens.weight"]  # a tied lm_head
    return out


@pytest.fixture
def olmo_dir(tmp_path):
    from .conftest import make_tokenizer, tiny_olmo

    torch.manual_seed(8)
    tiny_olmo("olmo3", vocab=400).save_pretrained(tmp_path / "olmo")
    make_tokenizer().save_pretrained(tmp_path / "olmo")
    return tmp_path / "olmo"


def test_olmo_awq_group_scale_stays_on_its_projections(olmo_dir):
    """OLMo has no norm before q/k/v or gate/up for Model Optimizer's shared pre-quant scale to
    fold into: each projection of a group scales its input by the group's scale at run time, and
    its resmoothed weight times that scale is the original weight."""
    from evalsuite.quant.int4_awq import smoothed

    model = load(str(olmo_dir), "float32").model
    g = torch.Generator().manual_seed(5)
    mods = {n: m for n, m in model.named_modules() if n.endswith("_proj")}
    own = {n: torch.exp(torch.randn(m.weight.shape[1], generator=g) * 0.5) for n, m in mods.items()}
    weights, scales = smoothed(model, own, resmooth=True)
    assert set(scales) == set(own)  # every projection keeps a run-time scale
    for group in (["q", "k", "v"], ["gate", "up"]):
        names = [f"model.layers.2.{'self_attn' if 'q' in group else 'mlp'}.{p}_proj" for p in group]
        assert all(torch.equal(scales[n], scales[names[0]]) for n in names)
        assert not torch.equal(scales[names[0]], own[names[0]])  # the group's, not the projection's own
        for n in names:
            torch.testing.assert_close(weights[n] * scales[n][None, :], mods[n].weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recipe", ["fp8-official", "fp8-modelopt", "int4-awq", "nvfp4"])
def test_olmo_quantizes_saves_and_loads(recipe, olmo_dir, calib_file, tmp_path, monkeypatch):
    """OLMo 3 (post-norms only, q/k norms over all heads, windows): every recipe that fits quantizes
    its projections, moves its logits without losing them, and loads back to the same logits;
    int4-awq-asym is refused before the model loads (AutoAWQ folds into the norms OLMo lacks)."""
    from evalsuite.models import check_model_args

    with pytest.raises(ValueError, match=r"'int4-awq-asym'.*norm before them.*valid for this model: bf16, fp8-block, "
                                         r"fp8-dynamic, fp8-modelopt, fp8-official, int4-awq, int4-gptq, int4-rtn, "
                                         r"nvfp4$"):
        check_model_args(str(olmo_dir), "int4-awq-asym", None)
    tokens = torch.randint(0, 400, (2, 20), generator=torch.Generator().manual_seed(1))
    lm = load(str(olmo_dir), "float32")
    before = lm.model(tokens)
    over = {} if recipe == "fp8-official" else {
        "calibration": {"source": str(calib_file), "num_samples": 2, "seq_len": 16}}
    if recipe == "int4-awq":
        over["block_size"] = 32
    record = apply_recipe(lm, recipe, over)
    want = lm.model(tokens)
    quantized = set(quantized_modules(lm.model))  # fp8-official: the inner layers' MLPs only
    assert "model.layers.1.mlp.gate_proj" in quantized
    assert ("model.layers.1.self_attn.k_proj" in quantized) == (recipe != "fp8-official")
    assert 0 < (want - before).norm() < before.norm()
    _assert_loads_back_the_same(lm, record, tmp_path, monkeypatch, tokens)
