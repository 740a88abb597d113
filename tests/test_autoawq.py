"""int4-awq-asym against AutoAWQ itself (autoawq 0.2.9, pinned in scripts/reference.txt), run on
the CPU on the same transformers model and calibration tokens.

AutoAWQ snapshots a module's weights with ``state_dict().cpu()`` before each point of its scale
grid and restores them after it; on a GPU that is a copy, on the CPU the live tensors themselves,
so there every grid point would start from the previous one's scaled weights. The test gives
that snapshot its own copy, as a GPU run has it; nothing else of AutoAWQ is changed.

Checked: the scales it searches and folds into the norms (the same to float32 rounding), and its
clip search, which on the same inputs and weights picks the same clip for every block. Its clip
choices are not compared end to end: the engine's and transformers' float32 activations differ
in the last bits, and among clip candidates whose errors are that close either is as good.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from evalsuite.engine.load import load
from evalsuite.quant import calibrate as calib
from evalsuite.quant.api import apply_recipe
from evalsuite.quant.configs import CalibrationSpec
from evalsuite.quant.int4_awq_asym import search_clip

with warnings.catch_warnings():  # its import shows every DeprecationWarning from then on (and its own
    from awq import AutoAWQForCausalLM  # notice, once); the context puts the filters back
    from awq.quantize.quantizer import AwqQuantizer


def _llama(folder):
    """A Llama whose projections' outputs are multiples of 64, as AutoAWQ's clip search needs,
    saved with the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .conftest import make_tokenizer

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True, pad_token_id=0))
    with torch.no_grad():
        for w in hf.parameters():
            w.normal_(0, 0.15) if w.dim() == 2 else w.normal_(1, 0.3)
    hf.eval().save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def llama_dir(tmp_path):
    return _llama(tmp_path / "llama")


def _autoawq(folder, seqs, monkeypatch) -> tuple:
    """AutoAWQ's GEMM quantization (zero point, groups of 32) of ``folder`` on ``seqs``; its model
    and, per layer, the inputs, weights and results of its clip search."""
    search = AwqQuantizer._compute_best_scale

    def own_snapshot(self, x, w_mean, x_mean, module2inspect, *args, **kwargs):
        cls = type(module2inspect)
        module2inspect.state_dict = lambda *a, **k: {n: v.clone() for n, v in cls.state_dict(module2inspect, *a,
                                                                                                     **k).items()}
        try:
            return search(self, x, w_mean, x_mean, module2inspect, *args, **kwargs)
        finally:
            del module2inspect.state_dict

    clips = []
    clip_search = AwqQuantizer._search_best_clip

    def recorded(self, layer, named_linears, input_feat):
        seen = ({n: t.clone() for n, t in input_feat.items()}, {n: m.weight.clone() for n, m in named_linears.items()})
        found = clip_search(self, layer, named_linears, input_feat)
        clips.append((*seen, dict(found)))
        return found

    monkeypatch.setattr(AwqQuantizer, "_compute_best_scale", own_snapshot)
    monkeypatch.setattr(AwqQuantizer, "_search_best_clip", recorded)
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoAWQForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32, device_map="cpu")
        model.quantize(AutoTokenizer.from_pretrained(folder), calib_data=seqs, max_calib_samples=len(seqs),
                       max_calib_seq_len=len(seqs[0]),
                       quant_config={"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"})
    return model.model, clips


def test_int4_awq_asym_searches_autoawqs_scales_and_clips(llama_dir, calib_file, monkeypatch):
    spec = {"source": str(calib_file), "num_samples": 4, "seq_len": 16}
    lm = load(str(llama_dir), "float32")
    seqs = calib.corpus(lm, CalibrationSpec(**spec))
    assert [len(s) for s in seqs] == [16] * 4  # AutoAWQ cuts its calibration text into blocks of one length
    theirs, clips = _autoawq(llama_dir, seqs, monkeypatch)
    apply_recipe(lm, "int4-awq-asym", {"calibration": spec, "block_size": 32, "kernel": "off"})
    for i, layer in enumerate(lm.model.model.layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):  # q/k/v's and gate/up's scales folded
            ref = theirs.model.layers[i].get_submodule(norm).weight
            assert not torch.allclose(ref, torch.ones_like(ref))
            torch.testing.assert_close(layer.get_submodule(norm).weight, ref, rtol=1e-5, atol=0)
    assert len(clips) == 2
    for inputs, weights, found in clips:
        assert sorted(found) == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.o_proj",
                                 "self_attn.v_proj"]  # q and k are never clipped
        for name, clip in found.items():
            ours = search_clip(weights[name], inputs[name], 32, 20, 0.5, 512)
            assert torch.equal(ours, clip.reshape(ours.shape)), name
            # ... and that clip is not just the block's absmax
            assert (ours < weights[name].abs().reshape(*ours.shape, -1).amax(dim=-1)).any(), name


# --- AutoAWQ's GEMM checkpoints, as published and as the engine writes them -----------------------

def _autoawq_decode(state: dict, group: int) -> dict:
    """Each quantized linear of an AutoAWQ GEMM checkpoint, unpacked by AutoAWQ's own functions:
    name -> (codes [out, in], zero points [out, groups], FP16 scales [out, groups]), and its
    float32 weight (q - z)·scale."""
    from awq.utils.packing_utils import reverse_awq_order, unpack_awq

    out = {}
    for key in [k for k in state if k.endswith(".qweight")]:
        name = key.removesuffix(".qweight")
        q, z = reverse_awq_order(*unpack_awq(state[key], state[f"{name}.qzeros"], 4), 4)
        q, z, s = (q & 15).t(), (z & 15).t(), state[f"{name}.scales"].t()
        weight = (q.float() - z.float().repeat_interleave(group, 1)) * s.float().repeat_interleave(group, 1)
        out[name] = (q, z, s, weight)
    return out


def _transformers_on(plain_folder, state: dict, group: int):
    """transformers' float32 model of ``plain_folder``'s config with an AWQ checkpoint's tensors,
    its quantized weights as AutoAWQ decodes them."""
    from transformers import AutoModelForCausalLM

    decoded = _autoawq_decode(state, group)
    weights = {k: v.float() for k, v in state.items() if not k.endswith((".qweight", ".qzeros", ".scales"))}
    weights.update({f"{name}.weight": d[3] for name, d in decoded.items()})
    ref = AutoModelForCausalLM.from_pretrained(str(plain_folder), dtype=torch.float32).eval()
    missing, unexpected = ref.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied
    return ref


@pytest.fixture(scope="module")
def autoawq_checkpoint(tmp_path_factory):
    """A tiny Llama quantized and saved by AutoAWQ (GEMM, zero point, groups of 32), as AWQ
    checkpoints are published: config.json's quantization_config and model.safetensors, no tokenizer."""
    import json

    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("autoawq")
    _llama(root / "plain")
    seqs = [[(7 * i + 3 * j) % 397 + 2 for j in range(16)] for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoAWQForCausalLM.from_pretrained(str(root / "plain"), torch_dtype=torch.float32, device_map="cpu")
        model.quantize(AutoTokenizer.from_pretrained(root / "plain"), calib_data=seqs, max_calib_samples=4,
                       max_calib_seq_len=16,
                       quant_config={"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"})
        model.save_quantized(str(root / "awq"))
    config = json.loads((root / "awq" / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
                      "modules_to_not_convert": None}
    return root / "plain", root / "awq"


def test_packing_is_autoawqs():
    """awq_unpack reads what AutoAWQ's WQLinear_GEMM packs, as AutoAWQ's unpacker does, and
    awq_pack writes it back bit for bit (every nibble, the sign bit included)."""
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.quantize.quantizer import AwqQuantizer
    from awq.utils.packing_utils import reverse_awq_order, unpack_awq

    from evalsuite.quant.published import awq_pack, awq_unpack

    torch.manual_seed(2)
    linear = torch.nn.Linear(64, 96, bias=False)  # AutoAWQ's packer needs outputs in multiples of 32
    linear.weight.data.normal_(0, 1)
    quantizer = AwqQuantizer.__new__(AwqQuantizer)
    quantizer.w_bit, quantizer.group_size, quantizer.zero_point = 4, 16, True
    linear.weight.data, scales, zeros = quantizer.pseudo_quantize_tensor(linear.weight.data)
    packed = WQLinear_GEMM.from_linear(linear, 4, 16, scales=scales.t().contiguous(), zeros=zeros.t().contiguous())
    q, z = reverse_awq_order(*unpack_awq(packed.qweight, packed.qzeros, 4), 4)
    assert torch.equal(awq_unpack(packed.qweight).long(), (q & 15).long())
    assert torch.equal(awq_unpack(packed.qzeros).long(), (z & 15).long())
    assert set(awq_unpack(packed.qweight).unique().tolist()) == set(range(16))
    assert (packed.qweight < 0).any()  # a top nibble of 8 or more: the sign bit
    assert torch.equal(awq_pack(awq_unpack(packed.qweight)), packed.qweight)
    assert torch.equal(awq_pack(awq_unpack(packed.qzeros)), packed.qzeros)


def test_the_recipes_quantized_projection_is_autoawqs_gemm_module():
    """int4-awq-asym's last step, on weights already scaled and clipped, is AutoAWQ's: its
    quantizer (float32, as its float32 models run it) and WQLinear_GEMM.from_linear, which stores
    FP16 scales and recomputes the codes against them, hold the codes, zero points and scales of
    the recipe's projection, and so its weights."""
    from awq.modules.linear.gemm import WQLinear_GEMM

    from evalsuite.quant.configs import Int4AutoAWQConfig
    from evalsuite.quant.int4 import int4_asym_quantize
    from evalsuite.quant.int4_awq_asym import quantized_linear

    torch.manual_seed(3)
    linear = torch.nn.Linear(128, 64, bias=False)
    w = torch.randn(64, 128) * torch.rand(64, 1) + torch.randn(64, 1) * 0.3  # rows of many ranges and offsets
    quantizer = AwqQuantizer.__new__(AwqQuantizer)
    quantizer.w_bit, quantizer.group_size, quantizer.zero_point = 4, 32, True
    linear.weight.data, scales, zeros = quantizer.pseudo_quantize_tensor(w.clone())
    packed = WQLinear_GEMM.from_linear(linear, 4, 32, scales=scales.t().contiguous(), zeros=zeros.t().contiguous())
    ((q, z, s, weight),) = _autoawq_decode({"p.qweight": packed.qweight, "p.qzeros": packed.qzeros,
                                            "p.scales": packed.scales}, 32).values()
    ours = quantized_linear(w, None, torch.float32, Int4AutoAWQConfig(block_size=32, kernel="off"))
    assert torch.equal(ours.codes.long() + 8, q.long()) and torch.equal(ours.zero_point.long(), z.long())
    assert s.dtype == torch.float16 and torch.equal(ours.scale, s.float())
    assert torch.equal(ours.weight, weight)
    assert not torch.equal(int4_asym_quantize(w, 32)[1], s.float())  # the FP16 rounding is not a no-op here


def test_a_published_autoawq_checkpoint_runs_as_published(autoawq_checkpoint):
    """AutoAWQ's own checkpoint, loaded with int4-awq-asym: its codes, zero points and FP16 scales
    are the model's (nothing quantized again), so the logits are transformers' on the weights
    AutoAWQ's unpacker decodes. The folder has no tokenizer, and running it calibrates nothing."""
    from safetensors.torch import load_file

    from evalsuite.models import check_model_args, load_model_and_recipe
    from evalsuite.quant.checkpoint import quantized_modules

    plain, awq = autoawq_checkpoint
    check_model_args(str(awq), "int4-awq-asym", {"block_size": 32})  # no tokenizer needed: no calibration
    lm, record = load_model_and_recipe(str(awq), "int4-awq-asym", "float32", {"block_size": 32, "kernel": "off"})
    assert record["name"] == "int4-awq-asym" and lm.model.config.awq_group == 32
    assert record["published"].endswith("nothing was calibrated or quantized")
    assert set(quantized_modules(lm.model).values()) == {"Int4WeightOnlyLinear"}
    state = load_file(str(awq / "model.safetensors"))
    decoded = _autoawq_decode(state, 32)
    assert len(decoded) == len(quantized_modules(lm.model)) == 14
    for name, (q, z, s, weight) in decoded.items():
        m = lm.model.get_submodule(name)
        assert torch.equal(m.codes.long() + 8, q.long()) and torch.equal(m.zero_point.long(), z.long()), name
        assert torch.equal(m.scale, s.float()) and torch.equal(m.weight, weight), name
    tokens = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = _transformers_on(plain, state, 32)(tokens).logits
    assert (lm.model(tokens) - want).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="holds no tokenizer"):
        check_model_args(str(awq), "int4-awq-asym", {"block_size": 32}, needs_tokenizer=True)
    # in BF16 the recipe's kernel setting holds as for a quantized model: torch's packed INT4 kernel decodes
    lm16, _ = load_model_and_recipe(str(awq), "int4-awq-asym", "bfloat16", {"block_size": 32})
    lm16.model(tokens[:, :1])
    paths = {m.last_path for m in lm16.model.modules() if type(m).__name__ == "Int4WeightOnlyLinear"}
    assert paths == {"kernel"}


def test_a_published_autoawq_checkpoint_refuses_other_recipes_before_it_loads(autoawq_checkpoint, monkeypatch):
    from evalsuite.models import check_model_args

    _plain, awq = autoawq_checkpoint
    monkeypatch.setattr("evalsuite.engine.load.load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match=r"recipe 'bf16': the checkpoint is published in AutoAWQ's INT4 GEMM form "
                                         r"\(groups of 32\), which runs as published.*other recipes$"):
        check_model_args(str(awq), "bf16")
    with pytest.raises(ValueError, match=r"block_size=128, and the checkpoint's groups are of 32; valid: "
                                         r"block_size=32$"):
        check_model_args(str(awq), "int4-awq-asym")


@pytest.mark.parametrize("change, message", [
    ({"version": "gemv"}, "version 'gemv'"),
    ({"bits": 8}, "bits 8"),
    ({"zero_point": False}, "zero_point False"),
    ({"group_size": -1}, "group_size -1"),
])
def test_other_awq_forms_are_refused_naming_what_differs(change, message):
    import re

    from evalsuite.engine.config import ModelConfig, UnsupportedModelError

    from .conftest import tiny_hf_config

    hf = tiny_hf_config().to_dict()
    hf["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                 "version": "gemm", **change}
    with pytest.raises(UnsupportedModelError, match=rf"AWQ checkpoint with .*{re.escape(message)}.*version gemm"):
        ModelConfig.from_hf(hf)


def test_quantize_format_hf_writes_autoawqs_gemm_form(autoawq_checkpoint, tmp_path):
    """``quantize --format hf`` with int4-awq-asym writes AutoAWQ's GEMM form: AutoAWQ's unpacker
    reads back the engine's codes and zero points and its scales in FP16, config.json says what
    AutoAWQ's own checkpoint says, and the engine runs the export as published (transformers'
    logits on the weights AutoAWQ decodes)."""
    import json

    from safetensors.torch import load_file

    from evalsuite.cli import main
    from evalsuite.models import load_model_and_recipe

    plain, awq = autoawq_checkpoint
    out = tmp_path / "hf"
    settings = {"block_size": 32, "kernel": "off", "calibration": {"num_samples": 2, "seq_len": 16}}
    assert main(["quantize", "--model", str(plain), "--recipe", "int4-awq-asym", "--dtype", "float32",
                 "--format", "hf", "--output", str(out), "--recipe-config",
                 *(f"{k}={json.dumps(v)}" for k, v in settings.items())]) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config == json.loads((awq / "config.json").read_text())["quantization_config"]
    ours, _ = load_model_and_recipe(str(plain), "int4-awq-asym", "float32", settings)
    state = load_file(str(out / "model.safetensors"))
    assert set(state) == set(load_file(str(awq / "model.safetensors")))  # AutoAWQ's names, tensor for tensor
    for name, (q, z, s, _weight) in _autoawq_decode(state, 32).items():
        m = ours.model.get_submodule(name)
        assert torch.equal(m.codes.long() + 8, q.long()) and torch.equal(m.zero_point.long(), z.long()), name
        assert s.dtype == torch.float16 and torch.equal(s.float(), m.scale), name  # the recipe's FP16 scales
    published, _ = load_model_and_recipe(str(out), "int4-awq-asym", "float32", {"block_size": 32, "kernel": "off"})
    tokens = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = _transformers_on(plain, state, 32)(tokens).logits
        assert (published.model(tokens) - want).abs().max() <= 1e-4
        assert torch.equal(published.model(tokens), ours.model(tokens))  # the export is the recipe's model


def test_quantize_format_hf_refuses_groups_the_inputs_do_not_hold_before_loading(tiny_dir, tmp_path, monkeypatch,
                                                                                capsys):
    """AutoAWQ's GEMM form has whole groups along every input: the tiny Llama's 64 inputs take no
    groups of 128, which is said before anything loads, with the block sizes that fit."""
    from evalsuite.cli import main

    monkeypatch.setattr("evalsuite.engine.load.load", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["quantize", "--model", str(tiny_dir), "--recipe", "int4-awq-asym", "--format", "hf", "--output",
                 str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "whole groups of block_size=128 along every input, and mlp.down_proj (160 inputs), mlp.gate_proj (64 " \
        "inputs)" in err
    assert "valid: --recipe-config block_size=32, --recipe-config block_size=16" in err
    assert not (tmp_path / "hf").exists()


def test_quantize_format_hf_of_a_mixture_loads_back_as_published(qwen3_moe_dir, tmp_path):
    """Qwen3-MoE's experts one by one under their checkpoint names, the routers unquantized, and
    the export runs as published to the recipe's logits up to its FP16 scales."""
    from evalsuite.cli import main
    from evalsuite.models import load_model_and_recipe
    from evalsuite.quant.checkpoint import quantized_modules

    out = tmp_path / "hf"
    settings = ["block_size=16", "kernel=off", 'calibration={"num_samples": 2, "seq_len": 16}']
    assert main(["quantize", "--model", str(qwen3_moe_dir), "--recipe", "int4-awq-asym", "--dtype", "float32",
                 "--format", "hf", "--output", str(out), "--recipe-config", *settings]) == 0
    published, _ = load_model_and_recipe(str(out), "int4-awq-asym", "float32", {"block_size": 16, "kernel": "off"})
    names = quantized_modules(published.model)
    assert "model.layers.0.mlp.experts.3.up_proj" in names and "model.layers.0.mlp.gate" not in names
    overrides = {"block_size": 16, "kernel": "off", "calibration": {"num_samples": 2, "seq_len": 16}}
    ours, _ = load_model_and_recipe(str(qwen3_moe_dir), "int4-awq-asym", "float32", overrides)
    for name in names:  # the same codes and zero points; the scales rounded to FP16 and back
        a, b = ours.model.get_submodule(name), published.model.get_submodule(name)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.zero_point, b.zero_point), name
        assert torch.equal(a.scale.half().float(), b.scale), name
