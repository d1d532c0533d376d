"""Sparse CPU execution matches dense (fp32) and the QAT model (int8); the latency benchmark runs (no timing
assertions, ever)."""

from __future__ import annotations

import copy
import gc
import pickle

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from pofa.quant.qat import FakeQuantLinear
from pofa.runtime import (
    CSRLinear,
    NumbaCSRLinear,
    SparseRuntimeConfig,
    benchmark_latency,
    compiler_available,
    numba_available,
    sparsify_,
)

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
BACKENDS = [CSRLinear] + ([NumbaCSRLinear] if numba_available() else [])
needs_numba = pytest.mark.skipif(not numba_available(), reason="numba not installed (pofa[sparse-runtime])")


def pruned_linear(in_features: int, out_features: int, sparsity: float, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) >= sparsity)
        linear.weight[3] = 0.0  # an empty CSR row
    return linear


def tiny_pruned_encoder(sparsity: float = 0.9) -> BertModel:
    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY)).eval()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("encoder.layer."):
            with torch.no_grad():
                w = module.weight
                threshold = w.abs().flatten().kthvalue(int(sparsity * w.numel())).values
                w.mul_(w.abs() > threshold)
    return model


@pytest.mark.parametrize("module_cls", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5,), (2, 7), (3, 1, 4)])
def test_sparse_linear_matches_dense(module_cls, bias, shape):
    linear = pruned_linear(48, 40, 0.9, bias=bias)
    sparse = module_cls(linear)
    x = torch.randn(*shape, 48)
    with torch.no_grad():
        expected = linear(x)
        got = sparse(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch"] + (["numba"] if numba_available() else []))
def test_sparsified_encoder_matches_dense(backend):
    dense = tiny_pruned_encoder()
    sparse = sparsify_(copy.deepcopy(dense), SparseRuntimeConfig(backend=backend))
    swapped = [m for m in sparse.modules() if isinstance(m, (CSRLinear, NumbaCSRLinear))]
    assert len(swapped) == 2 * 6
    assert type(sparse.pooler.dense) is nn.Linear  # dense weights stay dense
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (3, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.no_grad():
        expected = dense(input_ids=ids, attention_mask=mask).last_hidden_state
        got = sparse(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_sparsify_refuses_a_dense_model():
    with pytest.raises(ValueError, match="prune the model first"):
        sparsify_(BertModel(BertConfig(**TINY)), SparseRuntimeConfig(backend="torch"))


def test_config_validation():
    with pytest.raises(ValueError, match="backend"):
        SparseRuntimeConfig(backend="scipy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_sparsity"):
        SparseRuntimeConfig(min_sparsity=1.5)
    assert SparseRuntimeConfig(backend="auto").resolved_backend() == ("numba" if numba_available() else "torch")


# ---------------------------------------------------------------------------------------------------------------
# Sparse int8
# ---------------------------------------------------------------------------------------------------------------

needs_compiler = pytest.mark.skipif(not compiler_available(), reason="no C compiler for the sparse int8 kernel")


def _isa_paths() -> list[str]:
    """Every path of sparse_int8.c this CPU can run: native, and on x86 the AVX2 and portable builds."""
    import platform

    flags = open("/proc/cpuinfo").read() if platform.system() == "Linux" else ""
    paths = ["native"]
    if platform.machine() in ("x86_64", "AMD64"):
        paths += (["haswell"] if " avx2 " in flags and " fma " in flags and " bmi2 " in flags else []) + ["x86-64"]
    return paths


def qat_linear(in_features: int, out_features: int, *, bias: bool = True, per_channel: bool = True,
               activation_bits: int = 8, seed: int = 0) -> FakeQuantLinear:
    """A 90%-sparse FakeQuantLinear whose observer saw one batch (a negative-to-positive activation range)."""
    from pofa.quant import QATConfig, prepare_qat_

    torch.manual_seed(seed)
    holder = nn.Sequential(pruned_linear(in_features, out_features, 0.9, bias=bias))
    config = QATConfig(per_channel=per_channel, activation_bits=activation_bits)
    prepare_qat_(holder, config, filter_fn=lambda m, fqn: True).train()
    with torch.no_grad():
        holder(torch.randn(64, in_features) * 2 + 0.5)
    return holder[0].eval()


@needs_compiler
@pytest.mark.parametrize("arch", _isa_paths())
@pytest.mark.parametrize(
    "shape, in_features, out_features, kwargs",
    [((3, 70), 48, 40, {}),                      # tokens not a multiple of any token block
     ((1, 5), 50, 33, {"bias": False}),          # in_features not a multiple of 4, rows not a multiple of 16
     ((2, 128), 64, 96, {"per_channel": False}),  # one weight scale; two token blocks of 64 / four of 32
     ((7,), 48, 16, {"activation_bits": 6})],
)
def test_sparse_int8_linear_computes_what_the_qat_linear_does(arch, shape, in_features, out_features, kwargs):
    from pofa.runtime import SparseInt8Linear, sparse_int8_kernel

    fq = qat_linear(in_features, out_features, **kwargs)
    kernel = sparse_int8_kernel(arch)
    sparse = SparseInt8Linear.from_qat(fq, kernel)
    x = torch.randn(*shape, in_features) * 3  # beyond the observed range: clamping is exercised too
    with torch.no_grad():
        expected = fq(x)
        got = sparse(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    # The same integers; only the float rounding of the QAT model's float matmul differs.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@needs_compiler
@pytest.mark.parametrize("arch", _isa_paths())
@pytest.mark.parametrize("tokens, in_features, out_features",
                         [(1, 4, 1), (70, 50, 33), (130, 300, 48), (64, 96, 16), (3, 7, 100)])
def test_sparse_int8_kernel_sums_exactly_the_reference_integers(arch, tokens, in_features, out_features):
    # Unit scales, no bias and integer inputs make the kernel's output the integer product itself (below 2**24,
    # exact in float32): any lost, doubled or misplaced non-zero, token or row shows as a different integer.
    from pofa.quant.qat import ActivationQuant
    from pofa.runtime import SparseInt8Linear, pack_sparse_int8, sparse_int8_kernel

    g = torch.Generator().manual_seed(tokens * 1000 + in_features)
    q = torch.randint(-127, 128, (out_features, in_features), generator=g)
    q = (q * (torch.rand(out_features, in_features, generator=g) >= 0.9)).to(torch.int8)
    q[0] = 0  # an empty row
    zero_point = 37
    x = torch.randint(-zero_point, 256 - zero_point, (tokens, in_features), generator=g)  # q_x - zero_point = x
    packed = pack_sparse_int8(q, torch.ones(out_features), ActivationQuant(1.0, zero_point, 8))
    got = SparseInt8Linear(packed, sparse_int8_kernel(arch))(x.float())
    expected = x.to(torch.int64) @ q.to(torch.int64).T
    assert torch.equal(got.to(torch.int64), expected) and torch.equal(got, expected.float())


@needs_compiler
@pytest.mark.parametrize("arch", _isa_paths())
def test_the_fused_gelu_is_the_gelu_of_the_linears_output(arch):
    import torch.nn.functional as F

    from pofa.quant.qat import ActivationQuant
    from pofa.runtime import SparseInt8Linear, pack_sparse_int8, sparse_int8_kernel
    from pofa.runtime.int8 import concat_packed

    g = torch.Generator().manual_seed(0)
    q = (torch.randint(-127, 128, (40, 48), generator=g) * (torch.rand(40, 48, generator=g) >= 0.9)).to(torch.int8)
    packed = pack_sparse_int8(q, torch.full((40,), 0.02), ActivationQuant(0.05, 128, 8), torch.randn(40, generator=g))
    kernel = sparse_int8_kernel(arch)
    plain, fused = SparseInt8Linear(packed, kernel), SparseInt8Linear(packed, kernel, activation="gelu")
    x = torch.randn(70, 48, generator=g) * 4  # outputs from about -10 to 10: both tails of erf, the clamp of exp
    with torch.no_grad():
        linear_out = plain(x)
        torch.testing.assert_close(fused(x), F.gelu(linear_out), rtol=0, atol=2e-6 * float(linear_out.abs().max()))
    assert float(linear_out.min()) < -5 and float(linear_out.max()) > 5
    with pytest.raises(ValueError, match="activation 'relu'"):
        SparseInt8Linear(packed, kernel, activation="relu")
    other = pack_sparse_int8(torch.zeros(4, 48, dtype=torch.int8), torch.ones(4), ActivationQuant(0.5, 3, 8))
    with pytest.raises(ValueError, match="activation quantization"):
        concat_packed([packed, other])


@needs_compiler
@pytest.mark.parametrize("arch", _isa_paths())
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_the_residual_is_added_in_the_call(arch, activation):
    from pofa.runtime import SparseInt8Linear, sparse_int8_kernel
    from pofa.runtime.int8 import pack_qat

    fq = qat_linear(50, 33)  # rows not a multiple of 16: the masked tail of the epilogue
    linear = SparseInt8Linear(pack_qat(fq), sparse_int8_kernel(arch), activation=activation)
    x, residual = torch.randn(3, 70, 50), torch.randn(3, 70, 33)
    with torch.no_grad():
        assert torch.equal(linear(x, residual=residual), linear(x) + residual)  # the same float addition
        with pytest.raises(ValueError, match="residual of shape"):
            linear(x, residual=residual[:, :5])


@needs_compiler
def test_linears_sharing_an_input_compute_each_ones_own_output_in_any_call_order():
    from pofa.runtime import SparseInt8Linear, sparse_int8_kernel
    from pofa.runtime.int8 import SharedInputLinears, concat_packed, pack_qat

    torch.manual_seed(0)
    holder = nn.ModuleDict({name: pruned_linear(48, rows, 0.9) for name, rows in [("q", 40), ("k", 40), ("v", 24)]})
    from pofa.quant import QATConfig, prepare_qat_

    prepare_qat_(holder, QATConfig(), filter_fn=lambda m, fqn: True).train()
    x0 = torch.randn(64, 48)
    with torch.no_grad():
        for linear in holder.values():
            linear(x0)  # the observers see the same input, as attention's query, key and value do
    holder.eval()
    kernel = sparse_int8_kernel()
    alone = {name: SparseInt8Linear(pack_qat(fq), kernel) for name, fq in holder.items()}
    packed, start, members = concat_packed([pack_qat(fq) for fq in holder.values()]), 0, {}
    for name, fq in holder.items():
        members[name] = SparseInt8Linear(packed, kernel, rows=(start, start + fq.out_features))
        start += fq.out_features
    shared = SharedInputLinears(list(members.values()))
    for member in members.values():
        member.shared = shared

    x, y = torch.randn(2, 9, 48), torch.randn(2, 9, 48)
    with torch.no_grad():
        expected = {name: module(x) for name, module in alone.items()}
        for order in (["q", "k", "v"], ["v", "q", "k"], ["k", "k", "q", "v"]):
            for name in order:
                assert torch.equal(members[name](x), expected[name]), order
        # another tensor, then the pending outputs of the first are not handed out for it
        assert torch.equal(members["q"](x), expected["q"])
        assert torch.equal(members["k"](y), alone["k"](y))
        assert torch.equal(members["v"](y), alone["v"](y))
        # a tensor changed in place since its first call is computed again (outside inference mode)
        members["q"](x)
        x.add_(1.0)
        assert torch.equal(members["k"](x), alone["k"](x))
    with torch.inference_mode():
        z = torch.randn(5, 48)
        assert all(torch.equal(members[n](z), alone[n](z)) for n in ("v", "k", "q"))


@needs_compiler
def test_sparse_int8_fuses_attentions_inputs_and_the_feed_forward_gelu():
    from pofa.runtime import SparseInt8Linear, sparse_int8_

    qat = tiny_qat_classifier()
    fused = sparse_int8_(copy.deepcopy(qat))
    unfused = sparse_int8_(copy.deepcopy(qat), fuse=False)
    for layer in fused.bert.encoder.layer:
        attention = layer.attention.self
        assert attention.query.shared is not None and attention.query.shared is attention.value.shared
        assert attention.key.shared is attention.query.shared and layer.attention.output.dense.shared is None
        assert layer.intermediate.dense.activation == "gelu"
        assert type(layer.intermediate.intermediate_act_fn) is nn.Identity
    assert not any(m.shared or m.activation for m in unfused.modules() if isinstance(m, SparseInt8Linear))
    with torch.no_grad():
        expected = qat(**padded_batch()).logits
        for runtime in (fused, unfused):
            torch.testing.assert_close(runtime(**padded_batch()).logits, expected, rtol=1e-4, atol=1e-4)
        # a deep copy points its kernel at its own packed weights: it outlives the original; so does a pickled one
        got = fused(**padded_batch()).logits
        copied, pickled = copy.deepcopy(fused), pickle.dumps(fused)
        del fused
        gc.collect()
        assert torch.equal(copied(**padded_batch()).logits, got)
        assert torch.equal(pickle.loads(pickled)(**padded_batch()).logits, got)


@needs_compiler
def test_a_qat_model_whose_observers_saw_nothing_is_refused_naming_the_linear():
    from transformers import BertForSequenceClassification

    from pofa.quant import QATConfig, prepare_qat_
    from pofa.runtime import sparse_int8_

    model = prepare_qat_(BertForSequenceClassification(BertConfig(**TINY, num_labels=2)), QATConfig())
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.0\.attention\.self\.query: .*seen no data"):
        sparse_int8_(model)


@needs_compiler
def test_bert_blocks_run_the_short_path_with_the_models_arithmetic():
    from pofa.runtime import sparse_int8_
    from pofa.runtime.blocks import ShortBertBlock

    qat = tiny_qat_classifier()
    short = sparse_int8_(copy.deepcopy(qat))
    blocks = list(short.bert.encoder.layer)
    assert all(isinstance(block.__dict__.get("forward"), ShortBertBlock) for block in blocks)
    modules = copy.deepcopy(short)
    for block in modules.bert.encoder.layer:
        del block.forward  # back to BertLayer.forward over the same runtime modules
    calls = []
    for block in blocks:
        block.attention.register_forward_hook(lambda *args: calls.append(1))  # runs only on the model's own forward
    batch = padded_batch()
    with torch.no_grad():
        got, expected = short(**batch, output_hidden_states=True), modules(**batch, output_hidden_states=True)
        assert not calls
        assert torch.equal(got.logits, expected.logits)  # the same operations in the same order
        assert len(got.hidden_states) == 3
        assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, expected.hidden_states))
        torch.testing.assert_close(got.logits, qat(**batch).logits, rtol=1e-4, atol=1e-4)
        # attention weights asked for: the model's own forward (eager attention, so that there are some to return)
        short.config._attn_implementation = modules.config._attn_implementation = "eager"
        with_attentions = short(**batch, output_attentions=True)
        assert len(calls) == 2 and len(with_attentions.attentions) == 2
        torch.testing.assert_close(with_attentions.logits, expected.logits, rtol=1e-5, atol=1e-5)
        calls.clear()
        torch.testing.assert_close(short(**batch).logits, expected.logits, rtol=1e-5, atol=1e-5)
        assert not calls  # eager attention (an additive mask) is covered too: scaled dot-product attention agrees
        hidden = torch.zeros(1, 3, 32)
        route = short.bert.encoder.layer[0].forward
        assert route.covers(hidden, (None,), {"cache": None, "position_ids": torch.arange(3)})
        assert not route.covers(hidden, (hidden,), {})  # cross-attention
        assert not route.covers(hidden, (), {"cache": object()})  # a decoder's cache
        assert not route.covers(hidden, (), {"some_new_argument": 1})
        short.config._attn_implementation = "flex_attention"  # an implementation SDPA does not stand for
        assert not route.covers(hidden, (), {})
        short.config._attn_implementation = "eager"
        short.train()
        short(**batch)
        assert len(calls) == 2  # training mode: the model's own forward


@needs_compiler
def test_packing_keeps_only_groups_with_a_non_zero_and_folds_the_zero_point():
    from pofa.quant.qat import ActivationQuant
    from pofa.runtime import pack_sparse_int8

    q = torch.zeros(3, 9, dtype=torch.int8)
    q[0, 0], q[0, 5], q[0, 8], q[2, 3] = 5, -7, 127, -1  # row 0: groups 0, 1, 2; row 1: none; row 2: group 0
    packed = pack_sparse_int8(q, torch.tensor([0.5, 1.0, 2.0]), ActivationQuant(0.25, 10, 8))
    assert packed.row_ptr.tolist() == [0, 3, 3, 4]
    assert packed.group.tolist() == [0, 1, 2, 0]
    words = packed.word.view(torch.int8).reshape(-1, 4)
    assert words.tolist() == [[5, 0, 0, 0], [0, -7, 0, 0], [127, 0, 0, 0], [0, 0, 0, -1]]
    assert packed.out_offset.tolist() == [10 * 125, 0, -10]
    assert packed.out_scale.tolist() == [0.125, 0.25, 0.5]
    with pytest.raises(ValueError, match="int8"):
        pack_sparse_int8(q.float(), torch.ones(3), ActivationQuant(0.25, 10, 8))
    with pytest.raises(ValueError, match="scales"):
        pack_sparse_int8(q, torch.ones(2), ActivationQuant(0.25, 10, 8))


def tiny_qat_classifier(quantize_embeddings: bool = False):
    from transformers import BertForSequenceClassification

    from pofa.quant import QATConfig, prepare_qat_

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**TINY, num_labels=3))
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".encoder.layer." in f".{name}.":
            with torch.no_grad():
                module.weight.mul_(torch.rand_like(module.weight) >= 0.9)
    prepare_qat_(model, QATConfig(quantize_embeddings=quantize_embeddings)).train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(3):
            ids = torch.randint(1, 100, (4, 12), generator=g)
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return model.eval()


def padded_batch(seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (6, 19), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    mask[4, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@needs_compiler
@pytest.mark.parametrize("quantize_embeddings", [False, True])
def test_sparse_int8_model_matches_the_qat_model(quantize_embeddings):
    from pofa.runtime import SparseInt8Linear, sparse_int8_

    qat = tiny_qat_classifier(quantize_embeddings)
    runtime = sparse_int8_(copy.deepcopy(qat))
    swapped = [m for m in runtime.modules() if isinstance(m, SparseInt8Linear)]
    assert len(swapped) == 2 * 6
    assert type(runtime.classifier) is nn.Linear and type(runtime.bert.pooler.dense) is nn.Linear  # heads: torch
    assert type(runtime.bert.embeddings.word_embeddings) is nn.Embedding
    with torch.no_grad():
        expected = qat(**padded_batch()).logits
        got = runtime(**padded_batch()).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@needs_compiler
def test_load_sparse_model_reads_a_qat_folder_and_a_float_folder(tmp_path):
    from pofa.artifacts import COMPACT_FILE
    from pofa.compact import load_compact_model, save_compact
    from pofa.runtime import SparseInt8Linear, load_sparse_model

    qat = tiny_qat_classifier()
    qat.config.save_pretrained(tmp_path / "qat")
    save_compact(qat, tmp_path / "qat" / COMPACT_FILE)
    reference = load_compact_model(tmp_path / "qat" / COMPACT_FILE, tmp_path / "qat")  # the QAT model of the file
    runtime = load_sparse_model(tmp_path / "qat")
    assert any(isinstance(m, SparseInt8Linear) for m in runtime.modules()) and not runtime.training
    with torch.no_grad():
        torch.testing.assert_close(runtime(**padded_batch()).logits, reference(**padded_batch()).logits,
                                   rtol=1e-4, atol=1e-4)

    dense = tiny_pruned_encoder()
    dense.save_pretrained(tmp_path / "fp32")
    csr = load_sparse_model(tmp_path / "fp32", config=SparseRuntimeConfig(backend="torch"))
    assert sum(isinstance(m, CSRLinear) for m in csr.modules()) == 2 * 6
    with torch.no_grad():
        torch.testing.assert_close(csr(**padded_batch()).last_hidden_state,
                                   dense(**padded_batch()).last_hidden_state, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="QAT"):
        load_sparse_model(tmp_path / "fp32", int8=True)
    with pytest.raises(FileNotFoundError):
        load_sparse_model(tmp_path / "nothing")


def test_benchmark_latency_reports_every_variant():
    from pofa.runtime import VARIANTS

    qat = tiny_qat_classifier()
    dense = tiny_qat_classifier()
    from pofa.runtime import without_fake_quant_

    without_fake_quant_(dense)
    variants = list(VARIANTS) if compiler_available() else [v for v in VARIANTS if v != "pofa_sparse_int8"]
    rows = benchmark_latency(dense, qat_model=qat, batch_sizes=(1, 2), seq_len=8, repeats=2, warmup=1,
                             variants=variants)
    assert [r["variant"] for r in rows] == variants * 2
    for row in rows:
        assert row["latency_ms"] > 0 and row["speedup_vs_dense"] > 0 and row["repeats"] == 2
        assert row["speedup_vs_ort_int8_dense"] > 0
    assert all(r["speedup_vs_dense"] == 1.0 for r in rows if r["variant"] == "torch_fp32_dense")
    assert all(r["speedup_vs_ort_int8_dense"] == 1.0 for r in rows if r["variant"] == "ort_int8_dense")

    # Without a QAT model, the variants that need one are left out by default, and refused when asked for.
    plain = benchmark_latency(dense, batch_sizes=(1,), seq_len=8, repeats=1, warmup=0)
    assert {r["variant"] for r in plain} == set(VARIANTS) - {"pofa_int8_onnx", "pofa_sparse_int8"}
    with pytest.raises(ValueError, match="QAT"):
        benchmark_latency(dense, variants=["pofa_sparse_int8"])
    with pytest.raises(ValueError, match="unknown"):
        benchmark_latency(dense, variants=["onnx_int8"])
