"""gpu_check.py on the CPU at tiny sizes, so that it is known to work before a GPU is at hand;
and what can only be checked on CUDA, skipped without it (pytest -m cuda on a GPU machine)."""
import re

import numpy as np
import pytest
import torch

from conftest import run_in_process, run_script, write_token_data

TINY_MODEL = '--n_layer=1 --n_head=2 --n_embd=32 --block_size=16 --batch_size=4'


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp('data')
    pattern = np.random.default_rng(0).integers(0, 500, 50)
    write_token_data(folder, np.resize(pattern, 3000), np.resize(pattern, 500), vocab_size=512)
    return folder


def test_gpu_check_runs_every_part_on_the_cpu(data, tmp_path):
    report, small = tmp_path / 'gpu_check.md', tmp_path / 'small.py'
    small.write_text('n_layer = 1\nn_head = 2\nn_embd = 32\nblock_size = 16\nbatch_size = 2\n')
    bench = f'{TINY_MODEL} --new_tokens=4 --steps=1 --warmup=1 --compile=False --reference=False ' \
            f'--cpu_config={small}'
    flagship = f'{TINY_MODEL} --max_iters=4 --eval_interval=2 --eval_iters=1 --log_interval=2 --snapshot_interval=None ' \
               f'--sample_tokens=0 --peak_flops=1e12'
    # gpu_check.py itself in this process: the scripts it runs are subprocesses, as on the GPU machine
    result = run_in_process('gpu_check.py', '--device=cpu', f'--data_dir={data}', f'--work_dir={tmp_path / "runs"}',
                        f'--out_file={report}', f'--small_args={TINY_MODEL}', '--numerics_steps=4',
                        f'--bench_args={bench}', f'--flagship_args={flagship}',
                        f'--step_args={TINY_MODEL} --max_iters=6 --log_interval=2 --peak_flops=1e12')
    assert result.returncode == 0, result.stderr[-3000:]
    text = report.read_text()
    assert all(line in result.stdout for line in text.splitlines())  # printed as written
    assert re.search(r"## train.py's step at 4 x 16 tokens\n\n- [\d,]+ tokens/s, MFU [\d.]+%, the mean of 2 log "
                     r"windows of 2 steps, (float32|bfloat16) on cpu", text), text
    for line in ('peak matmul fp32', 'memory bandwidth (copy)', 'GPT-2 small: decode 4 tokens, eager, B=1', '| 4 |',
                 'best.pt: iteration', 'bf16 on cpu against fp32 on the CPU', 'resumed after 2 steps', 'all checks passed'):
        assert line in text, line
    # on the CPU a resume is bit-exact: the largest difference is 0
    assert 'resumed after 2 steps against the straight run: largest relative difference 0.00e+00' in text


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_a_compiled_bf16_step_on_cuda_reads_nothing_on_the_host(data, tmp_path):
    result = run_script('train.py', f'--data_dir={data}', f'--out_dir={tmp_path}', *TINY_MODEL.split(),
                        '--device=cuda', '--max_iters=30', '--log_interval=10', '--eval_interval=30', '--eval_iters=1',
                        '--sync_debug=True', '--sample_tokens=0', timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_the_compiled_decode_step_runs_as_a_cuda_graph():
    from torch._dynamo.utils import counters

    from model import GPT, GPTConfig, compile_decode
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)).cuda().eval()
    prompt = torch.randint(0, 50257, (2, 8), device='cuda')
    counters.clear()
    decoded = model.generate(prompt, 40, temperature=0, decode=compile_decode(model))
    assert counters['inductor']['cudagraph_skips'] == 0
    assert torch.equal(decoded, model.generate(prompt, 40, temperature=0, kv_cache=False))


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two CUDA GPUs')
def test_sync_debug_under_ddp_lets_the_buckets_be_rebuilt_then_reads_nothing(data, tmp_path):
    # the first forward after DDP's first synced backward rebuilds its buckets, with a host read:
    # sync_debug must let that step pass, and make any later read an error
    result = run_script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
                        f'--data_dir={data}', f'--out_dir={tmp_path}', *TINY_MODEL.split(), '--device=cuda',
                        '--max_iters=10', '--log_interval=5', '--eval_interval=10', '--eval_iters=1',
                        '--sync_debug=True', '--sample_tokens=0', timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
