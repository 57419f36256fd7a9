import ast
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import ROOT, run_in_process, write_token_data
from gulliver.configurator import configure
from gulliver.checkpoint import load_checkpoint, rank_state, restore_rank_state
from gulliver.data import (MASK_TOKEN, Sampler, epoch_offsets, eval_batches, every_window, mask_tokens,
                           random_offsets, split_batch, target_positions, windows)
from gulliver.runlog import start_log
from gulliver.schedule import learning_rate_at
from gulliver.tokenizer import get_tokenizer

# fp32 so that every CPU runs the same arithmetic; the budget test leaves dtype at 'auto'
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=8', '--eval_iters=2',
        '--learning_rate=3e-3', '--warmup_iters=5', '--sample_tokens=8', '--peak_flops=1e12', '--dtype=float32']


def events(out_dir, kind=None):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if kind is None or r['event'] == kind]


@pytest.fixture(scope='module')
def small_data(tmp_path_factory):
    """A data_dir with 6,000 train and 1,000 val tokens (a repeating pattern) of a 512-token
    vocabulary (GPT-2's first 512 ids), enough for tiny runs."""
    folder = tmp_path_factory.mktemp('small')
    pattern = np.random.default_rng(0).integers(0, 500, 50)
    write_token_data(folder, np.resize(pattern, 6000), np.resize(pattern, 1000), vocab_size=512)
    return str(folder)


def test_windows_shift_and_bounds():
    tokens = np.arange(1000, dtype=np.uint16)
    rng = np.random.default_rng(0)
    offsets = np.concatenate([random_offsets(rng, len(tokens), 16, 64) for _ in range(200)])
    assert offsets.min() == 0 and offsets.max() == 1000 - 16 - 1
    x, y = windows(tokens, offsets[:64], 16)
    assert x.shape == y.shape == (64, 16) and x.dtype == y.dtype == np.int64
    assert np.array_equal(y, x + 1) and np.array_equal(x[:, 0], offsets[:64])


@pytest.mark.parametrize('n, batch_size', [(1000, 8), (1000, 5), (1024 + 1, 4), (700, 8)])
def test_an_evaluation_over_the_whole_split_scores_every_target_once(n, batch_size):
    # the ids are their own positions: a target y at row r, column t is the token at y's position
    tokens = np.arange(n, dtype=np.int64)
    scored = np.zeros(n, dtype=int)
    for x, y in eval_batches(tokens, True, None, batch_size, 32, 'clm', None, n):
        assert x.shape == y.shape == (batch_size, 32)  # one shape: a compiled model compiles it once
        kept = y >= 0
        assert np.array_equal(y[kept], (x + 1)[kept])  # each target is the token after its input
        np.add.at(scored, y[kept], 1)
    assert scored[0] == 0 and (scored[1:] == 1).all()  # the first token has nothing before it


def test_the_causal_sampler_covers_the_tokens_it_predicts():
    # a window at offset i reads tokens i .. i+T-1 and predicts i+1 .. i+T: those are covered, i is not
    sampler = Sampler(np.arange(1000, dtype=np.uint16), 16, 4, 'random', 'clm', vocab_size=1000, seed=0)
    x, y = sampler.next_batch()
    predicted = np.unique(y)
    assert np.array_equal(np.flatnonzero(sampler.covered), predicted) and sampler.targets_drawn == y.size
    assert not np.isin(x[:, 0], predicted).any()  # the windows' first tokens, read but not predicted


def test_every_window_predicts_each_token_once():
    for n, T in [(14369, 128), (1000, 32), (129, 128), (257, 128), (300, 128)]:
        offsets, overlap = every_window(n, T)
        predicted = np.concatenate([np.arange(i + 1, i + 1 + T) for i in offsets])
        assert offsets.max() + T == n - 1  # the last window ends at the split's last token
        assert overlap == len(predicted) - len(set(predicted.tolist()))  # overlap: the repeats, all in the last window
        assert np.array_equal(np.sort(np.concatenate([predicted[:-T], predicted[-T + overlap:]])), np.arange(1, n))


def test_epoch_sampler_uses_every_window_once_per_epoch():
    rng, state = np.random.default_rng(0), {'order': np.zeros(0, dtype=np.int64), 'pos': 0}
    n, T, B = 1000, 16, 4  # 62 windows: 15 batches per epoch, 2 windows left out of each
    for epoch in range(3):
        seen = np.concatenate([epoch_offsets(state, rng, n, T, B) for _ in range(15)])
        assert len(set(seen.tolist())) == 60 and set(seen.tolist()) <= set(range(0, n - T, T))
    assert (epoch_offsets(state, rng, n, T, B) % T == 0).all()


def test_epoch_sampler_deals_each_window_to_one_rank():
    # two ranks with the same seed: each holds the same shuffle and takes its share of every batch
    n, T, B = 1000, 16, 3  # 62 windows: 10 steps of 2 ranks x 3 per epoch, 2 windows left out of each
    ranks = [({'order': np.zeros(0, dtype=np.int64), 'pos': 0}, np.random.default_rng(7)) for _ in range(2)]
    one = ({'order': np.zeros(0, dtype=np.int64), 'pos': 0}, np.random.default_rng(7))  # the global batch, alone
    for epoch in range(3):
        seen = []
        for step in range(10):
            mine, theirs = (epoch_offsets(state, rng, n, T, B, rank, 2) for rank, (state, rng) in enumerate(ranks))
            assert len(mine) == len(theirs) == B and not set(mine.tolist()) & set(theirs.tolist())
            assert set(mine.tolist()) | set(theirs.tolist()) == set(epoch_offsets(*one, n, T, 2 * B).tolist())
            seen += mine.tolist() + theirs.tolist()
        assert len(seen) == len(set(seen)) == 60 and set(seen) <= set(range(0, n - T, T))


@pytest.mark.parametrize('sampler, objective', [('random', 'clm'), ('epoch', 'clm'), ('random', 'mlm')])
def test_a_restored_sampler_continues_the_same_stream(tmp_path, sampler, objective):
    # through a checkpoint's rank state on disk, as a resumed rank reads it. The epoch sampler deals 7
    # batches of 8 of its 62 windows an epoch: it stops 2 batches into its second epoch (two shuffles
    # drawn), and continues into its third; the fresh sampler it is restored into has shuffled once
    tokens = np.arange(1000, dtype=np.uint16)
    make = lambda: Sampler(tokens, 16, 8, sampler, objective, vocab_size=1000, seed=3)
    straight, stopped = make(), make()
    expected = [straight.next_batch() for _ in range(20)]
    for _ in range(9):
        stopped.next_batch()
    torch.save(rank_state(stopped, cuda=False), tmp_path / 'rank.pt')
    resumed = make()
    resumed.next_batch()  # a fresh sampler that has drawn, so that nothing survives from before the restore
    restore_rank_state(torch.load(tmp_path / 'rank.pt', weights_only=True), resumed, cuda=False)
    for x, y in expected[9:]:
        assert all(np.array_equal(a, b) for a, b in zip(resumed.next_batch(), (x, y)))
    assert resumed.targets_drawn == straight.targets_drawn > 0


def train_settings():
    """train.py's settings and their defaults, read from its source."""
    settings = {}
    for node in ast.parse(open(os.path.join(ROOT, 'train.py')).read()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                settings[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return settings


@pytest.mark.parametrize('config', ['gulliver.py', 'gulliver_cpu.py', 'gulliver_mlm_cpu.py', 'finetune_gulliver.py'])
def test_every_config_splits_its_global_batch_over_1_2_4_8_processes(config, monkeypatch):
    monkeypatch.chdir(ROOT)  # the masked-LM config reads the CPU config by a relative path
    settings = train_settings()
    configure(settings, [f'config/{config}'])
    batch, steps = settings['batch_size'], settings['gradient_accumulation_steps']
    for world_size in (1, 2, 4, 8):
        micro_batch, micro_steps = split_batch(batch, steps, world_size)
        assert micro_batch * micro_steps * world_size == batch * steps and micro_batch <= batch
    assert split_batch(batch, steps, 1) == (batch, steps)  # one process: the config as written


def test_split_batch_arithmetic():
    assert split_batch(32, 1, 8) == (4, 1)    # GPT-2 small on 8 GPUs: 4 sequences each
    assert split_batch(8, 4, 2) == (8, 2)     # accumulation steps shared out first
    assert split_batch(12, 1, 1) == (12, 1)
    assert split_batch(8, 3, 2) == (6, 2)     # 12 each: two micro-batches of 6, not 8 + 4
    assert split_batch(4, 7, 7) == (4, 1)
    with pytest.raises(ValueError, match='the global batch of 8 sequences .* does not split over 16 processes'):
        split_batch(8, 1, 16)
    with pytest.raises(ValueError, match='over 3 processes'):
        split_batch(8, 1, 3)


def test_random_offsets_coverage_follows_the_formula():
    n, T, B = 20_000, 64, 8
    rng, covered, drawn = np.random.default_rng(1), np.zeros(n, dtype=bool), 0
    for _ in range(40):
        offsets = random_offsets(rng, n, T, B)
        covered[(offsets[:, None] + 1 + np.arange(T)).ravel()] = True
        drawn += B * T
    assert abs(covered.mean() - (1 - math.exp(-drawn / n))) < 0.03


def test_mask_tokens_follows_bert():
    x = np.random.default_rng(0).integers(0, 50000, (200, 500))
    inputs, targets = mask_tokens(x, np.random.default_rng(1), 50257)
    chosen = targets != -1
    assert abs(chosen.mean() - 0.15) < 0.005 and np.array_equal(targets[chosen], x[chosen])
    assert np.array_equal(inputs[~chosen], x[~chosen])
    assert abs((inputs[chosen] == MASK_TOKEN).mean() - 0.8) < 0.01
    assert abs((inputs[chosen] == x[chosen]).mean() - 0.1) < 0.01
    # the other 10%: a token drawn for each position, uniform over the vocabulary (~1,500 draws of 50,257
    # ids: ~22 repeats expected); not one token for them all
    drawn = inputs[chosen][(inputs[chosen] != MASK_TOKEN) & (inputs[chosen] != x[chosen])]
    assert abs(len(drawn) / chosen.sum() - 0.1) < 0.01
    assert len(np.unique(drawn)) > 0.95 * len(drawn) and abs(drawn.mean() / 50257 - 0.5) < 0.05
    # rows of 4 tokens: 52% would have no target (0.85^4), a 0/0 loss; each gets one instead
    short = x[:, :4]
    _, targets = mask_tokens(short, np.random.default_rng(1), 50257)
    assert (targets != -1).any(axis=1).all() and 1.05 < (targets != -1).sum(1).mean() < 1.25


def test_loss_falls_on_the_book_and_writes_outputs(book_data, tmp_path):
    out = tmp_path / 'out'
    result = run_in_process('train.py', *TINY, f'--data_dir={book_data}', f'--out_dir={out}', '--max_iters=60',
                        '--eval_interval=30', '--log_interval=10', '--snapshot_interval=30', '--whole_val=False')
    assert result.returncode == 0, result.stderr
    evals = events(out, 'eval')
    assert [e['iter'] for e in evals] == [0, 30, 60]
    assert evals[0]['val_loss'] > 10.5 and evals[-1]['val_loss'] < evals[0]['val_loss'] - 2.5
    assert 'ETA' in result.stdout and 'tokens/s' in result.stdout and 'MFU' in result.stdout
    assert [s['iter'] for s in events(out, 'sample')] == [0, 60]
    # coverage: the run's random offsets replayed (seed 1337, rank 0), and 1 - exp(-drawn / n)
    train = np.fromfile(os.path.join(book_data, 'train.bin'), dtype=np.uint16)
    rng, covered = np.random.default_rng(1337), np.zeros(len(train), dtype=bool)
    for step in range(1, 61):
        offsets = random_offsets(rng, len(train), 32, 8)
        covered[(offsets[:, None] + 1 + np.arange(32)).ravel()] = True  # window i predicts tokens i+1 .. i+32
        if step % 30 == 0:
            [e] = [e for e in evals if e['iter'] == step]
            assert e['coverage'] == pytest.approx(covered.mean(), rel=1e-12)
            assert e['coverage_predicted'] == pytest.approx(1 - math.exp(-step * 8 * 32 / len(train)), rel=1e-12)
    assert np.array_equal(load_checkpoint(out / 'ckpt.pt')[1]['coverage']['covered'].numpy(), covered)
    snaps = sorted(os.listdir(out / 'snapshots'))
    assert snaps == ['iter_000000.npz', 'iter_000030.npz', 'iter_000060.npz']
    snap = np.load(out / 'snapshots' / snaps[-1])
    assert snap['W_E'].shape == (50257, 32) and snap['W_E'].dtype == np.float16 and snap['W_pos'].shape == (32, 32)
    model, ckpt = load_checkpoint(out / 'ckpt.pt')
    assert ckpt['iter_num'] == 60 and not any(k.startswith(('_orig_mod.', 'module.')) for k in ckpt['model'])
    assert np.array_equal(snap['W_E'], model.W_E.detach().half().numpy())
    assert os.path.getsize(out / 'loss.png') > 10_000


def test_val_loss_reads_every_val_token_once(small_data, tmp_path):
    result = run_in_process('train.py', *TINY, f'--data_dir={small_data}', f'--out_dir={tmp_path}', '--max_iters=3',
                            '--eval_interval=3', '--sample_tokens=0')
    assert result.returncode == 0, result.stderr
    model = load_checkpoint(tmp_path / 'ckpt.pt')[0].eval()
    # every val token but the first, predicted once, from the start of its window of 32
    val = torch.from_numpy(np.fromfile(os.path.join(small_data, 'val.bin'), dtype=np.uint16).astype(np.int64))
    starts = range(0, len(val) - 32, 32)
    with torch.no_grad():
        x, y = torch.stack([val[s:s + 32] for s in starts]), torch.stack([val[s + 1:s + 33] for s in starts])
        nats = F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten(), reduction='none')
        rest = (len(val) - 1) % 32  # 999 = 31 x 32 + 7: the last 7, read with the 25 tokens before them
        last = val[-33:]
        nats = torch.cat([nats, F.cross_entropy(model(last[None, :-1])[0][0], last[1:], reduction='none')[-rest:]])
    assert len(nats) == len(val) - 1 == 999
    assert events(tmp_path, 'eval')[-1]['val_loss'] == pytest.approx(nats.mean().item(), rel=1e-5)
    # with whole_val=False: eval_iters random batches, which predict other tokens
    result = run_in_process('train.py', *TINY, f'--data_dir={small_data}', f'--out_dir={tmp_path}', '--eval_only=True',
                            '--whole_val=False')
    assert result.returncode == 0, result.stderr
    assert events(tmp_path, 'eval')[-1]['val_loss'] != pytest.approx(nats.mean().item(), rel=1e-4)


def test_resume_is_bit_exact(small_data, tmp_path):
    # interrupted (Ctrl-C) and resumed with the very same settings, a budget that never binds included, on
    # the epoch sampler (187 windows of 32, 23 batches of 8 an epoch: the resumed run shuffles anew at 23).
    # SIGTERM goes through the same handler: the DDP test below sends it to one rank, on random offsets
    common = [*TINY, f'--data_dir={small_data}', '--dropout=0.1', '--log_interval=1', '--eval_interval=20',
              '--max_iters=40', '--max_seconds=3600', '--sample_tokens=0', '--sampler=epoch']
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    assert run_in_process('train.py', *common, f'--out_dir={straight}').returncode == 0
    process = subprocess.Popen([sys.executable, 'train.py', *common, f'--out_dir={split}'], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED='1'))
    wait_for_line(process, 'iter 5:')
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    stopped_at = int(re.search(r'stopping after iteration (\d+) \(SIGINT\)', out).group(1))
    assert process.returncode == 0 and 'Traceback' not in err, err
    assert out.index('saved') < out.index(f'step {stopped_at}:')  # saved first, then the final evaluation
    stopped = torch.load(split / 'ckpt.pt', weights_only=True)
    assert 5 <= stopped['iter_num'] < 40 and stopped['elapsed'] > 0
    # best.pt: the lowest val loss of the run's evaluations after its start, the stop's own included
    evals = [e for e in events(split, 'eval') if e['iter'] > 0]
    best = torch.load(split / 'best.pt', weights_only=True)
    assert evals[-1]['iter'] == stopped_at and best['best_iter'] == min(evals, key=lambda e: e['val_loss'])['iter']
    assert stopped['best_val_loss'] == best['best_val_loss']
    resumed = run_in_process('train.py', *common, f'--out_dir={split}', '--init_from=resume')
    assert resumed.returncode == 0, resumed.stderr
    losses = lambda d: [(e['iter'], e['loss']) for e in events(d, 'train')]
    assert losses(straight) == losses(split) and len(losses(split)) == 40
    # each iteration evaluated once: the resume does not repeat the evaluation its checkpoint followed
    val = lambda d: [(e['iter'], e['val_loss']) for e in events(d, 'eval')]
    assert [i for i, _ in val(split)] == sorted({0, 20, 40, stopped_at})
    assert [v for v in val(split) if v[0] != stopped_at or stopped_at in (20, 40)] == val(straight)
    a, b = torch.load(straight / 'ckpt.pt', weights_only=True), torch.load(split / 'ckpt.pt', weights_only=True)
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    # the training tokens drawn as targets: the coverage carries over the resume, logged and saved
    coverage = lambda d: [(e['iter'], e['coverage']) for e in events(d, 'eval') if e['iter'] in (20, 40)]
    assert coverage(split) == coverage(straight) and coverage(split)[-1][1] > 0.5
    assert torch.equal(a['coverage']['covered'], b['coverage']['covered'])
    assert b['elapsed'] > stopped['elapsed']  # the budget spent so far carries over


def test_wall_clock_budget_ends_the_run_at_min_lr(small_data, tmp_path):
    common = [*TINY[:-1], f'--data_dir={small_data}', '--max_iters=1000000', '--eval_interval=25', '--min_lr=1e-4',
              '--sample_tokens=0']  # dtype 'auto': the probe runs and says what it chose
    result = run_in_process('train.py', *common, f'--out_dir={tmp_path}', '--max_seconds=2')
    assert result.returncode == 0, result.stderr
    assert 'budget 2 s' in result.stdout and 'progress 0.' in result.stdout
    assert result.stdout.startswith('dtype auto: ') and ' ms in float32, ' in result.stdout
    evals = events(tmp_path, 'eval')
    assert evals[-1]['elapsed'] >= 2 and all(e['elapsed'] < 2 for e in evals[:-1])
    assert evals[-1]['lr'] == 1e-4 and all(e['lr'] > 1e-4 for e in evals[:-1])
    train = events(tmp_path, 'train')
    assert all(a['lr'] >= b['lr'] for a, b in zip(train[1:], train[2:]))  # log_interval 10 > warmup_iters 5
    first = load_checkpoint(tmp_path / 'ckpt.pt')[1]
    assert first['iter_num'] == evals[-1]['iter'] and first['elapsed'] >= 2
    # a doubled budget trains on from where the first stopped
    result = run_in_process('train.py', *common, f'--out_dir={tmp_path}', '--max_seconds=4', '--init_from=resume')
    assert result.returncode == 0, result.stderr
    second = load_checkpoint(tmp_path / 'ckpt.pt')[1]
    assert second['iter_num'] > first['iter_num'] and 4 <= second['elapsed'] < first['elapsed'] + 30


def test_val_bpb_is_the_loss_in_bits_per_byte_of_the_val_text(tmp_path):
    text = 'Gulliver’s hat, the Emperor’s palace — “Lilliput”, naïve 1726.\n' * 120
    (tmp_path / 'book.txt').write_text(text, encoding='utf-8')
    data, out = tmp_path / 'data', tmp_path / 'out'
    assert run_in_process('prepare.py', f'--source={tmp_path / "book.txt"}', f'--data_dir={data}').returncode == 0
    meta = json.loads((data / 'meta.json').read_text())
    val_ids = np.fromfile(data / 'val.bin', dtype=np.uint16).tolist()
    assert text.encode('utf-8')[-meta['val_bytes']:] == get_tokenizer().decode_bytes(val_ids)
    assert meta['train_bytes'] + meta['val_bytes'] == len(text.encode('utf-8'))
    result = run_in_process('train.py', *TINY, '--block_size=16', f'--data_dir={data}', f'--out_dir={out}',
                        '--max_iters=2', '--eval_interval=1')
    assert result.returncode == 0, result.stderr
    for e in events(out, 'eval'):
        assert e['val_bpb'] == pytest.approx(e['val_loss'] * meta['val_tokens'] / meta['val_bytes'] / math.log(2),
                                             rel=1e-12)
        assert f"val bpb {e['val_bpb']:.4f}" in result.stdout


def test_epoch_sampler_covers_every_window(small_data, tmp_path):
    # 6,000 tokens, block 32: 187 windows = 11 batches of 17, one epoch
    result = run_in_process('train.py', *TINY, f'--data_dir={small_data}', f'--out_dir={tmp_path}', '--sampler=epoch',
                        '--batch_size=17', '--max_iters=11', '--eval_interval=11', '--sample_tokens=0')
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['coverage']['covered'].sum().item() == 187 * 32 and ckpt['ranks'][0]['targets_drawn'] == 187 * 32
    assert sorted(ckpt['ranks'][0]['epoch_order'].tolist()) == list(range(0, 187 * 32, 32))


def test_masked_lm_objective(book_data, tmp_path):
    result = run_in_process('train.py', *TINY, f'--data_dir={book_data}', f'--out_dir={tmp_path}', '--objective=mlm',
                        '--max_iters=40', '--eval_interval=40', '--decay_lr=False', '--whole_val=False',
                            '--eval_iters=10')  # 10 x 8 x 32 tokens, 15% of them masked: about 380 targets per split
    assert result.returncode == 0, result.stderr
    evals = events(tmp_path, 'eval')
    assert evals[-1]['val_loss'] < evals[0]['val_loss'] - 2
    model, ckpt = load_checkpoint(tmp_path / 'ckpt.pt')
    assert model.config.causal is False and events(tmp_path, 'sample') == []
    # only the masked positions are targets: replay the run's batches and masks (seed 1337, rank 0)
    train = np.fromfile(os.path.join(book_data, 'train.bin'), dtype=np.uint16)
    rng, expected = np.random.default_rng(1337), np.zeros(len(train), dtype=bool)
    drawn = 0
    for _ in range(40):
        offsets = random_offsets(rng, len(train), 32, 8)
        x, y = mask_tokens(windows(train, offsets, 32)[0], rng, 50257)
        expected[target_positions(offsets, y, causal=False)] = True
        drawn += (y >= 0).sum()
    assert np.array_equal(ckpt['coverage']['covered'].numpy(), expected)
    assert ckpt['ranks'][0]['targets_drawn'] == drawn and 0.12 < drawn / (40 * 8 * 32) < 0.18
    assert evals[-1]['coverage'] == pytest.approx(expected.mean())


def test_target_positions_of_both_objectives():
    offsets = np.array([0, 10])
    next_tokens, masked = np.array([[5, 6, 7], [9, 8, 4]]), np.array([[5, 6, 7], [-1, 8, -1]])
    assert target_positions(offsets, next_tokens, causal=True).tolist() == [1, 2, 3, 11, 12, 13]
    assert target_positions(offsets, masked, causal=False).tolist() == [0, 1, 2, 11]


def start(command, *args, env=None):
    return subprocess.Popen([*command, 'train.py', *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED='1', **(env or {})))


def start_ranks(*args, world_size=2):
    """train.py on world_size gloo ranks of this machine, each started with the environment that
    torchrun --standalone gives its workers (the two-node test runs torchrun itself): one process per rank."""
    rendezvous = {'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(free_port()), 'WORLD_SIZE': str(world_size),
                  'LOCAL_WORLD_SIZE': str(world_size)}
    return [start([sys.executable], *args, env=dict(rendezvous, RANK=str(rank), LOCAL_RANK=str(rank)))
            for rank in range(world_size)]


def finish(*processes):
    """Every process's stdout, joined in order, once all have exited 0."""
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0, err[-3000:]
        outputs.append(out)
    return ''.join(outputs)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# two gloo ranks, each with its own sampler of random offsets, gather their states as train.py does at
# an evaluation, after each of 10 micro-batches; rank 0 saves the flags it holds after each and the states
GATHER_TEN_TIMES = """
import sys
import numpy as np, torch
from gulliver.checkpoint import gather_rank_states
from gulliver.data import Sampler
from gulliver.processes import end_processes, start_processes
_, rank, world_size, _, _ = start_processes('cpu', 'gloo')
sampler = Sampler(np.arange(1000, dtype=np.uint16), 16, 4, 'random', 'clm', 1000, seed=0, rank=rank, world_size=world_size)
flags = []
for evaluation in range(10):
    sampler.next_batch()
    states = gather_rank_states(sampler, cuda=False)
    flags.append(torch.from_numpy(sampler.covered.view(np.uint8).copy()))  # the bytes, not a bool's reading of them
if rank == 0:
    torch.save({'flags': flags, 'states': states}, sys.argv[1])
end_processes(None)
"""


def test_gathered_coverage_is_the_union_of_the_ranks_at_every_evaluation_and_states_come_in_rank_order(tmp_path):
    # the flags are all-reduced with max. A sum (all_reduce's default op) adds the ranks' flags at each
    # evaluation: a flag both hold doubles, 2, 4, ..., 128, until its byte wraps to 0 and the token counts
    # as never drawn (measured with a sum: 602 tokens covered after 8 evaluations, 591 after 9; the union: 609, 631)
    rendezvous = {'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(free_port()), 'WORLD_SIZE': '2'}
    ranks = [subprocess.Popen([sys.executable, '-c', GATHER_TEN_TIMES, str(tmp_path / 'gathered.pt')], cwd=ROOT,
                              env=dict(os.environ, **rendezvous, RANK=str(rank), LOCAL_RANK=str(rank)),
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    for process in ranks:
        err = process.communicate(timeout=120)[1]
        assert process.returncode == 0, err[-3000:]
    gathered = torch.load(tmp_path / 'gathered.pt', weights_only=True)
    # each rank's stream, replayed in this process
    replayed = [Sampler(np.arange(1000, dtype=np.uint16), 16, 4, 'random', 'clm', 1000, seed=0, rank=rank,
                        world_size=2) for rank in range(2)]
    for evaluation, flags in enumerate(gathered['flags']):
        for sampler in replayed:
            sampler.next_batch()
        union = replayed[0].covered | replayed[1].covered
        same = np.array_equal(flags.numpy(), union.astype(np.uint8))
        assert same, f"evaluation {evaluation + 1}: flags of values {np.unique(flags.numpy()).tolist()}, not the union's 0 and 1"
    for own, sampler in zip(gathered['states'], replayed, strict=True):
        assert own['sampler'] == sampler.state()['sampler'] and own['targets_drawn'] == 10 * 4 * 16


def test_two_nodes_one_epoch_and_their_accumulated_gradient_is_that_of_one_process(small_data, tmp_path):
    # The README's multi-node command, two "nodes" of one process on this machine: on the second,
    # RANK is 1 and LOCAL_RANK 0. 6,000 tokens, block 48: 124 windows, one epoch in one step of a
    # global batch of 124, dealt out 62 to each rank in two micro-batches of 31 (batch_size 31 x 4
    # accumulation steps), their gradients accumulated without a sync, then all-reduced on the second. The
    # single process draws the same windows (same seed) in one batch of 124: an accumulated loss not divided
    # by the micro-steps, or a gradient not all-reduced after the last, would not give its gradient
    node = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', '--nproc_per_node=1', '--rdzv-backend=c10d',
            f'--rdzv-endpoint=127.0.0.1:{free_port()}', '--rdzv-id=two-nodes']
    args = ['config/gulliver_cpu.py', *TINY, '--block_size=48', f'--data_dir={small_data}',
            '--sampler=epoch', '--max_iters=1', '--eval_interval=1', '--grad_clip=None', '--sample_tokens=0',
            '--optimizer=adamw']  # Adam's first moment after one step is the gradient: compared below
    nodes = [start(node, *args, '--batch_size=31', '--gradient_accumulation_steps=4', f'--out_dir={tmp_path / "ddp"}')
             for _ in range(2)]
    one = run_in_process('train.py', *args, '--batch_size=124', f'--out_dir={tmp_path / "one"}')  # while the nodes run
    assert one.returncode == 0 and '(1 processes x 1 micro-batches x 124 sequences x 48 tokens)' in one.stdout
    out = finish(*nodes)
    assert '5,952 tokens per iteration (2 processes x 2 micro-batches x 31 sequences x 48 tokens)' in out
    assert out.count('saved') == 1 and len(events(tmp_path / 'ddp', 'start')) == 1  # rank 0 saves and logs, once
    _, ckpt = load_checkpoint(tmp_path / 'ddp' / 'ckpt.pt')
    assert ckpt['iter_num'] == 1 and len(ckpt['ranks']) == 2
    # all ranks' targets counted: every target token of the epoch, each drawn exactly once (disjoint windows)
    assert ckpt['coverage']['covered'].sum().item() == 124 * 48
    assert [state['targets_drawn'] for state in ckpt['ranks']] == [62 * 48, 62 * 48]
    # after one AdamW step the first moment is (1 - beta1) * gradient: the DDP gradient, exactly read back
    moments = [[state['exp_avg'] / (1 - 0.9) for state in c['optimizers'][0]['state'].values()]
               for c in (ckpt, torch.load(tmp_path / 'one' / 'ckpt.pt', weights_only=True))]
    assert len(moments[0]) == len(moments[1]) == len(ckpt['model']) - 1  # every parameter (lm_head is tied)
    assert max(g.abs().max() for g in moments[1]) > 0.01  # a real gradient, not zeros
    for g_ddp, g_one in zip(*moments):
        difference = (g_ddp - g_one).abs().max().item()
        assert difference <= 1e-6, f"the DDP gradient is {difference:.1e} from the single process's (largest {g_one.abs().max():.1e})"


def test_sigterm_to_one_rank_stops_both_and_the_resumed_run_equals_the_straight_one(small_data, tmp_path):
    # random offsets, dropout: every rank's own sampler and RNG states must come back. The split run is
    # stopped by SIGTERM to rank 1 alone, after whichever step both ranks agree on, and resumed
    common = [*TINY, f'--data_dir={small_data}', '--dropout=0.1', '--decay_lr=False', '--log_interval=1',
              '--eval_interval=1000', '--sample_tokens=0', '--max_seconds=3600']  # a budget that never binds: rank 0's clock
    straight = start_ranks(*common, f'--out_dir={tmp_path / "straight"}', '--max_iters=30')
    split = start_ranks(*common, f'--out_dir={tmp_path / "split"}', '--max_iters=100000')
    wait_for_line(split[0], 'iter 3:')
    split[1].send_signal(signal.SIGTERM)
    out = finish(*split)
    stops = {int(rank): int(at) for rank, at in re.findall(r'rank (\d): stopping after iteration (\d+)', out)}
    assert stops.keys() == {0, 1} and 3 <= stops[0] == stops[1] < 30
    assert 'rank 1: stopping after iteration %d (SIGTERM)' % stops[1] in out
    assert out.index('saved') < out.index(f'step {stops[0]}:')  # saved before the final evaluation
    assert load_checkpoint(tmp_path / 'split' / 'ckpt.pt')[1]['iter_num'] == stops[0]
    finish(*start_ranks(*common, f'--out_dir={tmp_path / "split"}', '--max_iters=30', '--init_from=resume'))
    finish(*straight)
    losses = lambda d: [(e['iter'], e['loss']) for e in events(tmp_path / d, 'train')]
    assert losses('straight') == losses('split') and len(losses('split')) == 30
    a, b = (torch.load(tmp_path / d / 'ckpt.pt', weights_only=True) for d in ('straight', 'split'))
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert b['ranks'][0]['sampler'] != b['ranks'][1]['sampler']  # each rank its own stream of windows
    # the checkpoint holds two ranks' states: one process cannot continue it
    result = run_in_process('train.py', *common, f'--out_dir={tmp_path / "split"}', '--init_from=resume')
    assert result.returncode == 2 and result.stderr.count('\n') == 1
    assert 'holds the sampler states of 2 processes; resume it with as many (torchrun --nproc_per_node=2' in result.stderr


def test_runs_in_one_out_dir_and_a_diverged_run(small_data, tmp_path):
    common = [*TINY, f'--data_dir={small_data}', f'--out_dir={tmp_path}', '--sample_tokens=0', '--eval_interval=3',
              '--log_interval=1']
    assert run_in_process('train.py', *common, '--max_iters=3').returncode == 0
    # a new run over it only when told to; the first run's log is kept under a dated name
    refused = run_in_process('train.py', *common, '--max_iters=3')
    assert refused.returncode == 1 and "holds another run's checkpoint" in refused.stderr
    assert run_in_process('train.py', *common, '--max_iters=6', '--overwrite=True').returncode == 0
    [old_log] = [name for name in os.listdir(tmp_path) if name.startswith('log-')]
    [old_ckpt] = [name for name in os.listdir(tmp_path) if name.startswith('ckpt-')]  # set aside at the start
    assert torch.load(tmp_path / old_ckpt, weights_only=True)['iter_num'] == 3
    assert len(events(tmp_path, 'start')) == 1 and len(events(tmp_path, 'train')) == 6
    assert [e['event'] for e in map(json.loads, open(tmp_path / old_log))].count('train') == 3
    # the learning rate sends the weights to infinity: the steps are skipped, then the run stops
    good = (tmp_path / 'ckpt.pt').read_bytes()
    with open(tmp_path / 'log.jsonl', 'a') as f:
        f.write('{"event": "train", "it')  # the last line of a writer killed in the middle of it
    diverged = run_in_process('train.py', *common, '--init_from=resume', '--max_iters=100', '--learning_rate=1e30',
                          '--max_skipped_steps=3', '--grad_clip=None')
    assert diverged.returncode == 1 and diverged.stderr.count('\n') == 1
    assert 'was not finite for 3 steps in a row: the run diverged' in diverged.stderr
    assert 'note: learning_rate changed on resume: 0.003 -> 1e+30' in diverged.stdout
    assert 'note: grad_clip changed on resume: 1.0 -> None' in diverged.stdout
    assert (tmp_path / 'ckpt.pt').read_bytes() == good  # the NaN evaluation at step 9 saved nothing
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f'{c} in log.jsonl')) for line in
            open(tmp_path / 'log.jsonl')]
    evaluated = [r['iter'] for r in rows if r['event'] == 'eval']  # the resume at 6 does not evaluate 6 again
    assert evaluated[:3] == [0, 3, 6] and len(evaluated) == len(set(evaluated))
    skipped = [r for r in rows if r['event'] == 'skipped']
    assert len(skipped) == 3 and [r['iter'] for r in skipped] == list(range(skipped[0]['iter'], skipped[0]['iter'] + 3))
    assert all(r['loss'] is None for r in skipped)  # NaN, written as null


def test_embeddings_own_learning_rate_follows_the_schedule_and_binds_the_resume(small_data, tmp_path):
    common = [*TINY, f'--data_dir={small_data}', f'--out_dir={tmp_path}', '--sample_tokens=0', '--eval_interval=4',
              '--wpe_init_std=0', '--wpe_weight_decay=0', '--embedding_lr=0.012']
    assert run_in_process('train.py', *common, '--max_iters=4').returncode == 0
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    groups = ckpt['optimizers'][0]['param_groups']
    # the schedule's rate at the save (iteration 4: warm-up 5/6, the cosine at its end), the embeddings at 4x it
    lr = learning_rate_at(4, 1.0, 3e-3, 6e-5, 5)
    assert [g['lr'] for g in groups] == pytest.approx([lr, lr, 4 * lr, 4 * lr], rel=1e-12)
    assert [g['weight_decay'] for g in groups] == [0.1, 0.0, 0.1, 0.0] and ckpt['model_args']['wpe_init_std'] == 0
    refused = run_in_process('train.py', *common[:-1], '--max_iters=8', '--init_from=resume')
    assert refused.returncode == 2 and refused.stderr.count('\n') == 1
    assert 'was trained with embedding_lr=0.012; resume with --embedding_lr=0.012' in refused.stderr


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(small_data, tmp_path):
    common = [*TINY, f'--data_dir={small_data}', f'--out_dir={tmp_path}', '--sample_tokens=0', '--eval_interval=2']
    assert run_in_process('train.py', *common, '--max_iters=2').returncode == 0
    good = (tmp_path / 'ckpt.pt').read_bytes()
    (tmp_path / '.tmp-killed.pt').write_bytes(b'half a checkpoint')  # left by a writer that was killed
    # no file may grow past half a checkpoint, as on a full disk (Python ignores SIGXFSZ: the write fails)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(good) // 2, hard))
    try:
        result = run_in_process('train.py', *common, '--max_iters=4', '--init_from=resume')
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert result.returncode == 1 and result.stderr.count('\n') == 1, result.stderr
    assert f'cannot write {tmp_path}/ckpt.pt (the write failed: a full disk' in result.stderr
    assert (tmp_path / 'ckpt.pt').read_bytes() == good
    assert not [name for name in os.listdir(tmp_path) if name.startswith('.tmp-')]


def start_training(small_data, out, *extra):
    return subprocess.Popen([sys.executable, 'train.py', *TINY, f'--data_dir={small_data}', f'--out_dir={out}',
                             '--max_iters=100000', '--log_interval=1', '--sample_tokens=0', *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED='1'))


def wait_for_line(process, text):
    for line in process.stdout:
        if text in line:
            return
    raise AssertionError(f"no line with {text!r}")


def test_a_second_ctrl_c_exits_at_once(small_data, tmp_path):
    process = start_training(small_data, tmp_path, '--eval_interval=3')
    wait_for_line(process, 'saved')
    process.send_signal(signal.SIGINT)
    assert process.stderr.readline() in ('\n', '')  # the notice opens with a new line
    assert process.stderr.readline() == 'SIGINT: finishing this step, then saving\n'
    process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=120)[1]
    assert process.returncode == 1 and err == 'SIGINT again: exiting now, without saving\n', err
    assert not [name for name in os.listdir(tmp_path) if name.startswith('.tmp-')]
    torch.load(tmp_path / 'ckpt.pt', weights_only=True)  # whole: the one before, or the one the first stop saved


# train.py, run so that the process kills itself (SIGKILL: no cleanup) halfway through writing its
# second checkpoint: after the first ckpt.pt is on disk, torch.save writes half a file and the kill follows
KILLED_IN_THE_SECOND_SAVE = """
import os, runpy, signal, sys, torch
real_save = torch.save
def save(obj, path):
    real_save(obj, path)
    if os.path.exists(os.path.join(os.path.dirname(path), 'ckpt.pt')):
        os.truncate(path, os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path('train.py', run_name='__main__')
"""


def test_kill_during_checkpoint_writes_keeps_a_loadable_checkpoint(small_data, tmp_path):
    args = [*TINY, f'--data_dir={small_data}', f'--out_dir={tmp_path}', '--sample_tokens=0', '--eval_interval=1',
            '--eval_iters=1', '--max_iters=3']
    killed = subprocess.run([sys.executable, '-c', KILLED_IN_THE_SECOND_SAVE, 'train.py', *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL and killed.stdout.count('saved') == 1, killed.stdout
    [half_written] = [name for name in os.listdir(tmp_path) if name.startswith('.tmp-')]  # the kill landed mid-write
    assert load_checkpoint(tmp_path / 'ckpt.pt')[1]['iter_num'] == 1  # the checkpoint before it, whole
    with pytest.raises(ValueError, match='damaged'):
        load_checkpoint(tmp_path / half_written)
    resumed = run_in_process('train.py', *args, '--init_from=resume')
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(tmp_path / 'ckpt.pt')[1]['iter_num'] == 3
    assert not [name for name in os.listdir(tmp_path) if name.startswith('.tmp-')]  # the leftover is cleared


def test_best_pt_keeps_the_best_evaluation_when_a_later_one_is_worse(tmp_path):
    # 400 random tokens of 64 kinds: val falls to about ln 64 as the model learns the unigrams, then
    # rises as it memorises the training tokens, so the best evaluation is not the last
    rng = np.random.default_rng(0)
    write_token_data(tmp_path / 'data', rng.integers(0, 64, 400), rng.integers(0, 64, 200), vocab_size=512)
    common = ['train.py', f'--data_dir={tmp_path / "data"}', f'--out_dir={tmp_path / "out"}', '--n_layer=2',
              '--n_head=2', '--n_embd=64', '--block_size=16', '--batch_size=16', '--eval_iters=4', '--dtype=float32',
              '--peak_flops=1e12', '--sample_tokens=0', '--learning_rate=1e-2', '--warmup_iters=5', '--decay_lr=False',
              '--eval_interval=30', '--log_interval=1000', '--snapshot_interval=30']
    result = run_in_process(*common, '--max_iters=150')
    assert result.returncode == 0, result.stderr
    evals = {e['iter']: e['val_loss'] for e in events(tmp_path / 'out', 'eval')}
    best_iter = min((i for i in evals if i > 0), key=evals.get)
    assert best_iter < 150 and evals[150] > evals[best_iter] + 0.1
    assert (f"best val loss {evals[best_iter]:.4f} at iteration {best_iter} in {tmp_path / 'out'}/best.pt; "
            f"latest checkpoint {tmp_path / 'out'}/ckpt.pt (iteration 150)") in result.stdout
    best, best_ckpt = load_checkpoint(tmp_path / 'out' / 'best.pt')
    assert best_ckpt['iter_num'] == best_ckpt['best_iter'] == best_iter and best_ckpt['best_val_loss'] == evals[best_iter]
    assert 'optimizers' not in best_ckpt  # the model alone: resuming reads ckpt.pt
    snapshot = np.load(tmp_path / 'out' / 'snapshots' / f'iter_{best_iter:06d}.npz')
    assert np.array_equal(best.W_E.detach().half().numpy(), snapshot['W_E'])  # the weights of that iteration
    # sample.py reads best.pt unless told otherwise
    for which, name, iteration in (('best', 'best.pt', best_iter), ('last', 'ckpt.pt', 150)):
        sampled = run_in_process('sample.py', f'--out_dir={tmp_path / "out"}', f'--checkpoint={which}',
                                 '--max_new_tokens=3', '--start=a')
        assert sampled.returncode == 0 and f"{tmp_path / 'out'}/{name}, iteration {iteration}: 3 tokens" in sampled.stderr
    # a checkpoint written before best.pt was kept (no best_iter) resumes, and a new run sets best.pt aside
    old = torch.load(tmp_path / 'out' / 'ckpt.pt', weights_only=True)
    del old['best_iter']
    torch.save(old, tmp_path / 'out' / 'ckpt.pt')
    assert run_in_process(*common, '--max_iters=152', '--init_from=resume').returncode == 0
    assert run_in_process(*common, '--max_iters=2', '--overwrite=True').returncode == 0
    [aside] = [name for name in os.listdir(tmp_path / 'out') if name.startswith('best-')]
    assert torch.load(tmp_path / 'out' / aside, weights_only=True)['iter_num'] == best_iter
    assert torch.load(tmp_path / 'out' / 'best.pt', weights_only=True)['iter_num'] == 2


def test_eval_only_evaluates_the_run_and_changes_no_file(small_data, tmp_path):
    args = [*TINY, f'--data_dir={small_data}', f'--out_dir={tmp_path}', '--eval_interval=3', '--snapshot_interval=3']
    refused = run_in_process('train.py', *args, '--eval_only=True')  # no run yet: nothing to evaluate
    assert refused.returncode == 1 and f'no checkpoint at {tmp_path}/ckpt.pt to evaluate' in refused.stderr
    assert os.listdir(tmp_path) == []
    assert run_in_process('train.py', *args, '--max_iters=6').returncode == 0
    files = lambda: {os.path.relpath(os.path.join(parent, name), tmp_path): open(os.path.join(parent, name), 'rb').read()
                     for parent, _, names in os.walk(tmp_path) for name in names}
    before = files()
    result = run_in_process('train.py', *args, '--max_iters=6', '--eval_only=True')
    assert result.returncode == 0, result.stderr
    after = files()
    assert after.keys() == before.keys() and all(after[k] == before[k] for k in before if k != 'log.jsonl')
    assert after['log.jsonl'].startswith(before['log.jsonl'])
    [added] = [json.loads(line) for line in after['log.jsonl'][len(before['log.jsonl']):].decode().splitlines()]
    saved_eval = [e for e in events(tmp_path, 'eval') if e['iter'] == 6][0]
    assert added['event'] == 'eval' and added['iter'] == 6 and added['val_loss'] == saved_eval['val_loss']
    assert f"step 6: train loss {added['train_loss']:.4f}, val loss {added['val_loss']:.4f}" in result.stdout
    # an evaluation alone may read the run at a shorter context (a resume that trains may not: test_cli_errors)
    shorter = run_in_process('train.py', *args, '--max_iters=6', '--eval_only=True', '--block_size=8')
    assert shorter.returncode == 0 and events(tmp_path, 'eval')[-1]['val_loss'] != added['val_loss'], shorter.stderr


def test_new_runs_in_one_second_keep_every_earlier_run(tmp_path, monkeypatch):
    monkeypatch.setattr('gulliver.runlog.time.strftime', lambda format: '20261128-004500')
    for run in ('first', 'second', 'third'):
        with start_log(tmp_path, new_run=True) as log:
            log.write(f'{run}\n')
        (tmp_path / 'ckpt.pt').write_text(run)
    assert {name: (tmp_path / name).read_text() for name in os.listdir(tmp_path)} == {
        'log-20261128-004500.jsonl': 'first\n', 'ckpt-20261128-004500.pt': 'first',
        'log-20261128-004500-1.jsonl': 'second\n', 'ckpt-20261128-004500-1.pt': 'second',
        'log.jsonl': 'third\n', 'ckpt.pt': 'third'}


def test_a_compiled_run_compiles_every_graph_at_static_shapes(tmp_path, monkeypatch):
    # the whole val split, 22 windows of 32 in batches of 8, ends on a short batch (6): a batch size the
    # compiled model has not seen would make dynamo compile the next graph, training's, for any batch size
    write_token_data(tmp_path / 'data', np.resize(np.arange(500), 3000), np.resize(np.arange(500), 700),
                     vocab_size=512)
    graphs = []  # each graph dynamo hands to the backend: the sizes it is compiled for, ints or symbols

    def record(graph_module, example_inputs):
        graphs.append([x for x in example_inputs if not isinstance(x, torch.Tensor)] +
                      [s for x in example_inputs if isinstance(x, torch.Tensor) for s in x.shape])
        return graph_module.forward
    compile_ = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda model, **kwargs: compile_(model, backend=record, **kwargs))
    torch._dynamo.reset()
    try:
        result = run_in_process('train.py', *TINY, f'--data_dir={tmp_path / "data"}', f'--out_dir={tmp_path / "out"}',
                                '--compile=True', '--max_iters=2', '--eval_interval=1', '--sample_tokens=0')
    finally:
        torch._dynamo.reset()
    assert result.returncode == 0, result.stderr
    assert len(graphs) == 2, graphs  # an evaluation's and a training step's: no recompilation
    symbolic = [sizes for sizes in graphs if any(isinstance(s, torch.SymInt) for s in sizes)]
    assert not symbolic, f"{len(symbolic)} of {len(graphs)} graphs compiled for symbolic sizes"


def test_the_logged_speed_times_the_steps_alone(small_data, tmp_path, monkeypatch):
    # an evaluation made 1 s slower (0.5 s a split) must not show in the ms/iter of the log window it falls in
    import gulliver.data
    eval_batches = gulliver.data.eval_batches

    def slow_eval_batches(*args, **kwargs):
        time.sleep(0.5)
        yield from eval_batches(*args, **kwargs)
    monkeypatch.setattr(gulliver.data, 'eval_batches', slow_eval_batches)
    result = run_in_process('train.py', *TINY, f'--data_dir={small_data}', f'--out_dir={tmp_path}', '--max_iters=8',
                            '--log_interval=2', '--eval_interval=4', '--sample_tokens=0', '--whole_val=False')
    assert result.returncode == 0, result.stderr
    ms = {e['iter']: e['ms_per_iter'] for e in events(tmp_path, 'train')}
    with_eval, without = [ms[2], ms[6]], [ms[4], ms[8]]  # evaluations at 0 and 4 fall in the windows to 2 and 6
    # the steps take milliseconds; the evaluation's second, counted in, would add 500 ms an iteration
    assert max(with_eval) < min(without) + 200, ms


def test_an_infinite_gradient_norm_is_skipped_and_a_run_of_skips_is_counted_across_a_resume(small_data, tmp_path,
                                                                                             monkeypatch):
    # from the third step on, the gradient norm is +inf (as an fp16 overflow makes it): every such step is
    # skipped. The first run saves at iteration 4 after two skipped steps in a row; its resume skips a third
    # at step 4, and a run of max_skipped_steps=3 must stop at the next read, iteration 5
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def clip_then_overflow(*args, **kwargs):
        norm = clip(*args, **kwargs)
        calls.append(norm)
        return torch.full_like(norm, math.inf) if len(calls) > 2 or resuming else norm
    monkeypatch.setattr(torch.nn.utils, 'clip_grad_norm_', clip_then_overflow)
    common = [*TINY, f'--data_dir={small_data}', f'--out_dir={tmp_path}', '--sample_tokens=0', '--log_interval=1',
              '--eval_interval=2', '--max_skipped_steps=3']
    resuming = False
    first = run_in_process('train.py', *common, '--max_iters=4')
    assert first.returncode == 0, first.stderr
    assert 'iter 3: 1 of the last 1 updates skipped' in first.stdout and 'iter 4: 1 of the last 1' in first.stdout
    saved = load_checkpoint(tmp_path / 'ckpt.pt')
    assert saved[1]['skipped_in_a_row'] == 2 and all(torch.isfinite(p).all() for p in saved[0].parameters())
    resuming = True
    resumed = run_in_process('train.py', *common, '--max_iters=8', '--init_from=resume')
    assert resumed.returncode == 1 and 'not finite for 3 steps in a row' in resumed.stderr, resumed.stderr
    assert 'iter 5: 1 of the last 1 updates skipped' in resumed.stdout and 'iter 6' not in resumed.stdout


def test_a_smooth_start_of_w_pos_is_the_sinusoidal_table_and_is_kept_in_the_checkpoint(small_data, tmp_path):
    from model import sinusoidal_table
    result = run_in_process('train.py', *TINY, f'--data_dir={small_data}', f'--out_dir={tmp_path}', '--max_iters=1',
                            '--sample_tokens=0', '--snapshot_interval=1', '--wpe_init=sinusoidal', '--wpe_init_std=0.05')
    assert result.returncode == 0, result.stderr
    start = np.load(tmp_path / 'snapshots' / 'iter_000000.npz')['W_pos']
    assert np.array_equal(start, sinusoidal_table(32, 32, std=0.05).half().numpy())
    assert load_checkpoint(tmp_path / 'ckpt.pt')[1]['model_args']['wpe_init'] == 'sinusoidal'
