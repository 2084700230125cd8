"""model.text_encoder_quantization: the frozen text encoders in 8 bits (torchao), one clear error otherwise."""
import sys

import pytest
import torch

from jedi_train.models.components import load_components
from jedi_train.models.joint import JeDiConfig
from jedi_train.models.quantize import check_quantization, quantize_text_encoders, weight_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


def test_int8_text_encoders_are_smaller_and_embed_nearly_alike(tiny_flux_model_dir):
    pytest.importorskip("torchao")
    c = load_components(tiny_flux_model_dir, JeDiConfig(resolution=32))
    ids = c.text.token_ids(["a red can on a beach", "a dog in the snow"])
    before = c.text.embed(ids)
    sizes = [weight_bytes(e) for e in (c.text_encoder, c.text_encoder_2)]
    quantize_text_encoders([c.text_encoder, c.text_encoder_2], "int8", "cpu")
    after = c.text.embed(ids)
    for old, new in ((before.hidden, after.hidden), (before.pooled, after.pooled)):
        assert not torch.equal(old, new)  # the weights did change
        assert (new - old).norm() / old.norm() < 0.05
    linear = [sum(m.weight.numel() for m in e.modules() if isinstance(m, torch.nn.Linear))
              for e in (c.text_encoder, c.text_encoder_2)]
    for size, n_linear, enc in zip(sizes, linear, (c.text_encoder, c.text_encoder_2)):
        saved = size - weight_bytes(enc)
        assert saved > 0.7 * 3 * n_linear  # ~3 of every 4 bytes of each Linear weight (fp32 -> int8 + scales)
    quantize_text_encoders([c.text_encoder], "int8", "cpu")  # idempotent
    assert torch.equal(c.text.embed(ids).hidden, after.hidden)


def test_bad_settings_are_one_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="text_encoder_quantization='int4' is unknown"):
        check_quantization("int4")
    pytest.importorskip("torchao")
    with pytest.raises(ValueError, match="float8 needs a CUDA GPU .* this run is on cpu; use int8"):
        check_quantization("float8", "cpu")
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed
    with pytest.raises(ValueError, match=r"needs torchao: pip install 'jedi-train\[quant\]'"):
        check_quantization("int8")


def test_a_run_with_8bit_text_encoders_exports_them_as_released(tiny_model_dir, tmp_path):
    pytest.importorskip("torchao")
    from jedi_train.export.to_pipeline import export_module
    from jedi_train.training.module import JeDiModule
    from jedi_train.pipelines.pipeline_jedi import JeDiPipeline

    m = JeDiModule(tiny_model_dir, text_encoder_quantization="int8", ema={"enabled": False})
    m.on_fit_start()
    assert m.components.text_encoder._jedi_quantized == "int8"
    batch_ids = m.components.text.token_ids(["a can"])
    assert torch.isfinite(m.components.text.embed(batch_ids).hidden).all()
    out = export_module(m, str(tmp_path / "pipe"))
    pipe = JeDiPipeline.from_pretrained(out)
    released = load_components(tiny_model_dir).text_encoder
    assert all(type(p) is torch.nn.Parameter for p in pipe.text_encoder.parameters())
    for (name, p), q in zip(pipe.text_encoder.named_parameters(), released.parameters()):
        assert torch.equal(p, q), name
