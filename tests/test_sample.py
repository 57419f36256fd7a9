import dataclasses

import torch

from conftest import run_in_process
from model import GPT, GPTConfig


def tiny_checkpoint(folder):
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
    model = GPT(config)
    folder.mkdir()
    torch.save({'model': model.state_dict(), 'model_args': dataclasses.asdict(config), 'config': {},
                'iter_num': 0, 'best_val_loss': 9.9}, folder / 'ckpt.pt')
    return model


def test_same_seed_same_text(tmp_path):
    # --dtype pinned, as sample.py's docstring asks: 'auto' times fp32 against bf16, and two timings that
    # come out close choose differently from one run to the next (other weights, other text)
    tiny_checkpoint(tmp_path / 'out')
    args = ['sample.py', f'--out_dir={tmp_path / "out"}', '--max_new_tokens=12', '--start=Hello', '--num_samples=2',
            '--dtype=float32']
    first, second = run_in_process(*args, '--seed=7'), run_in_process(*args, '--seed=7')
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.startswith('Hello') and '---------------' in first.stdout
    assert run_in_process(*args, '--seed=8').stdout != first.stdout
    assert 'tokens/s' in first.stderr and '24 tokens' in first.stderr


def test_over_long_prompt_is_cropped_with_a_note(tmp_path):
    tiny_checkpoint(tmp_path / 'out')
    prompt = tmp_path / 'prompt.txt'
    prompt.write_text(' word' * 40)
    result = run_in_process('sample.py', f'--out_dir={tmp_path / "out"}', f'--start=FILE:{prompt}', '--max_new_tokens=3')
    assert result.returncode == 0, result.stderr
    assert 'the prompt has 40 tokens; keeping the last 16' in result.stderr


def test_a_reader_that_leaves_early_ends_the_run_quietly(tmp_path):
    # python sample.py | head -c 20: the pipe closes while tokens are still coming
    import os
    import subprocess
    import sys

    from conftest import ROOT
    tiny_checkpoint(tmp_path / 'out')
    process = subprocess.Popen([sys.executable, 'sample.py', f'--out_dir={tmp_path / "out"}', '--max_new_tokens=2000',
                                '--kv_cache=False', '--dtype=float32'], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={k: v for k, v in os.environ.items() if k != 'PYTHONUNBUFFERED'})  # a pipe buffers
    first = os.read(process.stdout.fileno(), 1 << 16)  # what has arrived when the first write wakes the reader
    assert 0 < len(first) < 1000 and process.poll() is None  # streamed: token by token, while the rest are made
    process.stdout.close()
    err = process.communicate(timeout=120)[1].decode()
    assert process.returncode == 0 and err == '', err
