"""Compact sparse checkpoints: lossless round trips, int8 after QAT, sizes, and clear errors on bad files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

from pofa.compact import (
    CODECS,
    CompactFormatError,
    compact_size_report,
    load_compact,
    load_compact_model,
    save_compact,
)
from pofa.quant import QATConfig, convert_to_int8, prepare_qat_

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def prune_(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Random masks (True = kept) on the encoder Linear weights, applied by multiplication (so -0.0 appears)."""
    g = torch.Generator().manual_seed(0)
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".encoder.layer." in f".{name}.":
            mask = torch.rand(module.weight.shape, generator=g) >= sparsity
            with torch.no_grad():
                module.weight.mul_(mask)
            masks[f"{name}.weight"] = mask
    return masks


def batch(seed: int = 0, batch_size: int = 4, seq_len: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY["vocab_size"], (batch_size, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, name
    a_nz, b_nz = a != 0, b != 0
    assert torch.equal(a_nz, b_nz), name
    if a.is_floating_point():  # identical bits for every non-zero value; zeros are +0.0 on load
        bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
        assert torch.equal(a[a_nz].view(bits), b[b_nz].view(bits)), name
    else:
        assert torch.equal(a, b), name


@pytest.mark.parametrize("with_masks", [True, False])
def test_fp32_round_trip_is_bitwise(tmp_path, with_masks):
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(**TINY))  # tied decoder <-> word embeddings
    masks = prune_(model, 0.8)
    path = save_compact(model, tmp_path / "m.safetensors", masks=masks if with_masks else None)
    loaded = load_compact(path)
    state = model.state_dict()
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert_bitwise_equal(tensor, loaded[name], name)
    assert loaded["cls.predictions.decoder.weight"] is loaded["bert.embeddings.word_embeddings.weight"]
    header = json.loads(_metadata(path)["pofa"])
    assert set(header["compact"]) == set(masks)  # masks given, or the default: every encoder Linear weight


def test_negative_zero_of_masking_does_not_cost_space(tmp_path):
    weight = torch.tensor([[-1.0, 2.0], [3.0, -4.0]]) * torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert torch.signbit(weight[0, 0])  # -1 * 0 = -0.0
    path = save_compact({"bert.encoder.layer.0.output.dense.weight": weight}, tmp_path / "z.safetensors")
    header = json.loads(_metadata(path)["pofa"])
    assert header["compact"]["bert.encoder.layer.0.output.dense.weight"]["n_kept"] == 2
    assert torch.equal(load_compact(path)["bert.encoder.layer.0.output.dense.weight"], weight)


def test_load_compact_model_float(tmp_path):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**TINY)).eval()
    masks = prune_(model, 0.9)
    model.config.save_pretrained(tmp_path)
    path = save_compact(model, tmp_path / "m.safetensors", masks=masks)
    loaded = load_compact_model(path, tmp_path)
    assert type(loaded) is BertForSequenceClassification and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(**batch()).logits, model(**batch()).logits)


def test_mask_violation_raises_naming_the_weight(tmp_path):
    model = BertForSequenceClassification(BertConfig(**TINY))
    masks = prune_(model, 0.5)
    name = "bert.encoder.layer.1.intermediate.dense.weight"
    with torch.no_grad():
        model.get_parameter(name)[~masks[name]] = 1.0
    with pytest.raises(ValueError, match=r"intermediate\.dense\.weight.*non-zero"):
        save_compact(model, tmp_path / "m.safetensors", masks=masks)


def qat_trained(masks_sparsity: float = 0.9, **overrides):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**(TINY | overrides)))
    masks = prune_(model, masks_sparsity)
    prepare_qat_(model, QATConfig())
    model.train()
    with torch.no_grad():
        for seed in range(3):
            model(**batch(seed))
    return model.eval(), masks


def test_int8_round_trip_equals_fake_quant_values(tmp_path):
    model, masks = qat_trained()
    int8 = convert_to_int8(model)
    path = save_compact(model, tmp_path / "q.safetensors", masks=masks)  # int8 chosen automatically after QAT
    loaded = load_compact(path)
    for module_name, quantized in int8.items():
        name = f"{module_name}.weight"
        assert torch.equal(loaded[name], quantized.weight.dequantize()), name
        assert torch.all(loaded[name][~masks[name]] == 0)
    header = json.loads(_metadata(path)["pofa"])
    assert {e["encoding"] for e in header["compact"].values()} == {"bitmask_int8"}
    act = header["int8"]["modules"]["bert.encoder.layer.0.attention.self.query"]
    query = model.bert.encoder.layer[0].attention.self.query
    assert (act["act_scale"], act["act_zero_point"]) == query.activation_qparams()

    # Back as a QAT model: same fake-quant outputs, ready for int8 export.
    model.config.save_pretrained(tmp_path)
    reloaded = load_compact_model(path, tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch(7)).logits, model(**batch(7)).logits)


def test_int8_state_dict_needs_the_conversion(tmp_path):
    model, _ = qat_trained()
    with pytest.raises(ValueError, match="convert_to_int8"):
        save_compact(model.state_dict(), tmp_path / "x.safetensors", int8=True)
    path = save_compact(model.state_dict(), tmp_path / "y.safetensors", int8=convert_to_int8(model))
    assert load_compact(path)["bert.encoder.layer.0.output.dense.weight"].dtype == torch.float32


def test_size_report_90_percent_int8_is_20x_smaller_with_a_compressed_bitmask(tmp_path):
    model, masks = qat_trained(0.9, hidden_size=256, intermediate_size=1024, num_attention_heads=4)
    ratios = {}
    for codec in CODECS:
        report = compact_size_report(save_compact(model, tmp_path / f"q-{codec}.safetensors", masks=masks, codec=codec))
        enc = report["encoder_linear_weights"]
        assert enc["kept_fraction"] == pytest.approx(0.1, abs=0.01)
        assert report["model"]["ratio"] > 1.0 and report["file_bytes"] > 0
        ratios[codec] = enc["ratio"]
    # Raw: 1 bit of bitmask + 10% x 8 bits = 1.8 bits per weight (+ per-row fp32 scales) against 32 bits. Coded, the
    # bitmask of these random masks costs about 0.55 (zlib) or 0.49 (lzma) bit per weight: H(0.1) = 0.469.
    assert 15.0 <= ratios["none"] < 32 / 1.8, ratios
    assert ratios["zlib"] >= 20.0 and ratios["lzma"] >= ratios["zlib"], ratios

    model_fp, masks_fp = qat_trained(0.9, hidden_size=256, intermediate_size=1024, num_attention_heads=4)
    fp = compact_size_report(save_compact(model_fp, tmp_path / "f.safetensors", masks=masks_fp, int8=False,
                                          codec="none"))
    assert 6.0 < fp["encoder_linear_weights"]["ratio"] < 32 / 4.2 + 0.5  # 1 + 3.2 bits per weight


@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_round_trips_bitwise(tmp_path, codec):
    model, masks = qat_trained()
    reference = load_compact(save_compact(model, tmp_path / "none.safetensors", masks=masks, codec="none"))
    loaded = load_compact(save_compact(model, tmp_path / "q.safetensors", masks=masks, codec=codec))
    assert set(loaded) == set(reference)
    for name, tensor in reference.items():
        assert_bitwise_equal(tensor, loaded[name], name)
    floats = load_compact(save_compact(model.state_dict(), tmp_path / "f.safetensors", masks=masks, codec=codec))
    for name in masks:
        assert_bitwise_equal(model.state_dict()[name], floats[name], name)


def test_version_1_files_are_still_read(tmp_path):
    """A version-1 file is a version-2 file with raw bitmasks and no codec field."""
    model, masks = qat_trained()
    path = save_compact(model, tmp_path / "v2.safetensors", masks=masks, codec="none")
    from safetensors.torch import load_file

    header = json.loads(_metadata(path)["pofa"]) | {"format_version": 1}
    for entry in header["compact"].values():
        del entry["codec"]
    v1 = tmp_path / "v1.safetensors"
    save_file(load_file(str(path)), str(v1), metadata={"format": "pofa-compact", "pofa": json.dumps(header)})
    for name, tensor in load_compact(path).items():
        assert_bitwise_equal(tensor, load_compact(v1)[name], name)


def test_unknown_codec_and_corrupt_compressed_bytes_raise(tmp_path):
    model, masks = qat_trained()
    with pytest.raises(ValueError, match="codec"):
        save_compact(model, tmp_path / "x.safetensors", masks=masks, codec="brotli")
    path = save_compact(model, tmp_path / "q.safetensors", masks=masks)
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    name = "bert.encoder.layer.1.output.dense.weight"
    tensors[f"{name}/bitmask"] = tensors[f"{name}/bitmask"][: len(tensors[f"{name}/bitmask"]) // 2]
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=_metadata(path))
    with pytest.raises(CompactFormatError, match=r"bad\.safetensors.*output\.dense\.weight.*zlib"):
        load_compact(bad)


def _metadata(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_corrupt_truncated_foreign_and_future_files_raise_naming_the_file(tmp_path):
    model = BertForSequenceClassification(BertConfig(**TINY))
    path = save_compact(model, tmp_path / "good.safetensors", masks=prune_(model, 0.5))
    data = path.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    future = tmp_path / "future.safetensors"
    header = json.loads(_metadata(path)["pofa"]) | {"format_version": 99}
    save_file({"w": torch.zeros(2)}, str(future), metadata={"format": "pofa-compact", "pofa": json.dumps(header)})

    for bad in (truncated, garbage, foreign):
        with pytest.raises(CompactFormatError, match=bad.name):
            load_compact(bad)
    with pytest.raises(CompactFormatError, match=r"future\.safetensors.*version 99"):
        load_compact(future)


def test_inconsistent_bitmask_raises(tmp_path):
    model = BertForSequenceClassification(BertConfig(**TINY))
    path = save_compact(model, tmp_path / "good.safetensors", masks=prune_(model, 0.5))
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    name = "bert.encoder.layer.0.attention.self.key.weight"
    tensors[f"{name}/values"] = tensors[f"{name}/values"][:-3]
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=_metadata(path))
    with pytest.raises(CompactFormatError, match=r"bad\.safetensors.*key\.weight"):
        load_compact(bad)
