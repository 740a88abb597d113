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


@pytest.fixture
def llama_dir(tmp_path):
    """A Llama whose projections' outputs are multiples of 64, as AutoAWQ's clip search needs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .conftest import make_tokenizer

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True, pad_token_id=0))
    with torch.no_grad():
        for w in hf.parameters():
            w.normal_(0, 0.15) if w.dim() == 2 else w.normal_(1, 0.3)
    hf.eval().save_pretrained(tmp_path / "llama")
    make_tokenizer().save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


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
