"""Bad input, as a user would make it: every case exits non-zero with exactly one line on
stderr that says what to do, no traceback, and no file created or changed. The cases run in
this process (run_in_process); a few run as real subprocesses too, to show that the two agree."""
import json
import os
import shutil
import struct
import warnings

import numpy as np
import pytest

import torch

from conftest import run_in_process, run_script, send, write_token_data


def tree(folder):
    """{relative path: (size, mtime in ns, inode)} of every file under folder: a file written,
    replaced or truncated changes its entry (and reading 70 MB of checkpoints twice per case would
    cost the suite seconds)."""
    found = {}
    for parent, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(parent, name)
            stat = os.stat(path)
            found[os.path.relpath(path, folder)] = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    return found


def make_files(tmp):
    """A small prepared data_dir, a good checkpoint, a truncated one, and assorted bad inputs."""
    data = tmp / 'data'
    tokens = np.random.default_rng(0).integers(0, 1000, 3000).astype(np.uint16)
    meta = write_token_data(data, tokens[:2500], tokens[2500:])
    write_token_data(tmp / 'other_vocab', tokens[:2500], tokens[2500:], vocab_size=1000)
    write_token_data(tmp / 'other_data', tokens[500:], tokens[:500])  # the same sizes, other tokens
    write_token_data(tmp / 'big_ids', tokens[:2500], tokens[2500:], vocab_size=600)  # ids up to 999
    for name, change in (('old_meta', lambda d: (d / 'meta.json').write_text(json.dumps({'vocab_size': 50257}))),
                         ('no_val', lambda d: (d / 'val.bin').unlink()),
                         ('empty_bin', lambda d: (d / 'train.bin').write_bytes(b'')),
                         ('odd_bin', lambda d: (d / 'train.bin').write_bytes(tokens[:2500].tobytes() + b'x')),
                         ('longer_bin', lambda d: (d / 'train.bin').write_bytes(tokens.tobytes())),  # re-prepared
                         ('damaged_meta', lambda d: (d / 'meta.json').write_text('{"vocab_size": 50')),
                         ('no_vocab_meta', lambda d: (d / 'meta.json').write_text(json.dumps(
                             {k: v for k, v in meta.items() if k != 'vocab_size'}))),
                         ('number_meta', lambda d: (d / 'meta.json').write_text('5')),
                         ('text_vocab_meta', lambda d: (d / 'meta.json').write_text(json.dumps(
                             {**meta, 'vocab_size': '50257', 'sha256': []})))):
        write_token_data(tmp / name, tokens[:2500], tokens[2500:])
        change(tmp / name)
    result = run_in_process('train.py', f'--data_dir={data}', f'--out_dir={tmp / "good"}', '--n_layer=1', '--n_head=1',
                        '--n_embd=16', '--block_size=16', '--batch_size=2', '--max_iters=2', '--eval_iters=1',
                        '--sample_tokens=0')
    assert result.returncode == 0, result.stderr
    (tmp / 'bad').mkdir()
    ckpt = (tmp / 'good' / 'ckpt.pt').read_bytes()
    (tmp / 'bad' / 'ckpt.pt').write_bytes(ckpt[:len(ckpt) // 2])
    good = torch.load(tmp / 'good' / 'ckpt.pt', weights_only=True)
    for name, state in (('no_key', {k: v for k, v in good.items() if k != 'ranks'}),
                        ('wrong_type', {**good, 'model_args': [1, 2]}),
                        ('old_ranks', {**good, 'ranks': [{k: v for k, v in good['ranks'][0].items()
                                                          if k != 'targets_drawn'}]}),
                        ('mlm', {**good, 'model_args': {**good['model_args'], 'causal': False},
                                 'config': {**good['config'], 'objective': 'mlm'}}),
                        ('big_vocab', {**good, 'model_args': {**good['model_args'], 'vocab_size': 50304}}),
                        ('small_vocab', {**good, 'model_args': {**good['model_args'], 'vocab_size': 1000,
                                                                'pad_vocab_to': 1},
                                         'model': {k: v[:1000] if k in ('transformer.wte.weight', 'lm_head.weight')
                                                   else v for k, v in good['model'].items()}})):
        (tmp / name).mkdir()
        torch.save(state, tmp / name / 'ckpt.pt')
    (tmp / 'latin1.txt').write_bytes('Lilliput, naïve'.encode('latin-1'))
    (tmp / 'mixed' / 'snapshots').mkdir(parents=True)
    for name in ('ckpt.pt', 'log.jsonl'):
        (tmp / 'mixed' / name).write_bytes((tmp / 'good' / name).read_bytes())
    for step, width in ((0, 16), (1, 32)):  # two runs' snapshots in one folder
        np.savez(tmp / 'mixed' / 'snapshots' / f'iter_{step:06d}.npz', W_E=np.zeros((50257, width), np.float16))
    (tmp / 'page.html').write_text('<!DOCTYPE html>\n<html><body>Gulliver</body></html>\n' * 100)
    (tmp / 'empty.txt').write_text('')
    (tmp / 'binary.txt').write_bytes(bytes(range(256)) * 100)
    (tmp / 'syntax.py').write_text('batch_size = (8\n')
    (tmp / 'upper.py').write_text('BATCH_SIZE = 8\n')
    (tmp / 'book.txt').write_text('It was the best of times, it was the worst of times. ' * 200)
    np.save(tmp / 'vector.npy', np.ones(64, dtype=np.float32))
    np.save(tmp / 'nan.npy', np.full((16, 8), np.nan, dtype=np.float32))


TRAIN = ['train.py', '--data_dir={tmp}/data', '--out_dir={tmp}/out', '--n_layer=1', '--n_head=1', '--n_embd=16',
         '--block_size=16', '--batch_size=2', '--max_iters=1']
CASES = [
    # (name, command, what the one line must say)
    ('unknown setting', ['prepare.py', '--no_such_key=1'], "unknown setting 'no_such_key'; the settings are chunk_tokens"),
    ('misspelt setting', [*TRAIN, '--lerning_rate=1e-3'], "did you mean 'learning_rate'"),
    ('wrong type', [*TRAIN, '--batch_size=eight'], "'batch_size' expects int"),
    ('config file missing', ['train.py', '{tmp}/nope.py'], 'cannot read config file'),
    ('config syntax error', ['train.py', '{tmp}/syntax.py'], 'is not valid Python'),
    ('setting without value', [*TRAIN, '--batch_size'], 'has no value'),
    ('prepare: missing file', ['prepare.py', '--source={tmp}/nope.txt', '--data_dir={tmp}/data'], 'no such file'),
    ('prepare: HTML page', ['prepare.py', '--source={tmp}/page.html', '--data_dir={tmp}/data'], 'HTML'),
    ('prepare: HTTP 404', ['prepare.py', '--source={url}/missing.txt', '--data_dir={tmp}/data'], 'HTTP 404'),
    ('prepare: unreachable host', ['prepare.py', '--source=http://127.0.0.1:9/pg829.txt', '--data_dir={tmp}/data'],
     '--source=path/to/pg829.txt'),
    ('prepare: empty file', ['prepare.py', '--source={tmp}/empty.txt', '--data_dir={tmp}/data'], 'is empty'),
    ('prepare: binary file', ['prepare.py', '--source={tmp}/binary.txt', '--data_dir={tmp}/data'], 'not UTF-8'),
    ('prepare: bad split', ['prepare.py', '--source={tmp}/page.html', '--split=middle'], "split must be"),
    ('train: no data', [*TRAIN, '--data_dir={tmp}/nowhere'], 'run python prepare.py first'),
    ('train: block_size > data', [*TRAIN, '--block_size=1000'], 'lower --block_size'),
    ('train: batch_size 0', [*TRAIN, '--batch_size=0'], 'batch_size must be >= 1, not 0'),
    ('train: negative learning rate', [*TRAIN, '--learning_rate=-1e-3'], 'must be >= 0'),
    ('train: negative budget', [*TRAIN, '--max_seconds=-60'], 'max_seconds must be None or > 0, not -60'),
    ('train: meta.json without byte counts', [*TRAIN, '--data_dir={tmp}/old_meta'], 'run python prepare.py again'),
    ('train: negative grad_clip', [*TRAIN, '--grad_clip=-1'], 'grad_clip must be None or > 0, not -1'),
    ('train: compile neither on nor off', [*TRAIN, '--compile=anything'], "compile must be one of None, True, False"),
    ('train: dropout 1', [*TRAIN, '--dropout=1.0'], 'dropout must be in [0, 1), not 1.0'),
    ('train: beta2 above 1', [*TRAIN, '--beta2=1.5'], 'beta2 must be in [0, 1)'),
    ('train: negative weight decay', [*TRAIN, '--weight_decay=-0.1'], 'weight_decay must be >= 0'),
    ('train: n_embd not a multiple of n_head', [*TRAIN, '--n_head=3'], 'must be a multiple of n_head (3)'),
    ('train: pad_vocab_to 0', [*TRAIN, '--pad_vocab_to=0'], 'pad_vocab_to must be >= 1'),
    ('train: negative seed', [*TRAIN, '--seed=-1'], 'seed must be an integer in [0, 2**63), not -1'),
    ('train: seed past 64 bits', [*TRAIN, '--seed=18446744073709551616'], 'seed must be an integer in [0, 2**63)'),
    ('train: empty out_dir', [*TRAIN, '--out_dir='], 'out_dir must be a folder'),
    ('train: out_dir under a file', [*TRAIN, '--out_dir={tmp}/page.html/out'], 'cannot write to out_dir'),
    ('train: device mps', [*TRAIN, '--device=mps'], "unknown device 'mps'; use auto, cpu, cuda or cuda:N"),
    ('train: GPU that is not there', [*TRAIN, '--device=cuda:7'], 'CUDA is not available'),
    ('train: upper-case setting in a config file', ['train.py', '{tmp}/upper.py'], 'write batch_size'),
    ('train: no val.bin', [*TRAIN, '--data_dir={tmp}/no_val'], 'no_val/val.bin; run python prepare.py first'),
    ('train: empty train.bin', [*TRAIN, '--data_dir={tmp}/empty_bin'], 'not a file of uint16 token ids (0 bytes)'),
    ('train: odd-sized train.bin', [*TRAIN, '--data_dir={tmp}/odd_bin'], 'not a file of uint16 token ids (5001'),
    ('train: re-prepared longer train.bin', [*TRAIN, '--data_dir={tmp}/longer_bin'], 'is not the file'),
    ('train: damaged meta.json', [*TRAIN, '--data_dir={tmp}/damaged_meta'], 'cannot read'),
    ('train: meta.json without vocab_size', [*TRAIN, '--data_dir={tmp}/no_vocab_meta'], 'lacks vocab_size'),
    ('train: meta.json that is a number', [*TRAIN, '--data_dir={tmp}/number_meta'], 'holds no JSON object'),
    ('train: meta.json with a text vocab_size', [*TRAIN, '--data_dir={tmp}/text_vocab_meta'],
     'has vocab_size, sha256 of the wrong type'),
    ('train: an embedding lr beside a zero lr', [*TRAIN, '--learning_rate=0', '--embedding_lr=1e-3'],
     'learning_rate must be > 0 with embedding_lr'),
    ('train: token ids above vocab_size', [*TRAIN, '--data_dir={tmp}/big_ids'], 'not below vocab_size 600'),
    ('train: scratch over another run', [*TRAIN, '--out_dir={tmp}/good'], "holds another run's checkpoint"),
    ('train: resume on other data', [*TRAIN, '--init_from=resume', '--out_dir={tmp}/good', '--data_dir={tmp}/other_data'],
     'was trained on other data'),
    ('train: resume with another n_layer', [*TRAIN, '--init_from=resume', '--out_dir={tmp}/good', '--n_layer=2'],
     'has n_layer=1, but n_layer=2 was asked for'),
    ('train: resume a masked LM as a GPT', [*TRAIN, '--init_from=resume', '--out_dir={tmp}/mlm'],
     "has objective='mlm', but objective='clm' was asked for; resume with --objective=mlm"),
    ('train: resume with float16', [*TRAIN, '--init_from=resume', '--out_dir={tmp}/good', '--dtype=float16'],
     'was trained without the float16 gradient scaler; resume with another dtype than float16'),
    ('train: resume with another weight decay', [*TRAIN, '--init_from=resume', '--out_dir={tmp}/good',
                                                 '--weight_decay=0.5'], 'was trained with weight_decay=0.1; resume with '
                                                                        '--weight_decay=0.1'),
    ('train: resume with a shorter context', [*TRAIN, '--init_from=resume', '--out_dir={tmp}/good', '--block_size=8'],
     'was trained with block_size=16; resume with --block_size=16'),
    ('train: resume with another optimizer', [*TRAIN, '--init_from=resume', '--out_dir={tmp}/good',
                                              '--optimizer=muon'], "holds the state of optimizer='adamw'"),
    ('train: checkpoint without a key', [*TRAIN, '--init_from=resume', '--out_dir={tmp}/no_key'], 'lacks ranks'),
    ('train: rank state of an older train.py', [*TRAIN, '--init_from=resume', '--out_dir={tmp}/old_ranks'],
     'lacks ranks[0].targets_drawn'),
    ('train: checkpoint with a wrong type', [*TRAIN, '--init_from=resume', '--out_dir={tmp}/wrong_type'],
     'the file is damaged: delete it, or train again'),
    ('train: gpt2 with rope', [*TRAIN, '--init_from=gpt2', '--pos_emb=rope'], "GPT-2 has pos_emb='learned': drop --pos_emb to fine-tune"),
    ('train: gpt2 as a masked LM', [*TRAIN, '--init_from=gpt2', '--objective=mlm'], "init_from must be 'scratch' for objective='mlm'"),
    ('prepare: interleaved 0.4', ['prepare.py', '--source={tmp}/book.txt', '--data_dir={tmp}/new', '--split=interleaved',
                                  '--val_fraction=0.4'], 'val_fraction must be 1/k'),
    ('prepare: chunk_tokens 0', ['prepare.py', '--source={tmp}/book.txt', '--data_dir={tmp}/new', '--split=interleaved',
                                 '--chunk_tokens=0'], 'chunk_tokens must be >= 1'),
    ('prepare: chunks longer than the text', ['prepare.py', '--source={tmp}/book.txt', '--data_dir={tmp}/new',
                                              '--split=interleaved', '--chunk_tokens=100000'], 'lower --chunk_tokens'),
    ('prepare: data_dir under a file', ['prepare.py', '--source={tmp}/book.txt', '--data_dir={tmp}/page.html/data'],
     'cannot write to data_dir'),
    ('sample: masked LM', ['sample.py', '--out_dir={tmp}/mlm'], 'is a masked LM'),
    ('sample: prompt not UTF-8', ['sample.py', '--out_dir={tmp}/good', '--start=FILE:{tmp}/latin1.txt'], 'not UTF-8'),
    ('analyze: report_dir under a file', ['analyze.py', '--out_dir={tmp}/good', '--report_dir={tmp}/page.html/r'],
     'cannot write to report_dir'),
    ('analyze: snapshots of two runs', ['analyze.py', '--out_dir={tmp}/mixed', '--report_dir={tmp}/report'],
     'snapshots of two runs'),
    ('train: unknown device', [*TRAIN, '--device=tpu'], "unknown device 'tpu'; use auto, cpu, cuda or cuda:N"),
    ('train: unknown dtype', [*TRAIN, '--dtype=float8'], "dtype must be one of 'auto', 'float32', 'bfloat16', 'float16', not 'float8'"),
    ('train: CUDA absent', [*TRAIN, '--device=cuda'], 'CUDA is not available'),
    ('train: resume without checkpoint', [*TRAIN, '--init_from=resume'], 'train with --init_from=scratch first'),
    ('train: truncated checkpoint', [*TRAIN, '--init_from=resume', '--out_dir={tmp}/bad'],
     'the file is damaged: delete it, or train again'),
    ('train: vocab differs from meta.json', [*TRAIN, '--data_dir={tmp}/other_vocab', '--init_from=resume',
                                             '--out_dir={tmp}/good'], 'meta.json (1000); prepare this data with the '
                                                                      "model's tokenizer"),
    ('train: unknown pos_emb', [*TRAIN, '--pos_emb=relative'], 'pos_emb must be one of'),
    ('sample: no checkpoint', ['sample.py', '--out_dir={tmp}/nowhere'], 'run python train.py first'),
    ('sample: unknown model', ['sample.py', '--init_from=gpt5'], "unknown model 'gpt5'; use resume, scratch, gpt2"),
    ('sample: negative temperature', ['sample.py', '--out_dir={tmp}/good', '--temperature=-1'],
     'temperature must be >= 0 (0 is greedy), not -1.0'),
    ('sample: top_p above 1', ['sample.py', '--out_dir={tmp}/good', '--top_p=1.5'], 'top_p must be in (0, 1]'),
    ('sample: top_p zero', ['sample.py', '--out_dir={tmp}/good', '--top_p=0.0'], 'top_p must be in (0, 1]'),
    ('sample: top_p None', ['sample.py', '--out_dir={tmp}/good', '--top_p=None'], 'top_p must be in (0, 1] (1: off), not None'),
    ('sample: temperature None', ['sample.py', '--out_dir={tmp}/good', '--temperature=None'],
     'temperature must be >= 0 (0 is greedy), not None'),
    ('sample: seed past 64 bits', ['sample.py', '--out_dir={tmp}/good', '--seed=18446744073709551616'],
     'seed must be an integer in [0, 2**63)'),
    ('sample: prompt past the vocabulary', ['sample.py', '--out_dir={tmp}/small_vocab', '--start=Gulliver'],
     "the prompt has GPT-2 tokens (ids up to 1428) past the model's vocabulary of 1000"),
    ('sample: more than the GPT-2 vocabulary', ['sample.py', '--out_dir={tmp}/big_vocab'],
     "the model has a vocabulary of 50304 tokens, more than the GPT-2 tokenizer's 50257"),
    ('prepare: source unreadable', ['prepare.py', '--source=/proc/self/mem', '--data_dir={tmp}/data2'],
     'cannot read /proc/self/mem (Input/output error); pass a --source you can read'),
    ('train: infinite budget', [*TRAIN, '--max_seconds=1e999'], 'max_seconds must be None or > 0, not inf'),
    ('prepare: val_fraction None', ['prepare.py', '--source={tmp}/book.txt', '--data_dir={tmp}/data2',
                                    '--val_fraction=None'], 'val_fraction must be in (0, 0.5), not None'),
    ('embeddings: negative seed', ['embeddings.py', '--seed=-2'], 'seed must be an integer in [0, 2**63)'),
    ('sample: truncated checkpoint', ['sample.py', '--out_dir={tmp}/bad'], 'the file is damaged: delete it, or train again'),
    ('sample: prompt file missing', ['sample.py', '--out_dir={tmp}/good', '--start=FILE:{tmp}/nope.txt'],
     'cannot read the prompt file'),
    ('analyze: missing matrix', ['analyze.py', '--wpe_file={tmp}/nope.npy', '--report_dir={tmp}/report'],
     '--wpe_file: no such file'),
    ('analyze: wrongly shaped matrix', ['analyze.py', '--wpe_file={tmp}/vector.npy', '--report_dir={tmp}/report'],
     'expected a matrix (rows, d), got shape (64,)'),
    ('analyze: NaN matrix', ['analyze.py', '--wpe_file={tmp}/nan.npy', '--report_dir={tmp}/report'],
     'NaN or infinite entries; save a matrix of finite numbers'),
    ('analyze: data_dir not a path', ['analyze.py', '--data_dir=2024', '--report_dir={tmp}/report'],
     'data_dir must be None or a path, not 2024'),
    ('bench: unknown device', ['bench.py', '--device=tpu'], "unknown device 'tpu'; use auto, cpu, cuda or cuda:N"),
]


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('cli')
    make_files(tmp)
    return tmp


@pytest.mark.parametrize('name, command, message', CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_actionable_line(workspace, http_server, name, command, message):
    url, routes, _ = http_server
    routes['/missing.txt'] = lambda r: send(r, 404, b'not found')
    args = [a.format(tmp=workspace, url=url) for a in command]
    before = tree(workspace)
    result = run_in_process(*args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert 'Traceback' not in result.stderr and message in lines[0], lines[0]
    assert tree(workspace) == before  # nothing created, nothing damaged


@pytest.mark.parametrize('name', ['unknown setting', 'train: no data'])
def test_a_subprocess_fails_the_same_way(workspace, name):
    [command] = [c[1] for c in CASES if c[0] == name]
    args = [a.format(tmp=workspace) for a in command]
    real, here = run_script(*args), run_in_process(*args)
    assert (real.returncode, real.stderr) == (here.returncode, here.stderr)


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    # meta.json is a FIFO: train.py waits in start-up, reading it, until the test lets it go on
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT
    tokens = np.arange(3000, dtype=np.uint16)
    write_token_data(tmp_path, tokens[:2500], tokens[2500:])
    os.remove(tmp_path / 'meta.json')
    os.mkfifo(tmp_path / 'meta.json')
    process = subprocess.Popen([sys.executable, 'train.py', f'--data_dir={tmp_path}', f'--out_dir={tmp_path / "out"}'],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while True:  # a writer can open the FIFO only once train.py has opened it to read
        try:
            writer = os.open(tmp_path / 'meta.json', os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
    process.send_signal(signal.SIGINT)  # train.py is now blocked reading meta.json
    out, err = process.communicate(timeout=60)
    os.close(writer)
    assert process.returncode == 1 and err == 'error: interrupted during start-up; nothing was saved\n', err
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('error', [IndexError('pop from empty list'), AttributeError("'NoneType' has no attribute"),
                                   struct.error('unpack requires a buffer of 8 bytes'), MemoryError(),
                                   RuntimeError('PytorchStreamReader failed'), EOFError()])
def test_any_failure_to_unpickle_a_checkpoint_is_one_line_in_every_reader(workspace, monkeypatch, error):
    def load(*args, **kwargs):
        raise error
    monkeypatch.setattr(torch, 'load', load)
    for args in (['train.py', f'--data_dir={workspace}/data', f'--out_dir={workspace}/good', '--init_from=resume',
                  '--block_size=16'],
                 ['sample.py', f'--out_dir={workspace}/good'], ['analyze.py', f'--out_dir={workspace}/good']):
        result = run_in_process(*args)
        assert result.returncode == 1 and result.stderr.count('\n') == 1, result.stderr
        assert f'({type(error).__name__}); the file is damaged' in result.stderr


def test_random_and_truncated_bytes_are_a_damaged_checkpoint(workspace, tmp_path):
    from gulliver.checkpoint import load_checkpoint
    good = (workspace / 'good' / 'ckpt.pt').read_bytes()
    rng = np.random.default_rng(0)
    contents = [rng.bytes(5000) for _ in range(40)] + [good[:n] for n in rng.integers(0, len(good), 40)]
    contents += [good[:30] + rng.bytes(len(good) - 30)]  # a zip header, then noise
    for content in contents:
        (tmp_path / 'best.pt').write_bytes(content)
        with pytest.raises(ValueError, match='the file is damaged'), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            load_checkpoint(tmp_path / 'best.pt')
        assert not caught  # nothing but the one line: the unpickler's complaints about the bytes are dropped


@pytest.mark.parametrize('damage', ['a changed byte', 'no file'])
def test_a_damaged_tokenizer_file_is_one_line(book_path, tmp_path, damage):
    # a copy of the project whose vendored GPT-2 ranks are damaged or gone: tokenizing says so, in one line
    from conftest import ROOT
    os.symlink(os.path.join(ROOT, 'gulliver'), tmp_path / 'gulliver')
    shutil.copy(os.path.join(ROOT, 'prepare.py'), tmp_path)  # a copy: Python finds a linked script's own folder
    (tmp_path / 'assets').mkdir()
    ranks = open(os.path.join(ROOT, 'assets', 'gpt2.tiktoken'), 'rb').read()
    if damage == 'a changed byte':
        (tmp_path / 'assets' / 'gpt2.tiktoken').write_bytes(ranks[:1000] + b'A' + ranks[1001:])
    result = run_script('prepare.py', f'--source={book_path}', f'--data_dir={tmp_path / "data"}', cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count('\n') == 1, result.stderr
    assert f"{tmp_path / 'assets' / 'gpt2.tiktoken'}" in result.stderr and 'git checkout -- assets' in result.stderr
    assert not (tmp_path / 'data' / 'train.bin').exists()


def test_sample_refuses_a_checkpoint_with_non_finite_weights(workspace, tmp_path):
    checkpoint = torch.load(workspace / 'good' / 'ckpt.pt', weights_only=True)
    checkpoint['model']['transformer.h.0.mlp.c_fc.weight'][0, :2] = torch.tensor([float('inf'), float('nan')])
    (tmp_path / 'out').mkdir()
    torch.save(checkpoint, tmp_path / 'out' / 'ckpt.pt')
    result = run_in_process('sample.py', f'--out_dir={tmp_path / "out"}', '--max_new_tokens=3')
    assert result.returncode == 1 and result.stderr.count('\n') == 1, result.stderr
    assert f"{tmp_path / 'out' / 'ckpt.pt'}: the model holds 2 NaN or infinite weights" in result.stderr
    assert result.stdout == ''  # no text sampled from it
