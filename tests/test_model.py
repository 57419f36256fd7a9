import copy
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import ROOT, require, run_in_process, send
from gulliver.download import DownloadError
from gulliver.optim import Muon, orthogonalize
from model import GPT, GPTConfig, alibi_slopes, compile_decode, rotate, sample_next

TINY = dict(block_size=32, vocab_size=50257, n_layer=2, n_head=4, n_embd=32)


def tiny(**overrides):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


def test_parameter_count_and_loss_at_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    idx, targets = torch.randint(0, 50257, (2, 1, 64))
    with torch.no_grad():
        _, loss = model(idx, targets)
    # LN_f makes each hidden state unit-variance and W_E ~ N(0, 0.02^2), so the logits are about
    # N(0, s^2) with s^2 = 768 * 0.02^2, and E[loss] = E[log sum exp z] ~ ln V + s^2 / 2 = 10.98
    expected = math.log(50257) + 768 * 0.02 ** 2 / 2
    assert abs(loss.item() - expected) < 0.05 and abs(loss.item() - math.log(50257)) < 0.2


def dominant_padding(model):
    """Padding rows of W_E that would win any softmax they reached. LN_f's bias is set to 10 u (u a unit
    vector), so that every final hidden state is 10 u plus the normalised state (length sqrt(d), ~N(0, 1)
    along u), and the padding rows are 10 u: their logits are ~100, the real ones' ~N(0, 0.2^2). (Rows
    along LN_f's weight, all ones at init, would not do: LayerNorm's output sums to 0, so their logits are ~0.)"""
    u = F.normalize(torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(1)), dim=0)
    with torch.no_grad():
        model.transformer.ln_f.bias.copy_(10 * u)
        model.transformer.wte.weight[model.config.vocab_size:] = 10 * u


def test_padded_vocab_never_reaches_the_logits():
    model = tiny(pad_vocab_to=64)
    assert model.transformer.wte.weight.shape[0] == 50304 and model.W_E.shape == (50257, 32)
    dominant_padding(model)
    x, y = torch.randint(0, 50257, (2, 2, 8))
    with torch.no_grad():
        hidden = model.trunk(x)
        padding_rows = model.transformer.wte.weight[50257:]
        # the control: a padding row's logit is > 40, every real one's < 5, at every position
        assert (hidden @ padding_rows.T).min() > 40 and (hidden @ model.W_E.T).abs().max() < 5
        logits, loss = model(x, y)
        full = model.lm_head(hidden)  # the head's padded width: the padding columns are -inf, whatever their rows
    assert logits.shape == (2, 8, 50257) and logits.abs().max() < 5
    # the loss is the cross-entropy over the vocabulary: padding columns in its softmax would add ~90 nats
    # (measured without the -inf padding bias: 103.3 against 10.9)
    reference = F.cross_entropy(logits.reshape(-1, 50257), y.reshape(-1))
    assert torch.allclose(loss, reference, rtol=1e-6), f"loss {loss.item():.4f}, over the vocabulary {reference.item():.4f}"
    assert torch.isneginf(full[..., 50257:]).all() and torch.equal(logits, full[..., :50257])
    out = model.generate(torch.zeros(1, 1, dtype=torch.long), 50, temperature=1.0)
    assert out.max() < 50257


class LargeTensors(TorchDispatchMode):
    """Records (op, contiguous) for every tensor of at least n elements that an op takes or returns."""

    def __init__(self, n):
        super().__init__()
        self.n, self.seen = n, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor) and t.numel() >= self.n:
                self.seen.append((func.__name__.split('.')[0], t.is_contiguous()))
        return out


def test_loss_over_the_padded_head_equals_the_loss_over_the_vocabulary_without_copying_the_logits():
    model = tiny(pad_vocab_to=64).train()
    dominant_padding(model)
    x, y = torch.randint(0, 50257, (2, 4, 32))
    y[0, :5] = -1
    # a copy is an op that writes a tensor as large as the logits from another: a clone, or a kernel
    # given a strided view (the softmax makes it contiguous first); views and matmuls of a transpose are not
    copies = ('clone', '_to_copy', 'copy_', 'contiguous', 'slice_backward', 'cat')
    strided_ok = ('slice', 't', 'view', 'mm', 'addmm')
    no_copy = lambda seen: all(op not in copies and (contiguous or op in strided_ok) for op, contiguous in seen)

    def losses_and_gradients(loss_fn):
        model.zero_grad()
        with LargeTensors(4 * 32 * 50257) as large:
            loss = loss_fn()
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, large.seen
    loss, grads, seen = losses_and_gradients(lambda: model(x, y)[1])
    # the reference: the cross-entropy over the 50,257 real columns, as a slice of the logits
    full = lambda: model.lm_head(model.trunk(x))
    ref_loss, ref_grads, ref_seen = losses_and_gradients(
        lambda: F.cross_entropy(full()[..., :50257].reshape(-1, 50257), y.reshape(-1), ignore_index=-1))
    assert torch.equal(loss, ref_loss) and all(torch.equal(grads[n], ref_grads[n]) for n in grads)
    assert seen and no_copy(seen), seen
    assert not no_copy(ref_seen)  # control: the slice's copies are seen


def test_ignore_index_minus_one():
    model = tiny()
    idx = torch.randint(0, 50257, (1, 8))
    targets = idx.clone()
    targets[0, 4:] = -1
    logits, loss = model(idx, targets)
    assert torch.allclose(loss, F.cross_entropy(logits[0, :4], idx[0, :4]))


def test_weight_tying_one_tensor_gradient_from_both_uses():
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight
    untied = copy.deepcopy(model)
    untied.lm_head.weight = torch.nn.Parameter(untied.transformer.wte.weight.detach().clone())
    idx = torch.randint(0, 50257, (2, 8))
    model(idx, idx)[1].backward()
    untied(idx, idx)[1].backward()
    both = untied.transformer.wte.weight.grad + untied.lm_head.weight.grad
    assert untied.transformer.wte.weight.grad.abs().sum() > 0 and untied.lm_head.weight.grad.abs().sum() > 0
    assert torch.allclose(model.transformer.wte.weight.grad, both, atol=1e-7)


@pytest.mark.parametrize('pos_emb', ['learned', 'sinusoidal', 'rope', 'alibi', 'none'])
def test_causality(pos_emb):
    model = tiny(pos_emb=pos_emb)
    idx = torch.randint(0, 50257, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 50257
    a, b = model(idx)[0], model(changed)[0]
    assert torch.equal(a[0, :10], b[0, :10]) and not torch.allclose(a[0, 10:], b[0, 10:])


def test_bidirectional_attention_sees_later_tokens():
    model = tiny(causal=False)
    idx = torch.randint(0, 50257, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 50257
    assert not torch.allclose(model(idx)[0][0, :10], model(changed)[0][0, :10])


def test_no_position_information_means_permutation_invariance():
    model = tiny(pos_emb='none', n_layer=1)
    idx = torch.randint(0, 50257, (1, 12))
    permuted = torch.cat([idx[:, :11][:, torch.randperm(11)], idx[:, 11:]], dim=1)
    assert torch.allclose(model(idx)[0][0, -1], model(permuted)[0][0, -1], atol=1e-5)
    learned = tiny(pos_emb='learned', n_layer=1)
    assert not torch.allclose(learned(idx)[0][0, -1], learned(permuted)[0][0, -1], atol=1e-5)


def test_rope_and_alibi_scores_depend_only_on_relative_offset():
    model = tiny(pos_emb='rope')
    torch.manual_seed(1)
    q, k = torch.randn(8), torch.randn(8)  # one head's query and key, the same at every position
    T = 20
    rq = rotate(q.expand(T, 8), model.rope_cos[:T], model.rope_sin[:T])
    rk = rotate(k.expand(T, 8), model.rope_cos[:T], model.rope_sin[:T])
    scores = rq @ rk.T
    for shift in (1, 5):
        assert torch.allclose(scores[shift:, shift:], scores[:-shift, :-shift], atol=1e-5)
    assert not torch.allclose(scores[0, 0], scores[5, 0])
    bias = tiny(pos_emb='alibi').alibi_bias(torch.arange(T), T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    assert torch.equal(bias[:, 3:, 3:], bias[:, :-3, :-3])
    assert torch.isinf(bias[:, ~causal]).all() and torch.isfinite(bias[:, causal]).all()
    assert torch.allclose(bias[:, 7, 2], -alibi_slopes(4) * 5)
    assert torch.allclose(alibi_slopes(8), 2 ** (-torch.arange(1., 9.)))


def test_sinusoidal_table_values():
    P = tiny(pos_emb='sinusoidal').pos_table.double()  # what the model adds to its token embeddings
    T, d = P.shape
    t, i = torch.arange(T, dtype=torch.float64)[:, None], torch.arange(d // 2, dtype=torch.float64)
    angle = t / 10000 ** (2 * i / d)  # PE[t, 2i] = sin(angle), PE[t, 2i+1] = cos(angle), times 0.02 sqrt(2)
    assert torch.allclose(P[:, 0::2], torch.sin(angle) * 0.02 * math.sqrt(2), atol=1e-8)
    assert torch.allclose(P[:, 1::2], torch.cos(angle) * 0.02 * math.sqrt(2), atol=1e-8)
    assert P[0, 0] == 0 and P[0, 1] == pytest.approx(0.02 * math.sqrt(2))
    assert P.pow(2).mean().sqrt() == pytest.approx(0.02, rel=1e-3)  # the RMS of a learned table at init


@pytest.mark.parametrize('pos_emb', ['learned', 'sinusoidal', 'rope', 'alibi', 'none'])
def test_kv_cache_equals_recompute(pos_emb):
    model = tiny(pos_emb=pos_emb)
    idx = torch.randint(0, 50257, (2, 7))

    def stepped(cache):  # a prompt of 4, then 3 tokens one at a time
        hidden = [model.trunk(idx[:, :4], cache, torch.arange(4))]
        hidden += [model.trunk(idx[:, t:t + 1], cache, torch.tensor([t])) for t in range(4, 7)]
        return torch.cat(hidden, dim=1)
    assert torch.allclose(stepped(model.new_cache(2, torch.float32, 'cpu')), model.trunk(idx), atol=1e-5)
    # bf16 weights beside an fp32 cache (sample.py's choice where bf16 arithmetic is emulated): the
    # same hidden states within bf16's rounding (their scale is ~3; a position off by one moves them by ~3)
    model.to(torch.bfloat16)
    mixed = stepped(model.new_cache(2, torch.float32, 'cpu'))
    assert mixed.dtype == torch.bfloat16 and (mixed.float() - model.trunk(idx).float()).abs().max() < 0.05
    model.float()
    # greedy decoding, past block_size (32) too, where the context is cropped and recomputed: at init, then with
    # W_QKV and W_O 10 times larger (scores 100 times): at init the next token hardly depends on the others,
    # and a decode position off by one went unseen under RoPE, ALiBi or none
    prompt = torch.randint(0, 50257, (1, 5))
    for sharpened in (False, True):
        with_cache = model.generate(prompt, 40, temperature=0, kv_cache=True)
        without = model.generate(prompt, 40, temperature=0, kv_cache=False)
        assert torch.equal(with_cache, without), f"sharpened: {sharpened}"
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_attn.weight.mul_(10)
                block.attn.c_proj.weight.mul_(10)


def test_compiled_decode_on_the_static_cache_equals_recomputation():
    """256 tokens through the decode step compiled whole (fullgraph: a graph break fails the
    test), on a cache of block_size 272 that the prompt of 16 and the 256 tokens fill: each
    step's logits equal those of the whole sequence recomputed, and greedy tokens are the same.
    A cache corrupted after the prefill must break the equality over the first 16 tokens (the control)."""
    torch.manual_seed(0)
    model = tiny(block_size=272)
    decode = compile_decode(model)
    prompt = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        for corrupt, n_tokens in ((False, 256), (True, 16)):
            cache = model.new_cache(2, torch.float32, 'cpu')
            logits = [model.next_logits(prompt, cache, torch.arange(16))]
            if corrupt:
                cache[1]['v'][:, :, 5] += 1.0  # the second layer's values at position 5
            seq = torch.cat([prompt, logits[0].argmax(-1, keepdim=True)], dim=1)
            for t in range(16, 16 + n_tokens - 1):
                logits.append(decode(seq[:, -1:].clone(), torch.tensor([t]), cache))
                seq = torch.cat([seq, logits[-1].argmax(-1, keepdim=True)], dim=1)
            recomputed = [model.next_logits(seq[:, :t]) for t in range(16, 16 + n_tokens)]
            equal = all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(logits, recomputed))
            assert equal != corrupt
            if not corrupt:
                assert torch.equal(model.generate(prompt, 256, temperature=0, decode=decode), seq)
                assert torch.equal(model.generate(prompt, 256, temperature=0, kv_cache=False), seq)


def test_muon_equals_torchs_and_runs_its_iteration_in_fp32_too():
    torch.manual_seed(0)
    weights = [torch.randn(48, 16), torch.randn(16, 64)]  # a tall and a wide matrix
    ours, theirs = ([w.clone().requires_grad_() for w in weights] for _ in range(2))
    optimizers = (Muon(ours, lr=1e-2, weight_decay=0.1),
                  torch.optim.Muon(theirs, lr=1e-2, weight_decay=0.1, adjust_lr_fn='match_rms_adamw'))
    for _ in range(3):
        grads = [torch.randn_like(w) for w in weights]
        for params, opt in zip((ours, theirs), optimizers):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    # in fp32, where a CPU emulates bf16: singular values near 1, and bf16's result within its rounding
    M = torch.randn(48, 16)
    fp32 = orthogonalize(M, dtype=torch.float32)
    singular = torch.linalg.svdvals(fp32)
    assert fp32.dtype == torch.float32 and singular.min() > 0.6 and singular.max() < 1.25
    assert (fp32 - orthogonalize(M).float()).abs().max() < 0.05


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = lambda **kw: set(sample_next(logits.expand(2000, 4), generator=gen, **kw).flatten().tolist())
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.8) == {0, 1}       # 0.5 + 0.3 reaches 0.8
    assert draws(top_p=0.81) == {0, 1, 2}
    assert draws(top_p=0.1) == {0}
    assert draws() == {0, 1, 2, 3}
    assert sample_next(logits, temperature=0).item() == 0
    assert sample_next(logits.expand(100, 4), temperature=1e-39, generator=gen).eq(0).all()  # greedy in the limit, not NaN


class Ops(TorchDispatchMode):
    """Records the name of every aten op dispatched, e.g. 'index' for aten.index.Tensor."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func.__name__.split('.')[0])
        return func(*args, **(kwargs or {}))


def test_top_k_reads_the_kth_logit_through_a_slice_not_a_host_index():
    """values[:, [-1]] builds its index on the host (aten.lift_fresh) and, on a GPU, copies it to the
    device for aten.index at every token, a wait; values[:, -1:] is a view (aten.slice). The draw
    is the same: the five likeliest tokens of each row, renormalised, from the same generator."""
    torch.manual_seed(0)
    logits = torch.randn(1000, 50)
    generator = torch.Generator().manual_seed(0)
    with Ops() as ops:
        drawn = sample_next(logits, temperature=0.7, top_k=5, generator=generator)
    assert 'slice' in ops.seen and 'index' not in ops.seen and 'lift_fresh' not in ops.seen
    shifted = (logits - logits.amax(dim=-1, keepdim=True)) / 0.7
    kth = shifted.sort(dim=-1, descending=True).values[:, 4:5]
    probs = F.softmax(shifted.masked_fill(shifted < kth, float('-inf')), dim=-1)
    assert torch.equal(drawn, torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(0)))
    assert (drawn == logits.topk(5).indices).any(dim=-1).all() and drawn.unique().numel() == 50


@pytest.mark.parametrize('pos_emb', ['learned', 'rope', 'alibi'])
def test_a_reused_cache_decodes_the_tokens_of_a_fresh_one(pos_emb):
    """One cache through a prompt of 20 and then shorter ones (as sample.py's warm-up and sample, and
    bench.py's, share one): past each new prompt it holds the earlier calls' keys and values, not
    zeros, and they must not reach attention. Greedy, then drawn from a seeded generator."""
    model = tiny(pos_emb=pos_emb)
    with torch.no_grad():  # at init the next token hardly depends on the others: a leak would go unseen
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(10)
            block.attn.c_proj.weight.mul_(10)
    cache = model.new_cache(2, torch.float32, 'cpu')
    for prompt_len, temperature in ((20, 0), (3, 0), (4, 1.0)):
        prompt = torch.randint(0, 50257, (2, prompt_len))
        seeded = lambda: torch.Generator().manual_seed(0)
        reused = model.generate(prompt, 8, temperature, generator=seeded(), cache=cache)
        assert torch.equal(reused, model.generate(prompt, 8, temperature, generator=seeded()))
    stale = cache[0]['k'][:, :, 4 + 8:20 + 7]  # written by the first call alone
    assert stale.ne(0).all(dim=-1).all()


def test_only_a_compiled_step_has_its_cache_marked_static(monkeypatch):
    marked = []
    monkeypatch.setattr(torch._dynamo, 'mark_static_address', lambda tensor, *args, **kwargs: marked.append(tensor))
    model, prompt = tiny(), torch.randint(0, 50257, (1, 4))
    with torch.no_grad():
        eager = model.generate(prompt, 3, temperature=0)
        assert marked == []  # eager decoding does not import the compiler, nor pay for its import at the first token
        given = model.generate(prompt, 3, temperature=0, decode=lambda *args: model.decode_step(*args))
    assert len(marked) == 2 * model.config.n_layer and torch.equal(given, eager)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_a_compiled_decode_on_a_reused_cache_replays_the_graph_its_warm_up_captured(monkeypatch):
    """CUDA graph trees run a compiled step eagerly once, capture it at the next call, then replay
    it while its static inputs (the cache's buffers) stay where they were: a warm-up of two decode
    steps on the cache that is then timed leaves nothing to capture; a new cache is captured anew."""
    from torch._inductor.cudagraph_trees import CUDAGraphTreeManager
    captures, record = [], CUDAGraphTreeManager.record_function
    monkeypatch.setattr(CUDAGraphTreeManager, 'record_function',
                        lambda self, *args: captures.append(1) or record(self, *args))
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)).cuda().eval()
    decode, prompt = compile_decode(model), torch.randint(0, 50257, (2, 8), device='cuda')
    cache = model.new_cache(2, torch.float32, 'cuda', static=True)
    warm = model.generate(prompt, 3, temperature=0, decode=decode, cache=cache)  # a prefill, two decode steps
    assert len(captures) >= 1
    captured = len(captures)
    timed = model.generate(prompt, 40, temperature=0, decode=decode, cache=cache)
    assert len(captures) == captured and torch.equal(timed[:, :11], warm)
    fresh = model.generate(prompt, 40, temperature=0, decode=decode)  # the control: its own new cache
    assert len(captures) > captured and torch.equal(fresh, timed)
    assert torch.equal(timed, model.generate(prompt, 40, temperature=0, kv_cache=False))


def test_configure_optimizers_decays_only_matrices():
    model = tiny()
    [adamw] = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    decay, no_decay = adamw.param_groups
    assert decay['weight_decay'] == 0.1 and all(p.dim() == 2 for p in decay['params'])
    assert no_decay['weight_decay'] == 0.0 and all(p.dim() == 1 for p in no_decay['params'])
    assert len(decay['params']) + len(no_decay['params']) == len(list(model.parameters()))
    muon, adamw = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', optimizer='muon')
    assert all(p.dim() == 2 for p in muon.param_groups[0]['params'])
    assert len(muon.param_groups[0]['params']) == 4 * 2  # c_attn, c_proj, c_fc, c_proj per block
    assert any(p is model.transformer.wte.weight for g in adamw.param_groups for p in g['params'])
    with pytest.raises(ValueError, match="optimizer must be 'adamw' or 'muon', not 'sgd'"):
        model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', optimizer='sgd')


def test_a_model_that_cannot_be_built_or_run_says_why():
    # the guards a copy-pasted model meets (train.py's own settings rules refuse these first)
    with pytest.raises(AssertionError):
        GPT(GPTConfig(n_layer=1, n_head=3, n_embd=32))  # heads must split n_embd
    with pytest.raises(AssertionError, match='pos_emb must be one of'):
        GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, pos_emb='relative'))
    model = tiny()
    with pytest.raises(AssertionError, match='sequence of 33 > block_size 32'):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(AssertionError):
        model.crop_block_size(64)  # a context can only be shortened


def test_flops_per_token():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100))
    n = sum(p.numel() for p in model.parameters()) - 16 * 32
    assert model.flops_per_token() == 6 * n + 12 * 2 * 16 * 32
    assert model.estimate_mfu(1000, model.flops_per_token() * 2000) == pytest.approx(0.5)


# ---- equality with the Hugging Face reference ---------------------------------------------

@pytest.fixture(scope='module')
def hf_model_dir(tmp_path_factory):
    transformers = require('transformers')
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_positions=64, n_embd=48, n_layer=3, n_head=4, vocab_size=50257)
    hf = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp('hf-gpt2')
    hf.save_pretrained(folder)
    return hf, str(folder)


def test_from_pretrained_matches_transformers(hf_model_dir):
    hf, folder = hf_model_dir
    model = GPT.from_pretrained(folder).eval()
    idx = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        assert torch.allclose(model(idx)[0], hf(idx).logits, atol=1e-4)
        ours = model.generate(idx[:1, :6], 20, temperature=0)[0, 6:]
        theirs = hf.generate(idx[:1, :6], attention_mask=torch.ones(1, 6, dtype=torch.long), max_new_tokens=20,
                             do_sample=False, pad_token_id=50256)[0, 6:]
    assert torch.equal(ours, theirs)


def test_save_pretrained_opens_in_transformers(tmp_path):
    transformers = require('transformers')
    model = tiny()
    model.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        assert torch.allclose(model(idx)[0], hf(idx).logits, atol=1e-4)


def test_the_mlp_uses_gpt2s_tanh_gelu_as_transformers_does(tmp_path):
    # At init the MLP's inputs have std ~0.11, where GELU's tanh approximation and the exact erf form
    # differ by < 3e-6: an exact GELU moves the logits by ~2e-6, far inside a tolerance of 1e-4. With
    # c_fc and c_proj scaled by 10 (inputs of std ~1.1: the two GELUs differ by up to 4.7e-4, at |x| ~ 2.7)
    # and W_E by 10 (logits of std ~1.1), measured: tanh GELU (right) 1.4e-6 from transformers'
    # gelu_new, exact GELU (the slip) 1.9e-3
    transformers = require('transformers')
    model = tiny()
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_fc.weight.mul_(10)
            block.mlp.c_proj.weight.mul_(10)
        model.transformer.wte.weight.mul_(10)
    model.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert hf.config.activation_function == 'gelu_new'  # GPT-2's tanh approximation
    gelu_inputs = []  # what each block's GELU is applied to: c_fc's output
    hooks = [block.mlp.c_fc.register_forward_hook(lambda module, args, out: gelu_inputs.append(out))
             for block in model.transformer.h]
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    for hook in hooks:
        hook.remove()
    assert min(x.std() for x in gelu_inputs) > 0.9 and theirs.std() > 1  # where the two GELUs part
    difference = (ours - theirs).abs().max().item()
    assert difference < 2e-5, f"the logits are {difference:.1e} from transformers' (tanh GELU: ~1.4e-6)"


def hub_style_file(folder, extra=None, drop=None):
    """Rewrite a save_pretrained file the way the hub's gpt2 file names tensors: no prefix,
    causal-mask buffers included."""
    from safetensors.torch import load_file, save_file
    tensors = {k.removeprefix('transformer.'): v for k, v in load_file(os.path.join(folder, 'model.safetensors')).items()}
    tensors['h.0.attn.bias'] = torch.ones(1, 1, 64, 64).tril()
    tensors['h.0.attn.masked_bias'] = torch.tensor(-1e4)
    tensors.update(extra or {})
    if drop:
        del tensors[drop]
    save_file(tensors, os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})


def copy_dir(src, dst):
    os.makedirs(dst)
    for name in ('config.json', 'model.safetensors'):
        with open(os.path.join(src, name), 'rb') as f, open(os.path.join(dst, name), 'wb') as g:
            g.write(f.read())
    return str(dst)


def test_sample_py_greedy_text_matches_transformers_generate(tmp_path):
    # the reference: Hugging Face's GPT-2 with the same weights, its own greedy decoding
    transformers = require('transformers')
    from gulliver.tokenizer import get_tokenizer
    from test_sample import tiny_checkpoint
    model = tiny_checkpoint(tmp_path / 'out').eval()
    model.save_pretrained(tmp_path / 'hf')
    reference = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / 'hf').eval()
    enc = get_tokenizer()
    prompt = torch.tensor([enc.encode_ordinary('Hello')])
    expected = reference.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=enc.eot_token)
    result = run_in_process('sample.py', f'--out_dir={tmp_path / "out"}', '--max_new_tokens=10', '--start=Hello',
                            '--temperature=0')
    assert result.stdout == enc.decode(expected[0].tolist()) + '\n'


def test_hub_naming_and_buffers_load(hf_model_dir, tmp_path):
    hf, folder = hf_model_dir
    hub = copy_dir(folder, tmp_path / 'hub')
    hub_style_file(hub)
    idx = torch.randint(0, 50257, (1, 10))
    with torch.no_grad():
        assert torch.allclose(GPT.from_pretrained(hub)(idx)[0], hf(idx).logits, atol=1e-4)


@pytest.mark.parametrize('change, message', [
    (dict(extra={'h.0.attn.surprise': torch.zeros(3)}), "unexpected tensor 'h.0.attn.surprise'"),
    (dict(drop='h.1.mlp.c_fc.bias'), 'lacks 1 tensors'),
])
def test_unexpected_or_missing_tensors_fail_clearly(hf_model_dir, tmp_path, change, message):
    hub = copy_dir(hf_model_dir[1], tmp_path / 'bad')
    hub_style_file(hub, **change)
    with pytest.raises(ValueError, match=message):
        GPT.from_pretrained(hub)


def test_hub_download_through_a_local_server(hf_model_dir, http_server, tmp_path):
    hf, folder = hf_model_dir
    url, routes, hits = http_server
    for name in ('config.json', 'model.safetensors'):
        body = open(os.path.join(folder, name), 'rb').read()
        routes[f'/gpt2/resolve/main/{name}'] = lambda r, body=body: send(r, 200, body, 'application/octet-stream')
    model = GPT.from_pretrained('gpt2', hub_url=url, cache_dir=str(tmp_path))
    idx = torch.randint(0, 50257, (1, 10))
    with torch.no_grad():
        assert torch.allclose(model(idx)[0], hf(idx).logits, atol=1e-4)
    assert len(hits) == 2
    GPT.from_pretrained('gpt2', hub_url=url, cache_dir=str(tmp_path))  # cached: no more requests
    assert len(hits) == 2
    with pytest.raises(ValueError, match='unknown model'):
        GPT.from_pretrained('gpt3')


def test_damaged_weights_never_enter_the_cache_and_a_damaged_cache_says_what_to_do(hf_model_dir, http_server,
                                                                                    tmp_path):
    url, routes, hits = http_server
    config = open(os.path.join(hf_model_dir[1], 'config.json'), 'rb').read()
    routes['/gpt2/resolve/main/config.json'] = lambda r: send(r, 200, config, 'application/json')
    routes['/gpt2/resolve/main/model.safetensors'] = lambda r: send(r, 200, b'<html>rate limited</html>' * 100)
    with pytest.raises(DownloadError, match='model.safetensors sent a file that cannot be read'):
        GPT.from_pretrained('gpt2', hub_url=url, cache_dir=str(tmp_path))
    assert sorted(os.listdir(tmp_path / 'gpt2')) == ['config.json']  # the bad file was not kept
    # a cached file damaged afterwards (a disk error, an edit): one line naming it, and what to do
    (tmp_path / 'gpt2' / 'model.safetensors').write_bytes(b'\x00' * 100)
    with pytest.raises(ValueError, match=r'gpt2/model.safetensors is damaged \(.*\); delete it, and it is downloaded'):
        GPT.from_pretrained('gpt2', hub_url=url, cache_dir=str(tmp_path))
    os.makedirs(tmp_path / 'no_config')
    with pytest.raises(ValueError, match=r'no .*no_config/config.json: pass a directory written by save_pretrained'):
        GPT.from_pretrained(str(tmp_path / 'no_config'))


def test_wpe_init_std_and_the_embeddings_own_optimizer_groups():
    torch.manual_seed(0)
    default = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64))
    for std in (0.0, 0.5):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64, wpe_init_std=std))
        # the same draws, scaled: every other weight is the default model's
        assert torch.allclose(model.W_pos, default.W_pos * (std / 0.02))
        assert all(torch.equal(a, b) for (name, a), (_, b) in zip(model.named_parameters(), default.named_parameters())
                   if 'wpe' not in name)
    [plain] = default.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    assert len(plain.param_groups) == 2
    [adamw] = default.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', wpe_weight_decay=0.0, embedding_lr=3e-3)
    by_tensor = {id(p): group for group in adamw.param_groups for p in group['params']}
    assert sum(len(group['params']) for group in adamw.param_groups) == len(list(default.parameters()))
    wte, wpe = by_tensor[id(default.transformer.wte.weight)], by_tensor[id(default.W_pos)]
    assert (wte['weight_decay'], wte['lr'], wte['lr_scale']) == (0.1, 3e-3, 3.0)
    assert (wpe['weight_decay'], wpe['lr'], wpe['lr_scale']) == (0.0, 3e-3, 3.0)
    assert by_tensor[id(default.transformer.h[0].attn.c_attn.weight)]['weight_decay'] == 0.1
    [_, muon_adamw] = default.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', 'muon', wpe_weight_decay=0.0)
    assert [g['weight_decay'] for g in muon_adamw.param_groups if any(p is default.W_pos for p in g['params'])] == [0.0]


# model.py and geometry.py are the files people paste into a notebook: each must work alone
STANDALONE = {
    'model.py': """
import sys, torch
from model import GPT, GPTConfig
torch.manual_seed(0)
model = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=2, n_embd=16))
idx = torch.randint(0, 100, (2, 8))
logits, loss = model(idx, idx)
out = model.generate(idx, 4, temperature=0)
[adamw] = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
loss.backward()
adamw.step()
assert logits.shape == (2, 8, 100) and out.shape == (2, 12) and torch.equal(out[:, :8], idx)
print(sorted(m.split('.')[0] for m in sys.modules if m.split('.')[0] in ('gulliver', 'requests', 'safetensors')))
""",
    'geometry.py': """
import sys, numpy as np
from geometry import mean_cos_by_distance, positional_geometry
P = np.random.default_rng(0).normal(size=(32, 8))
assert len(mean_cos_by_distance(P)) == 32 and positional_geometry(P)['norms'].shape == (32,)
print(sorted({m.split('.')[0] for m in sys.modules} & {'gulliver', 'torch', 'matplotlib'}))
""",
}


@pytest.mark.parametrize('name', STANDALONE)
def test_the_copied_file_works_alone_in_an_empty_folder(name, tmp_path):
    shutil.copy(os.path.join(ROOT, name), tmp_path)
    # -E -s: no PYTHONPATH, no user site: the working folder (tmp_path) is the only path to the project's code
    result = subprocess.run([sys.executable, '-E', '-s', '-c', STANDALONE[name]], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '[]', f"{name} pulled in {result.stdout}"
