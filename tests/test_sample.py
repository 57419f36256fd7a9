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


def test_the_compiled_step_warms_up_on_the_cache_the_sample_decodes_on(tmp_path, monkeypatch):
    """--compile=True: on CUDA the compiled step runs eagerly at its first call, captures a CUDA graph at
    the second, and replays it while the cache's buffers stay where they are. So the warm-up takes two
    decode steps on the one cache sample.py allocates (marked static), and the sample decodes on it:
    then its steady rate is the replayed graph's, not a capture's. What the warm-up left in the cache
    does not change the text."""
    import model as model_py
    tiny_checkpoint(tmp_path / 'out')
    caches, marked = [], []

    def compile_decode(model):  # the step uncompiled: what matters here is the cache it is given
        def decode(token, position, cache):
            caches.append(cache)
            return model.decode_step(token, position, cache)
        return decode
    monkeypatch.setattr(model_py, 'compile_decode', compile_decode)
    monkeypatch.setattr(torch._dynamo, 'mark_static_address', lambda tensor, *args: marked.append(tensor))
    args = ['sample.py', f'--out_dir={tmp_path / "out"}', '--max_new_tokens=5', '--dtype=float32']
    compiled = run_in_process(*args, '--compile=True')
    assert compiled.returncode == 0, compiled.stderr
    assert len(caches) == 2 + 4  # the warm-up's decode steps, then the sample's after its first token
    assert len({id(cache) for cache in caches}) == 1
    assert {id(t) for t in marked} == {id(buffer) for layer in caches[0] for buffer in layer.values()}
    assert compiled.stdout == run_in_process(*args).stdout


def test_a_checkpoint_is_read_into_host_memory_not_onto_the_gpu(tmp_path, monkeypatch):
    # ckpt.pt holds the optimizer's moments beside the model: only the model is moved to the device
    from gulliver import checkpoint
    tiny_checkpoint(tmp_path / 'out')
    mapped_to = []

    def read_checkpoint(path, device='cpu'):
        mapped_to.append(device)
        raise ValueError('read no further')  # on a machine without CUDA, stop before anything is moved
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)  # for --device=cuda
    monkeypatch.setattr(checkpoint, 'read_checkpoint', read_checkpoint)
    result = run_in_process('sample.py', f'--out_dir={tmp_path / "out"}', '--checkpoint=last',
                            '--device=cuda')
    assert 'read no further' in result.stderr and mapped_to == ['cpu']
