"""
Speed, measured against this machine's own limits. Each measurement is one table row, also
appended to out_file as a JSON line.

    $ python bench.py                      # CPU: fp32 and bf16, the GPT-2 small shape and the CPU config
    $ python bench.py --device=cuda        # GPU: bf16, compiled, fused AdamW, block_size 1024

Rows: the matmul peak (and the size n that reached it) and memory bandwidth; the dtype
train.py's 'auto' picks on this CPU; a training step (forward + backward + optimizer) in
tokens/s and MFU for the GPT-2 small shape and for the shape of cpu_config, eager against
compiled and fp32 against bf16, and on CUDA GPT-2 small at the largest micro-batch that fits
(with the peak memory of each); get_batch against a loader that reopens the file every batch;
decoding on the static KV cache, eager and compiled, at batch 1 and 8, beside the limit that
reading the weights and the cache once per step sets at the measured read bandwidth, and how
fast matrix-vector products read at all (on a GPU: how fast they are launched);
GPT-2 small recomputing its context instead, and, where transformers is installed
(requirements-dev.txt), its eager generate on a randomly initialised GPT-2 of the same shape.
Every row takes its sizes from the settings below (the small model's from cpu_config), except
that GPT-2 small decodes with its own context of 1,024, the cache's size. Where
this CPU emulates bf16 (its bf16 matmul peak is below fp32's), the bf16 training rows are left
out: they would take hours and say only that.
"""
import copy
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from gulliver.configurator import (at_least, check, configure, integer_at_least, one_of, optional,
                                   resolve_device)
from gulliver.data import random_offsets, windows
from gulliver.machine import (autocast, choose_cpu_dtype, choose_decode_dtype, keep_freed_memory,
                              largest_that_fits, measure_matmul_flops, synchronize)
from model import GPT, GPTConfig, compile_decode

# -----------------------------------------------------------------------------
device = 'auto'
n_layer, n_head, n_embd = 12, 12, 768     # the "GPT-2 small" rows
batch_size = None         # None: 4 on CPU, 16 on CUDA
large_batches = [24, 32, 48, 64]          # CUDA: GPT-2 small compiled at the largest of these micro-
                                          # batches that fits (found eagerly: one compilation, not four)
block_size = None         # None: 256 on CPU, 1024 on CUDA
cpu_config = 'config/gulliver_cpu.py'     # the small-model rows have this config's shape
data_dir = 'data/gulliver'                # for the get_batch rows (random tokens if absent)
steps = 3                 # timed steps per training row, after warm-up
warmup = 1                # the first step also compiles
new_tokens = 256          # decode rows (the CPU config's: up to its block_size)
compile = True            # include torch.compile rows
reference = True          # time transformers' generate beside the decode rows, where it is installed
out_file = 'bench.jsonl'
# -----------------------------------------------------------------------------
configure(globals())
check(globals(), {'batch_size': optional(integer_at_least(1)), 'block_size': optional(integer_at_least(1)),
                  'steps': at_least(1), 'warmup': at_least(1), 'new_tokens': at_least(1),
                  'compile': one_of(True, False), 'reference': one_of(True, False)})
device = resolve_device(device)
cuda = device.startswith('cuda')
torch.backends.cuda.matmul.allow_tf32 = True  # as train.py: fp32 matmuls on a GPU run in TF32
batch_size = (16 if cuda else 4) if batch_size is None else batch_size
block_size = (1024 if cuda else 256) if block_size is None else block_size
if not os.path.exists(cpu_config):
    sys.exit(f"error: no config file {cpu_config}; pass --cpu_config=path")
small = {}
exec(open(cpu_config).read(), {}, small)
rows = []


def row(name, **values):
    """Print one table row and append it to out_file."""
    rows.append({'name': name, 'device': device, **values})
    shown = ', '.join(f"{k} {v:,.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
    print(f"{name:<44} {shown}", flush=True)
    with open(out_file, 'a') as f:
        f.write(json.dumps(rows[-1]) + '\n')


def bytes_per_second(operation, bytes_moved, repeats=5):
    """The rate at which operation() moves bytes_moved, after one warm-up call."""
    operation()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        operation()
    synchronize(device)
    return bytes_moved * repeats / (time.perf_counter() - t0)


def measure_bandwidth(n_bytes=1 << 28):
    """Memory bandwidth in bytes/s, (copy, read): a large copy reads and writes n_bytes each; a sum
    over them only reads them, as decoding reads its weights."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return bytes_per_second(lambda: dst.copy_(src), 2 * n_bytes), bytes_per_second(src.sum, n_bytes)


def matvec_bandwidth(dtype):
    """Bytes/s at which F.linear reads the weights of one token's matrix-vector products: the GPT-2
    small rows' four matrices per block, for every block, more than a CPU's cache holds. What the
    decode rows can reach at B=1 is this, not the read bandwidth of a plain sum. On a GPU a product
    reads its few MB in a microsecond or two, less than its launch from Python takes: there the row
    measures the launches (which the eager decode rows pay too), not the reads of a CUDA graph."""
    d = n_embd
    weights = [torch.randn(n_out, n_in, dtype=dtype, device=device) for _ in range(n_layer)
               for n_out, n_in in ((3 * d, d), (d, d), (4 * d, d), (d, 4 * d))]
    inputs = {n_in: torch.randn(1, n_in, dtype=dtype, device=device) for n_in in (d, 4 * d)}
    return bytes_per_second(lambda: [F.linear(inputs[w.size(1)], w) for w in weights],
                            sum(w.numel() * w.element_size() for w in weights))


def train_step_speed(config, dtype, compiled, B, T):
    """(tokens/s, seconds/step, MFU) of forward + backward + AdamW on random tokens, after warm-up.
    A plain opt.step(): train.py's own step (step_unless, its skipped-step guard) is timed by
    gpu_check.py, which runs train.py itself. On CUDA the peak memory counts from here (peak_memory)."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = GPT(config).to(device)
    [opt] = model.configure_optimizers(0.1, 3e-4, (0.9, 0.95), 'cuda' if cuda else 'cpu')
    step_model = torch.compile(model, dynamic=False) if compiled else model  # each batch shape its own graph
    ctx = autocast(device, dtype)
    x, y = torch.randint(0, config.vocab_size, (2, B, T), device=device)
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device)
            t0 = time.perf_counter()
        with ctx:
            loss = step_model(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    synchronize(device)
    seconds = (time.perf_counter() - t0) / steps
    return B * T / seconds, seconds, model.estimate_mfu(B * T / seconds, peak[dtype], T)


def peak_memory():
    """On CUDA the row field of the most memory the last train_step_speed allocated; on the CPU none."""
    return {'peak_memory_gb': torch.cuda.max_memory_allocated() / 1e9} if cuda else {}


peak, peak_n = {}, {}
for dt in ('float32', 'bfloat16'):
    peak[dt], peak_n[dt] = measure_matmul_flops(device, getattr(torch, dt))
bandwidth, read_bandwidth = measure_bandwidth()
row('peak matmul fp32' + (' (TF32)' if cuda else ''), tflops=peak['float32'] / 1e12, n=peak_n['float32'])
row('peak matmul bf16', tflops=peak['bfloat16'] / 1e12, n=peak_n['bfloat16'],
    vs_fp32=peak['bfloat16'] / peak['float32'])
row('memory bandwidth (copy)', gb_per_s=bandwidth / 1e9)
dtypes = ['float32', 'bfloat16'] if peak['bfloat16'] > peak['float32'] else ['float32']

# --- training steps: the baseline first, then the allocator setting train.py uses on the CPU
shapes = [('GPT-2 small', GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size),
           batch_size, block_size)]
small_config = GPTConfig(n_layer=small['n_layer'], n_head=small['n_head'], n_embd=small['n_embd'],
                         block_size=small['block_size'], pad_vocab_to=small.get('pad_vocab_to', 64))
baseline_config = GPTConfig(n_layer=small['n_layer'], n_head=small['n_head'], n_embd=small['n_embd'],
                            block_size=small['block_size'], pad_vocab_to=1)
if not cuda:  # the CPU config's baseline: plain eager fp32, no padding, glibc's default allocator
    base_speed, base_seconds, _ = train_step_speed(baseline_config, 'float32', False, small['batch_size'],
                                                   small['block_size'])
    row('CPU config: plain eager fp32 (baseline)', tokens_per_s=base_speed, ms_per_step=base_seconds * 1000)
    keep_freed_memory()  # as train.py does on the CPU
    # what train.py's dtype='auto' picks for the small model, and the timings it picks on
    choice, head_seconds, probe_tokens = choose_cpu_dtype(small_config.n_embd, small_config.padded_vocab_size,
                                                          small['batch_size'] * small['block_size'])
    row('dtype auto (vocabulary head probe)', chosen=choice, tokens=probe_tokens,
        float32_ms=head_seconds['float32'] * 1000, bfloat16_ms=head_seconds['bfloat16'] * 1000)
    shapes.append(('CPU config', small_config, small['batch_size'], small['block_size']))
variants = [(mode, dtype) for mode in (['eager', 'compiled'] if compile else ['eager'])
            for dtype in (['bfloat16'] if cuda else dtypes)]
for shape_name, config, B, T in shapes:
    for mode, dtype in variants:
        speed, seconds, mfu = train_step_speed(config, dtype, mode == 'compiled', B, T)
        extra = {'vs_baseline': speed / base_speed} if shape_name == 'CPU config' and not cuda else {}
        row(f"{shape_name}: {mode} {dtype}, B={B} T={T}", tokens_per_s=speed, ms_per_step=seconds * 1000,
            mfu=mfu, **extra, **peak_memory())
if cuda and compile:  # larger micro-batches fill the GPU better, until memory runs out
    # a compilation takes ~40 s: the sizes are tried eagerly, from the largest down, and only the
    # largest that fits is compiled (an eager step keeps more activations: the estimate errs small)
    gpt2_config = shapes[0][1]
    fits = largest_that_fits(large_batches,
                             lambda B: train_step_speed(gpt2_config, 'bfloat16', False, B, block_size))
    if fits is not None:
        speed, seconds, mfu = train_step_speed(gpt2_config, 'bfloat16', True, fits, block_size)
        row(f"GPT-2 small: compiled bfloat16, B={fits} T={block_size}", tokens_per_s=speed,
            ms_per_step=seconds * 1000, mfu=mfu, **peak_memory())
    too_large = [B for B in large_batches if fits is None or B > fits]
    if too_large:  # the smallest that did not fit
        row(f"GPT-2 small: compiled bfloat16, B={min(too_large)} T={block_size}", fits=False)

# --- data: get_batch on the memmap opened once, against reopening the file for every batch
data_file = os.path.join(data_dir, 'train.bin')
if not os.path.exists(data_file):  # no prepared book: time the same reads on random tokens
    data_file = os.path.join(tempfile.mkdtemp(), 'train.bin')
    np.random.default_rng(0).integers(0, 50257, 200_000).astype(np.uint16).tofile(data_file)
B, T = small['batch_size'], small['block_size']
rng = np.random.default_rng(0)
tokens = np.memmap(data_file, dtype=np.uint16, mode='r')
t0 = time.perf_counter()
for _ in range(200):
    torch.from_numpy(windows(tokens, random_offsets(rng, len(tokens), T, B), T)[0])
opened_once = (time.perf_counter() - t0) / 200
t0 = time.perf_counter()
for _ in range(200):
    reopened = np.memmap(data_file, dtype=np.uint16, mode='r')
    torch.from_numpy(windows(reopened, random_offsets(rng, len(reopened), T, B), T)[0])
reopening = (time.perf_counter() - t0) / 200
if not cuda:
    step_seconds = B * T / max(r['tokens_per_s'] for r in rows if r['name'].startswith('CPU config:'))
    row('get_batch (memmap opened once)', us_per_batch=opened_once * 1e6,
        fraction_of_step=opened_once / step_seconds)
row('get_batch (memmap reopened per batch)', us_per_batch=reopening * 1e6,
    vs_opened_once=reopening / opened_once)

# --- generation: prefill into the static KV cache, then one decode step per token, eager and
# compiled, at batch 1 and 8, beside the limit that reading the weights and the cache once per
# step sets; and recomputing the whole context for each token, without a cache
row('memory bandwidth (read)', gb_per_s=read_bandwidth / 1e9)
for dtype in ('float32', 'bfloat16'):
    rate = matvec_bandwidth(getattr(torch, dtype))
    row(f'matrix-vector products ({dtype})', gb_per_s=rate / 1e9, of_read_bandwidth=rate / read_bandwidth)


def decode_speed(model, batch, n_tokens, prompt_tokens, cache_dtype=None, kv_cache=True, decode=None):
    """Tokens/s of greedy decoding after a prompt of prompt_tokens: n_tokens steps of batch tokens,
    timed from the second token on (the first pays for the prefill); after a warm-up of two decode
    steps on the same cache (kv_cache: one of cache_dtype): the first compiles decode (and on CUDA
    runs it eagerly), the second captures its CUDA graph, which the timed steps replay. A new cache
    would be captured anew."""
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_tokens), device=device)
    cache = model.new_cache(batch, cache_dtype, device, static=decode is not None) if kv_cache else None
    greedy = lambda n: model.stream(prompt, n, temperature=0, kv_cache=kv_cache, decode=decode, cache=cache)
    for _ in greedy(3):
        pass
    tokens = greedy(n_tokens + 1)
    next(tokens)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in tokens:
        pass
    synchronize(device)
    return batch * n_tokens / (time.perf_counter() - t0)


def transformers_speed(config, dtype, n_tokens, prompt_tokens):
    """Tokens/s of Hugging Face transformers' greedy generate (eager, its dynamic cache) on a randomly
    initialised GPT-2 of config's shape at batch 1, from the second token on, as decode_speed times
    ours: generate(n_tokens + 1) less generate(1), the prompt's prefill and first token. None where
    transformers is not installed."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        print("transformers is not installed: no reference row (pip install -r requirements-dev.txt)",
              file=sys.stderr)
        return None
    torch.manual_seed(0)
    hf_config = GPT2Config(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                           n_positions=config.block_size, vocab_size=config.vocab_size)
    hf = GPT2LMHeadModel(hf_config).to(device, getattr(torch, dtype)).eval()
    prompt = torch.randint(0, config.vocab_size, (1, prompt_tokens), device=device)

    def seconds(new):
        synchronize(device)
        t0 = time.perf_counter()
        hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        synchronize(device)
        return time.perf_counter() - t0
    seconds(3)  # warm-up
    return n_tokens / (seconds(n_tokens + 1) - seconds(1))


for shape_name, config in (('GPT-2 small', GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd)),
                           ('CPU config', small_config)):
    model = GPT(config).to(device).eval()
    prompt_tokens = min(16, config.block_size // 2)
    n_tokens = min(new_tokens, config.block_size - prompt_tokens)  # within the cache
    # in fp32: recomputing multiplies matrices, where emulated bf16 is slowest
    if shape_name == 'GPT-2 small':
        recompute = decode_speed(model, 1, n_tokens, prompt_tokens, kv_cache=False)
        row(f'{shape_name}: generate {n_tokens} tokens, no cache, B=1', dtype='float32',
            tokens_per_s=recompute)
    for B in (1, 8):
        (dtype, cache_dtype), _ = choose_decode_dtype(model, device, B)  # sample.py's 'auto' at this batch
        decoder = copy.deepcopy(model).to(getattr(torch, dtype))
        # each read once per step
        weight_bytes = sum(p.numel() * p.element_size() for p in decoder.parameters())
        cache_bytes = (2 * config.n_layer * B * config.block_size * config.n_embd
                       * getattr(torch, cache_dtype).itemsize)
        limit = B * read_bandwidth / (weight_bytes + cache_bytes)  # tokens/s when a step is its reads
        reference_speed = None
        if reference and shape_name == 'GPT-2 small' and B == 1:
            reference_speed = transformers_speed(config, dtype, n_tokens, prompt_tokens)
            if reference_speed:
                row(f'{shape_name}: transformers generate {n_tokens} tokens, B=1', dtype=dtype,
                    tokens_per_s=reference_speed)
        for mode in (['eager', 'compiled'] if compile else ['eager']):
            speed = decode_speed(decoder, B, n_tokens, prompt_tokens, getattr(torch, cache_dtype),
                                 decode=compile_decode(decoder) if mode == 'compiled' else None)
            if cuda and mode == 'compiled' and torch._dynamo.utils.counters['inductor']['cudagraph_skips']:
                sys.exit("error: the compiled decode step ran without a CUDA graph "
                         "(TORCH_LOGS=cudagraphs says why)")
            extra = {'vs_no_cache': speed / recompute} if shape_name == 'GPT-2 small' and B == 1 else {}
            if reference_speed:
                extra['vs_transformers'] = speed / reference_speed
            row(f'{shape_name}: decode {n_tokens} tokens, {mode}, B={B}', dtype=dtype,
                cache_dtype=cache_dtype, tokens_per_s=speed, read_limit_tokens_per_s=limit,
                of_limit=speed / limit, **extra)
