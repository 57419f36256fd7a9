import json

from conftest import run_script

TINY = ['--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=16', '--batch_size=2', '--new_tokens=4',
        '--steps=1', '--warmup=1']


def test_bench_produces_every_row(tmp_path):
    out = tmp_path / 'bench.jsonl'
    result = run_script('bench.py', *TINY, '--compile=False', f'--out_file={out}', f'--data_dir={tmp_path}')
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in open(out)]
    names = [r['name'] for r in rows]
    expected = ['peak matmul fp32', 'peak matmul bf16', 'memory bandwidth (copy)',
                'CPU config: plain eager fp32 (baseline)',
                'GPT-2 small: eager float32, B=2 T=16', 'GPT-2 small: eager bfloat16, B=2 T=16',
                'CPU config: eager float32, B=8 T=256', 'CPU config: eager bfloat16, B=8 T=256',
                'get_batch (memmap opened once)', 'get_batch (memmap reopened per batch)',
                'generate 4 tokens, no cache', 'generate 4 tokens, KV cache']
    assert names == expected
    for r in rows:
        assert r['device'] == 'cpu' and all(v > 0 for k, v in r.items() if isinstance(v, float))
        assert r['name'] in result.stdout
    speed = {r['name']: r for r in rows}
    assert 0 < speed['get_batch (memmap opened once)']['fraction_of_step'] < 1
    assert speed['generate 4 tokens, KV cache']['of_limit'] > 0
