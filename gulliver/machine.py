"""
What this machine can do, measured rather than assumed: the matmul peak that MFU is taken
against, and on the CPU whether bf16 autocast is faster than fp32 for the model at hand.

CPUs differ by far more than their core counts: one with AMX tiles multiplies bf16 matrices
about 6x faster than fp32, one with AVX-512 BF16 about 2x, and one without either emulates bf16
in software, hundreds of times slower than fp32. So every probe here grows its problem size
geometrically and stops as soon as one call takes a measurable time: a probe never runs for
minutes on the machine where a dtype happens to be emulated.
"""
import copy
import ctypes
import sys
import time
from contextlib import nullcontext

import torch
from torch.nn import functional as F


def autocast(device, dtype):
    """The context that computes in dtype ('float32', 'bfloat16' or 'float16') on device ('cpu',
    'cuda', 'cuda:1', ...): nothing for float32, else torch's autocast, which keeps the weights in
    fp32 and runs matrix products in dtype."""
    if dtype == 'float32':
        return nullcontext()
    return torch.autocast(device_type=str(device).split(':')[0], dtype=getattr(torch, dtype))


def to_device(x, y, device):
    """A batch of numpy arrays as tensors on device; to a GPU through pinned memory, without
    making the host wait for the copy."""
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    if device.startswith('cuda'):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


def synchronize(device):
    if str(device).startswith('cuda'):
        torch.cuda.synchronize()


def measure_matmul_flops(device='cpu', dtype=torch.float32, seconds=0.25, max_n=16384, plateau=1.03):
    """The machine's matmul peak, that MFU is measured against: (FLOP/s, n), the best rate of
    an n x n product (2 n^3 FLOPs) and the n it came from. n doubles from 128 while the rate still
    rises by more than `plateau` (small products do not fill a GPU: an H100 does about 620 TFLOP/s
    at 2048 and 800 at 8192), up to max_n, and never past a size where one product takes over
    seconds / 20 (a CPU that emulates bf16 is not kept for minutes). Each size runs seconds / 4."""
    generator = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG alone
    best, best_n, n = 0.0, 0, 128
    while True:
        a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=generator) for _ in range(2))
        a @ b  # warm-up: the first product of a shape also sets up its kernel
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        one_product = time.perf_counter() - t0
        runs, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 4:
            a @ b
            runs += 1
            if runs % 8 == 0:
                synchronize(device)
        synchronize(device)
        rate = 2 * n ** 3 * runs / (time.perf_counter() - t0)
        rising = rate > best * plateau
        if rate > best:
            best, best_n = rate, n
        if not rising or n >= max_n or one_product > seconds / 20:
            return best, best_n
        n *= 2


def time_head(n_embd, vocab_size, n_tokens, dtype, repeats=2):
    """Seconds (best of repeats) for the vocabulary head's forward and backward on the CPU:
    logits = h W_E^T for n_tokens hidden states h, cross-entropy, and the gradients of h and W_E.
    With a 50K vocabulary this is most of a small GPT's step. dtype: 'float32' or 'bfloat16'
    (autocast, as train.py runs it)."""
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(n_tokens, n_embd, generator=generator).requires_grad_()
    w_e = (0.02 * torch.randn(vocab_size, n_embd, generator=generator)).requires_grad_()
    targets = torch.randint(0, vocab_size, (n_tokens,), generator=generator)
    ctx = autocast('cpu', dtype)
    best = float('inf')
    for _ in range(repeats):
        t0 = time.perf_counter()
        with ctx:
            loss = F.cross_entropy(F.linear(h, w_e), targets)
        loss.backward()
        best = min(best, time.perf_counter() - t0)
    return best


def choose_cpu_dtype(n_embd, vocab_size, n_tokens, enough=0.1, timer=time_head):
    """'bfloat16' where bf16 autocast runs the vocabulary head faster than fp32 on this CPU, else
    'float32'. Both are timed on 1, 4, 16, ... tokens, up to the run's n_tokens, until the slower
    takes `enough` seconds: each round costs 4x the last, so the whole probe takes under 2 s
    even where bf16 is emulated. On too few tokens, autocast's cast of W_E to bf16 (the same
    for any number of tokens) would hide what bf16 gains. Under DDP every rank must compute in
    the same dtype: rank 0's probe decides. Returns (dtype, {dtype: seconds}, tokens in the last round)."""
    tokens = 1
    while True:
        seconds = {dtype: timer(n_embd, vocab_size, tokens, dtype) for dtype in ('float32', 'bfloat16')}
        if tokens >= n_tokens or max(seconds.values()) > enough:
            break
        tokens = min(4 * tokens, n_tokens)
    choice = ['bfloat16' if seconds['bfloat16'] < seconds['float32'] else 'float32']
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(choice, src=0)
    return choice[0], seconds, tokens


def time_decode(model, dtype, device, batch=1, cache_dtype=None, steps=8):
    """Seconds (best of steps) of one eager decode step of batch tokens, with the model's weights in
    dtype (a copy of the model) and the KV cache in cache_dtype (None: dtype): at a small batch a
    step is mostly the reading of every weight and of the cache."""
    model = copy.deepcopy(model).to(getattr(torch, dtype)).eval()
    cache = model.new_cache(batch, getattr(torch, cache_dtype or dtype), device)
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    position = torch.zeros(1, dtype=torch.long, device=device)
    best = float('inf')
    with torch.no_grad():
        for _ in range(steps):
            synchronize(device)
            t0 = time.perf_counter()
            model.decode_step(token, position, cache)
            synchronize(device)
            best = min(best, time.perf_counter() - t0)
    return best


def choose_decode_dtype(model, device, batch=1, timer=time_decode):
    """The dtypes of the weights and of the KV cache that decode batch sequences fastest on this
    machine. On a CUDA device: bf16 for both (fp16 on a GPU without bf16), not timed: an eager step
    there is bound by its kernel launches, so fp32 and bf16 time alike, while the compiled step (a
    CUDA graph) reads every weight and the whole cache per token, half the bytes in bf16. On the
    CPU, timed: fp32 throughout, bf16 throughout, or bf16 weights with an fp32 cache. Decoding one
    token is a chain of matrix-vector products, bound by how fast the weights are read, not by
    arithmetic: half the bytes can win even where bf16 arithmetic is emulated, so this times a
    decode step itself, not train.py's compute-bound probe. Attention over the cache is arithmetic
    as much as reading: where bf16 is emulated it runs faster in fp32. At a larger batch the
    arithmetic counts again, so the batch is the one that will decode. Returns ((weights dtype,
    cache dtype), {(weights dtype, cache dtype): seconds per step}, empty on CUDA)."""
    if str(device).startswith('cuda'):
        low = 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
        return (low, low), {}
    pairs = [('float32', 'float32'), ('bfloat16', 'bfloat16'), ('bfloat16', 'float32')]
    seconds = {pair: timer(model, pair[0], device, batch, pair[1]) for pair in pairs}
    return min(seconds, key=seconds.get), seconds


def largest_that_fits(sizes, step):
    """The largest of sizes (e.g. micro-batches) for which step(size) runs without running out of
    GPU memory, or None: tried from the largest down, so that only the sizes above it are tried in
    vain. step is a cheap stand-in for what will be measured (an eager training step, not a
    compilation of ~40 s per size)."""
    for size in sorted(sizes, reverse=True):
        try:
            step(size)
            return size
        except torch.OutOfMemoryError:
            pass
        # out of the except block, the failed step's tensors are free: hand their blocks back
        torch.cuda.empty_cache()
    return None


def keep_freed_memory():
    """Tell glibc to keep freed memory in the process. By default it returns big blocks to the
    OS and maps them afresh at the next step, so a CPU step spends much of its time in page
    faults. Linux only; elsewhere this does nothing."""
    if sys.platform.startswith('linux'):
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
