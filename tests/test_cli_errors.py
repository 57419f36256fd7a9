"""Bad input, as a user would make it: every case exits non-zero with exactly one line on
stderr that says what to do, no traceback, and no file created or changed. The cases run in
this process (run_in_process); a few run as real subprocesses too, to show that the two agree."""
import hashlib
import json
import os

import numpy as np
import pytest

from conftest import run_in_process, run_script, send


def tree(folder):
    """{relative path: sha256} of every file under folder."""
    found = {}
    for parent, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(parent, name)
            with open(path, 'rb') as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


def make_files(tmp):
    """A small prepared data_dir, a good checkpoint, a truncated one, and assorted bad inputs."""
    data = tmp / 'data'
    data.mkdir()
    tokens = np.random.default_rng(0).integers(0, 1000, 3000).astype(np.uint16)
    tokens[:2500].tofile(data / 'train.bin')
    tokens[2500:].tofile(data / 'val.bin')
    meta = {'vocab_size': 50257, 'train_tokens': 2500, 'val_tokens': 500, 'train_bytes': 12_000, 'val_bytes': 2400}
    (data / 'meta.json').write_text(json.dumps(meta))
    other_vocab = tmp / 'other_vocab'
    other_vocab.mkdir()
    for name in ('train.bin', 'val.bin'):
        (other_vocab / name).write_bytes((data / name).read_bytes())
    (other_vocab / 'meta.json').write_text(json.dumps({**meta, 'vocab_size': 1000}))
    old_meta = tmp / 'old_meta'  # as an earlier prepare.py wrote it: no byte counts
    old_meta.mkdir()
    for name in ('train.bin', 'val.bin'):
        (old_meta / name).write_bytes((data / name).read_bytes())
    (old_meta / 'meta.json').write_text(json.dumps({'vocab_size': 50257}))
    result = run_script('train.py', f'--data_dir={data}', f'--out_dir={tmp / "good"}', '--n_layer=1', '--n_head=1',
                        '--n_embd=16', '--block_size=16', '--batch_size=2', '--max_iters=2', '--eval_iters=1',
                        '--sample_tokens=0')
    assert result.returncode == 0, result.stderr
    (tmp / 'bad').mkdir()
    ckpt = (tmp / 'good' / 'ckpt.pt').read_bytes()
    (tmp / 'bad' / 'ckpt.pt').write_bytes(ckpt[:len(ckpt) // 2])
    (tmp / 'page.html').write_text('<!DOCTYPE html>\n<html><body>Gulliver</body></html>\n' * 100)
    (tmp / 'empty.txt').write_text('')
    (tmp / 'binary.txt').write_bytes(bytes(range(256)) * 100)
    (tmp / 'syntax.py').write_text('batch_size = (8\n')
    np.save(tmp / 'vector.npy', np.ones(64, dtype=np.float32))
    np.save(tmp / 'nan.npy', np.full((16, 8), np.nan, dtype=np.float32))


TRAIN = ['train.py', '--data_dir={tmp}/data', '--out_dir={tmp}/out', '--n_layer=1', '--n_head=1', '--n_embd=16',
         '--block_size=16', '--batch_size=2', '--max_iters=1']
CASES = [
    # (name, command, what the one line must say)
    ('unknown setting', ['prepare.py', '--no_such_key=1'], "unknown setting 'no_such_key'"),
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
    ('train: batch_size 0', [*TRAIN, '--batch_size=0'], 'batch_size must be a positive integer'),
    ('train: negative learning rate', [*TRAIN, '--learning_rate=-1e-3'], 'must be >= 0'),
    ('train: negative budget', [*TRAIN, '--max_seconds=-60'], 'max_seconds must be >= 0'),
    ('train: meta.json without byte counts', [*TRAIN, '--data_dir={tmp}/old_meta'], 'run python prepare.py again'),
    ('train: unknown device', [*TRAIN, '--device=tpu'], "unknown device 'tpu'"),
    ('train: unknown dtype', [*TRAIN, '--dtype=float8'], "unknown dtype 'float8'"),
    ('train: CUDA absent', [*TRAIN, '--device=cuda'], 'CUDA is not available'),
    ('train: resume without checkpoint', [*TRAIN, '--init_from=resume'], 'no checkpoint'),
    ('train: truncated checkpoint', [*TRAIN, '--init_from=resume', '--out_dir={tmp}/bad'], 'damaged'),
    ('train: vocab differs from meta.json', [*TRAIN, '--data_dir={tmp}/other_vocab', '--init_from=resume',
                                             '--out_dir={tmp}/good'], 'vocab_size'),
    ('train: unknown pos_emb', [*TRAIN, '--pos_emb=relative'], 'pos_emb must be one of'),
    ('sample: no checkpoint', ['sample.py', '--out_dir={tmp}/nowhere'], 'run python train.py first'),
    ('sample: unknown model', ['sample.py', '--init_from=gpt5'], "unknown model 'gpt5'"),
    ('sample: negative temperature', ['sample.py', '--out_dir={tmp}/good', '--temperature=-1'], 'temperature'),
    ('sample: top_p above 1', ['sample.py', '--out_dir={tmp}/good', '--top_p=1.5'], 'top_p must be in (0, 1]'),
    ('sample: top_p zero', ['sample.py', '--out_dir={tmp}/good', '--top_p=0.0'], 'top_p must be in (0, 1]'),
    ('sample: truncated checkpoint', ['sample.py', '--out_dir={tmp}/bad'], 'damaged'),
    ('sample: prompt file missing', ['sample.py', '--out_dir={tmp}/good', '--start=FILE:{tmp}/nope.txt'],
     'cannot read the prompt file'),
    ('analyze: missing matrix', ['analyze.py', '--wpe_file={tmp}/nope.npy', '--report_dir={tmp}/report'], 'nope.npy'),
    ('analyze: wrongly shaped matrix', ['analyze.py', '--wpe_file={tmp}/vector.npy', '--report_dir={tmp}/report'],
     'shape'),
    ('analyze: NaN matrix', ['analyze.py', '--wpe_file={tmp}/nan.npy', '--report_dir={tmp}/report'], 'NaN'),
    ('bench: unknown device', ['bench.py', '--device=tpu'], "unknown device 'tpu'"),
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


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize('name', ['unknown setting', 'train: no data', 'sample: unknown model'])
def test_a_subprocess_fails_the_same_way(workspace, name):
    [command] = [c[1] for c in CASES if c[0] == name]
    args = [a.format(tmp=workspace) for a in command]
    real, here = run_script(*args), run_in_process(*args)
    assert (real.returncode, real.stderr) == (here.returncode, here.stderr)
