"""The wall-clock budget and its learning-rate schedule (gulliver/schedule.py), the dtype probes, the
matmul peak and the largest micro-batch that fits (gulliver/machine.py), with fake clocks, fake timings
and a fake out-of-memory error."""
import math

import pytest
import torch

from gulliver import machine
from gulliver.schedule import learning_rate_at, training_progress

LR, MIN_LR, WARMUP = 2e-3, 1e-4, 10


def run_on_fake_clock(seconds_per_step, max_iters, max_seconds, cooldown=None):
    """Drive the schedule as train.py's loop does, with a clock that advances seconds_per_step
    per iteration. Returns [(iter, elapsed, lr)] for every pass through the loop, the last one
    being the pass that ends the run."""
    trace, iter_num, elapsed = [], 0, 0.0
    while True:
        progress = training_progress(iter_num, max_iters, elapsed, max_seconds)
        trace.append((iter_num, elapsed, learning_rate_at(iter_num, progress, LR, MIN_LR, WARMUP, cooldown)))
        if progress >= 1:
            return trace
        iter_num, elapsed = iter_num + 1, elapsed + seconds_per_step


@pytest.mark.parametrize('cooldown', [None, 0.3])
@pytest.mark.parametrize('seconds_per_step', [0.25, 0.7, 1.3])
def test_budget_ends_the_decay_at_min_lr_whatever_the_speed(seconds_per_step, cooldown):
    trace = run_on_fake_clock(seconds_per_step, max_iters=10**6, max_seconds=60.0, cooldown=cooldown)
    last_iter, last_elapsed, last_lr = trace[-1]
    assert last_lr == MIN_LR                                  # exactly, at the budget
    assert last_elapsed >= 60.0 > trace[-2][1]                # the first pass past the budget ends it
    assert last_iter == math.ceil(60.0 / seconds_per_step)    # a faster machine takes more steps
    assert all(lr > MIN_LR for _, _, lr in trace[:-1])
    decay = [lr for it, _, lr in trace if it >= WARMUP]
    assert all(a >= b for a, b in zip(decay, decay[1:]))      # after warm-up the lr only falls


def test_iterations_end_the_run_when_they_come_first():
    trace = run_on_fake_clock(0.5, max_iters=50, max_seconds=3600.0)
    assert trace[-1][0] == 50 and trace[-1][2] == MIN_LR
    without_budget = run_on_fake_clock(0.5, max_iters=50, max_seconds=None)
    assert without_budget == trace                            # a budget that never binds changes nothing


def test_warmup_is_linear_in_iterations_and_the_cosine_is_half_way_at_half_progress():
    assert learning_rate_at(0, 0.0, LR, MIN_LR, WARMUP) == pytest.approx(LR / (WARMUP + 1))
    assert learning_rate_at(4, 0.0, LR, MIN_LR, WARMUP) == pytest.approx(LR * 5 / (WARMUP + 1))
    assert learning_rate_at(WARMUP, 0.0, LR, MIN_LR, WARMUP) == LR
    assert learning_rate_at(100, 0.5, LR, MIN_LR, WARMUP) == pytest.approx((LR + MIN_LR) / 2)
    assert learning_rate_at(100, 1.7, LR, MIN_LR, WARMUP) == MIN_LR  # past the end: stays at min_lr
    assert training_progress(30, 100, 12.0, 60.0) == pytest.approx(0.3)


def test_a_cooldown_holds_the_peak_then_falls_in_a_line_to_min_lr():
    assert learning_rate_at(0, 0.0, LR, MIN_LR, WARMUP, cooldown=0.3) == pytest.approx(LR / (WARMUP + 1))
    assert learning_rate_at(100, 0.5, LR, MIN_LR, WARMUP, cooldown=0.3) == LR
    assert learning_rate_at(100, 0.7, LR, MIN_LR, WARMUP, cooldown=0.3) == pytest.approx(LR)
    assert learning_rate_at(100, 0.85, LR, MIN_LR, WARMUP, cooldown=0.3) == pytest.approx((LR + MIN_LR) / 2)
    assert learning_rate_at(100, 0.94, LR, MIN_LR, WARMUP, cooldown=0.3) == pytest.approx(MIN_LR + 0.2 * (LR - MIN_LR))
    assert learning_rate_at(100, 1.0, LR, MIN_LR, WARMUP, cooldown=0.3) == MIN_LR
    assert learning_rate_at(100, 1.7, LR, MIN_LR, WARMUP, cooldown=0.3) == MIN_LR
    assert learning_rate_at(100, 0.5, LR, MIN_LR, WARMUP, cooldown=1.0) == pytest.approx((LR + MIN_LR) / 2)
    assert training_progress(10, 100, 30.0, 60.0) == pytest.approx(0.5)
    assert training_progress(0, 0, 0.0, 0.0) == 1.0           # max_iters 0: nothing to train


def fake_timer(per_token):
    """A timer for choose_cpu_dtype: per_token[dtype] seconds per token, plus a log of the calls."""
    calls = []

    def timer(n_embd, vocab_size, n_tokens, dtype):
        calls.append((n_tokens, dtype))
        return per_token[dtype] * n_tokens
    return timer, calls


def test_dtype_probe_picks_float32_where_bf16_is_slower():
    timer, calls = fake_timer({'float32': 1e-4, 'bfloat16': 3e-4})
    dtype, seconds, tokens = machine.choose_cpu_dtype(256, 50304, 2048, timer=timer)
    assert dtype == 'float32' and seconds == {'float32': 1e-4 * tokens, 'bfloat16': 3e-4 * tokens}
    # rounds of 1, 4, 16, 64, 256, 1024 tokens: 1024 * 3e-4 s is the first to pass 0.1 s
    assert tokens == 1024 and [n for n, _ in calls[::2]] == [1, 4, 16, 64, 256, 1024]


def test_dtype_probe_picks_bfloat16_where_it_is_faster():
    timer, _ = fake_timer({'float32': 1e-4, 'bfloat16': 4e-5})
    assert machine.choose_cpu_dtype(256, 50304, 2048, timer=timer)[0] == 'bfloat16'


def test_dtype_probe_stops_at_once_where_bf16_is_emulated():
    timer, calls = fake_timer({'float32': 2e-4, 'bfloat16': 0.2})  # a thousand times slower
    dtype, seconds, tokens = machine.choose_cpu_dtype(256, 50304, 2048, timer=timer)
    assert dtype == 'float32' and tokens == 1 and len(calls) == 2 and seconds['bfloat16'] == 0.2


def test_dtype_probe_never_times_more_tokens_than_the_run_has():
    timer, calls = fake_timer({'float32': 1e-9, 'bfloat16': 1e-9})
    assert machine.choose_cpu_dtype(32, 1000, 40, timer=timer)[2] == 40
    assert max(n for n, _ in calls) == 40


def test_time_head_runs_both_dtypes():
    for dtype in ('float32', 'bfloat16'):
        assert 0 < machine.time_head(16, 300, 8, dtype, repeats=1) < 10


def test_matmul_peak_on_a_fake_clock_stops_growing_once_a_product_is_slow(monkeypatch):
    """With a clock on which an n x n product runs at 1e9 * n / 128 FLOP/s (still rising), so that
    it takes 2 n^3 / rate = 256 n^2 / 1e9 s, the probe grows n until one product passes
    seconds / 20 = 5 ms (n = 256: 17 ms) and reports that size's rate, 2e9 FLOP/s."""
    now, sizes = [0.0], []
    real_matmul = torch.Tensor.__matmul__

    def slow_matmul(a, b):
        sizes.append(a.shape[0])
        now[0] += 256 * a.shape[0] ** 2 / 1e9
        return real_matmul(a, b)
    monkeypatch.setattr(machine.time, 'perf_counter', lambda: now[0])
    monkeypatch.setattr(torch.Tensor, '__matmul__', slow_matmul)
    flops, n = machine.measure_matmul_flops('cpu', torch.float32, seconds=0.1)
    assert set(sizes) == {128, 256} and n == 256 and flops == pytest.approx(2e9)


def test_matmul_peak_grows_the_product_until_the_rate_stops_rising(monkeypatch):
    """A fake GPU: a product of size n takes 2 n^3 / rate(n) s, with a rate that grows 1.9x per
    doubling up to n = 4096 and then by 1%: the probe stops at 8192, the first size that gains less
    than 3%, and reports the best rate it saw (no product comes near the time cap, seconds / 20)."""
    now, sizes = [0.0], []
    real_matmul = torch.Tensor.__matmul__
    rate = lambda n: 1e12 * 1.9 ** min(n.bit_length() - 8, 5) * (1.01 if n > 4096 else 1.0)  # 128 -> 1e12

    def matmul(a, b):
        n = a.shape[0]
        sizes.append(n)
        now[0] += 2 * n ** 3 / rate(n)
        return real_matmul(a[:2, :2], b[:2, :2])  # the real product of a small corner: only the clock matters
    monkeypatch.setattr(machine.time, 'perf_counter', lambda: now[0])
    monkeypatch.setattr(torch.Tensor, '__matmul__', matmul)
    monkeypatch.setattr(torch, 'randn', lambda n, *args, **kwargs: torch.empty(n, 2))  # no 8192^2 matrices
    flops, n = machine.measure_matmul_flops('cpu', torch.float32, seconds=1)
    assert n == max(sizes) == 8192 and flops == pytest.approx(rate(8192))


def test_decode_dtype_probe_times_a_real_step_of_the_batch_that_will_decode():
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)).eval()
    calls = []

    def timer(model, dtype, device, batch, cache_dtype):
        calls.append((dtype, cache_dtype, batch))
        return {('float32', 'float32'): 2.0, ('bfloat16', 'bfloat16'): 1.5,
                ('bfloat16', 'float32'): 1.0}[dtype, cache_dtype]
    choice, seconds = machine.choose_decode_dtype(model, 'cpu', 8, timer=timer)
    assert choice == ('bfloat16', 'float32') and seconds[('bfloat16', 'bfloat16')] == 1.5
    assert calls == [('float32', 'float32', 8), ('bfloat16', 'bfloat16', 8), ('bfloat16', 'float32', 8)]
    # the real timer: one decode step of 3 sequences, for each pair, on a copy (the model stays fp32)
    assert all(0 < machine.time_decode(model, dtype, 'cpu', 3, cache_dtype, steps=2) < 10
               for dtype, cache_dtype in [('float32', 'float32'), ('bfloat16', 'bfloat16'), ('bfloat16', 'float32')])
    assert model.lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize('bf16, low', [(True, 'bfloat16'), (False, 'float16')])
def test_decode_dtype_on_cuda_is_half_precision_throughout_and_never_timed(monkeypatch, bf16, low):
    # an eager step on a GPU is bound by its launches: fp32 and bf16 would time alike, a coin toss,
    # while the compiled graph reads half the bytes in bf16
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *args, **kwargs: bf16)

    def timer(*args):
        raise AssertionError('a decode step was timed on CUDA')
    for device in ('cuda', 'cuda:1'):
        assert machine.choose_decode_dtype(None, device, 8, timer=timer) == ((low, low), {})


def test_the_largest_batch_that_fits_is_found_from_the_largest_down():
    tried = []

    def step(batch):  # a GPU of room for 40
        tried.append(batch)
        if batch > 40:
            raise torch.cuda.OutOfMemoryError('CUDA out of memory')
    assert machine.largest_that_fits([24, 32, 48, 64], step) == 32
    assert tried == [64, 48, 32]  # 24 never runs: one try past the first that fits would be a waste
    tried.clear()
    assert machine.largest_that_fits([48, 64], step) is None and tried == [64, 48]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_the_largest_that_fits_catches_a_real_out_of_memory_error():
    gib = lambda n: torch.empty(n << 30, dtype=torch.uint8, device='cuda')  # 1 << 20 GiB: a pebibyte
    assert machine.largest_that_fits([1, 1 << 20], gib) == 1
    assert machine.largest_that_fits([1 << 20], gib) is None
