import json

import pytest

from conftest import run_in_process
from model import GPT, GPTConfig

TINY = ['--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=16', '--batch_size=2', '--new_tokens=4',
        '--steps=1', '--warmup=1']


def test_bench_produces_every_row_at_the_sizes_it_is_given(tmp_path):
    out, small = tmp_path / 'bench.jsonl', tmp_path / 'small.py'
    small.write_text('n_layer = 1\nn_head = 2\nn_embd = 32\nblock_size = 24\nbatch_size = 3\n')
    result = run_in_process('bench.py', *TINY, '--compile=False', f'--out_file={out}', f'--data_dir={tmp_path}',
                        f'--cpu_config={small}')
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in open(out)]
    speed = {r['name']: r for r in rows}
    # bf16 training rows only where this CPU's bf16 matmuls beat fp32's (elsewhere bf16 is emulated)
    dtypes = ['float32'] + (['bfloat16'] if speed['peak matmul bf16']['vs_fp32'] > 1 else [])
    expected = ['peak matmul fp32', 'peak matmul bf16', 'memory bandwidth (copy)',
                'CPU config: plain eager fp32 (baseline)', 'dtype auto (vocabulary head probe)',
                *[f'GPT-2 small: eager {dtype}, B=2 T=16' for dtype in dtypes],
                *[f'CPU config: eager {dtype}, B=3 T=24' for dtype in dtypes],
                'get_batch (memmap opened once)', 'get_batch (memmap reopened per batch)',
                'memory bandwidth (read)', 'matrix-vector products (float32)', 'matrix-vector products (bfloat16)',
                'GPT-2 small: generate 4 tokens, no cache, B=1', 'GPT-2 small: transformers generate 4 tokens, B=1',
                *[f'{shape}: decode 4 tokens, eager, B={B}' for shape in ('GPT-2 small', 'CPU config') for B in (1, 8)]]
    assert [r['name'] for r in rows] == expected
    for r in rows:
        assert r['device'] == 'cpu' and all(v > 0 for k, v in r.items() if isinstance(v, float))
        assert r['name'] in result.stdout
    probe = speed['dtype auto (vocabulary head probe)']
    assert probe['chosen'] == min(('float32', 'bfloat16'), key=lambda dtype: probe[f'{dtype}_ms'])
    assert 1 <= probe['tokens'] <= 3 * 24
    assert 0 < speed['get_batch (memmap opened once)']['fraction_of_step'] < 1
    ours = speed['GPT-2 small: decode 4 tokens, eager, B=1']
    theirs = speed['GPT-2 small: transformers generate 4 tokens, B=1']
    assert theirs['dtype'] == ours['dtype']
    assert ours['vs_transformers'] == pytest.approx(ours['tokens_per_s'] / theirs['tokens_per_s'], rel=1e-9)
    read = speed['memory bandwidth (read)']['gb_per_s']
    for dtype in ('float32', 'bfloat16'):
        matvec = speed[f'matrix-vector products ({dtype})']
        assert matvec['of_read_bandwidth'] == pytest.approx(matvec['gb_per_s'] / read, rel=1e-9)
    # the decode rows' limit: B tokens per step, each step reading the weights and the whole cache once
    decode = speed['CPU config: decode 4 tokens, eager, B=8']
    assert (decode['dtype'], decode['cache_dtype']) in [('float32', 'float32'), ('bfloat16', 'bfloat16'),
                                                        ('bfloat16', 'float32')]
    element = {'float32': 4, 'bfloat16': 2}
    small_model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=24, pad_vocab_to=64))
    weights = sum(p.numel() for p in small_model.parameters()) * element[decode['dtype']]
    cache = 2 * 1 * 8 * 24 * 32 * element[decode['cache_dtype']]  # keys and values, n_layer x B x block_size x n_embd
    bandwidth = speed['memory bandwidth (read)']['gb_per_s'] * 1e9
    assert decode['read_limit_tokens_per_s'] == pytest.approx(8 * bandwidth / (weights + cache), rel=1e-9)
    assert decode['of_limit'] == pytest.approx(decode['tokens_per_s'] / decode['read_limit_tokens_per_s'], rel=1e-9)


def test_each_decode_row_warms_up_on_the_cache_it_times(tmp_path, monkeypatch):
    """A compiled step's CUDA graph is captured at its second call and replays only on the cache it
    was captured on: each decode row's warm-up (a prefill and two decode steps) and its timed run
    share one cache, or the timed steps would include a capture."""
    calls, stream = [], GPT.stream

    def recording(self, idx, n, *args, cache=None, **kwargs):
        calls.append((n, cache))
        return stream(self, idx, n, *args, cache=cache, **kwargs)
    monkeypatch.setattr(GPT, 'stream', recording)
    small = tmp_path / 'small.py'
    small.write_text('n_layer = 1\nn_head = 2\nn_embd = 32\nblock_size = 24\nbatch_size = 3\n')
    result = run_in_process('bench.py', *TINY, '--compile=False', '--reference=False',
                            f'--out_file={tmp_path / "bench.jsonl"}', f'--data_dir={tmp_path}',
                            f'--cpu_config={small}')
    assert result.returncode == 0, result.stderr
    # GPT-2 small without a cache, then four decode rows (two shapes at B=1 and 8): warm-up, timed run
    assert [n for n, _ in calls] == [3, 4 + 1] * 5
    assert calls[0][1] is None and calls[1][1] is None
    for (_, warm), (_, timed) in zip(calls[2::2], calls[3::2]):
        assert warm is not None and warm is timed
