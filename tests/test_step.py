"""The training step on the device: no host reads inside it, and a non-finite step that changes
nothing."""
import collections
import copy
import os

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import run_in_process, write_token_data
from gulliver.optim import step_unless
from model import GPT, GPTConfig

aten = torch.ops.aten
# .item(), float(), int(), bool() and an `if` on a tensor all reach the host through
# _local_scalar_dense; nonzero and masked_select have a size that depends on the values
HOST_READS = (aten._local_scalar_dense, aten.nonzero, aten.masked_select)


class Ops(TorchDispatchMode):
    """Counts the ops dispatched, by op whatever the overload (aten.where: where.self and
    where.self_out alike)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket] += 1
        return func(*args, **(kwargs or {}))

    def host_reads(self):
        """The ops that make the host wait for a tensor's value."""
        return sum(self.counts[op] for op in HOST_READS)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp('data')
    pattern = np.random.default_rng(0).integers(0, 500, 50)
    write_token_data(folder, np.resize(pattern, 3000), np.resize(pattern, 500), vocab_size=512)
    return str(folder)


def host_reads_of_a_run(data, out_dir, steps, optimizer):
    """Host reads in a whole train.py run (in this process) of `steps` steps with no log and no
    evaluation between the first and the last: what does not depend on steps is start-up and the
    two evaluations."""
    with Ops() as ops:
        result = run_in_process(
            'train.py', f'--data_dir={data}', f'--out_dir={out_dir}', '--n_layer=1', '--n_head=2',
            '--n_embd=32', '--block_size=16', '--batch_size=4', '--eval_iters=2', '--dtype=float32',
            '--peak_flops=1e12', '--sample_tokens=0', '--log_interval=1000', '--eval_interval=1000',
            f'--max_iters={steps}', f'--optimizer={optimizer}')
    assert result.returncode == 0, result.stderr
    return ops.host_reads()


@pytest.mark.parametrize('optimizer', ['adamw', 'muon'])  # step_unless steps each its own way
def test_a_training_step_reads_no_tensor_on_the_host(data, tmp_path, monkeypatch, optimizer):
    few, more = (host_reads_of_a_run(data, tmp_path / f'run{n}', n, optimizer) for n in (5, 10))
    assert few == more > 0  # the evaluations read losses: the counter sees train.py's reads
    # positive control: a step that tests its gradient norm on the host, as `if torch.isfinite(norm)` would
    clip = torch.nn.utils.clip_grad_norm_

    def clip_and_read(*args, **kwargs):
        norm = clip(*args, **kwargs)
        bool(torch.isfinite(norm))
        return norm
    monkeypatch.setattr(torch.nn.utils, 'clip_grad_norm_', clip_and_read)
    few, more = (host_reads_of_a_run(data, tmp_path / f'sync{n}', n, optimizer) for n in (5, 10))
    assert more - few == 5


def model_and_batch(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=300, pad_vocab_to=64))
    x, y = torch.randint(0, 300, (2, 4, 16))
    return model, x, y


def backward_and_skip_flag(model, x, y, poison=None):
    """Backward, clip and skip flag as train.py has them. poison: None, or a value (NaN, +inf, -inf)
    put in one element of every gradient, as an overflow would: their norm is then NaN or +inf
    (clipping by it leaves the gradients NaN and zeros). A poisoned loss would not do for inf:
    inf * a zero derivative makes the gradients, and their norm, NaN."""
    model(x, y)[1].backward()
    if poison is not None:
        for p in model.parameters():
            p.grad.view(-1)[0] = poison
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    return (~torch.isfinite(norm)).float()


def state(model, optimizers):
    return copy.deepcopy((dict(model.state_dict()), [opt.state_dict() for opt in optimizers]))


def assert_equal_states(a, b):
    (params_a, opts_a), (params_b, opts_b) = a, b
    assert params_a.keys() == params_b.keys() and all(torch.equal(params_a[k], params_b[k]) for k in params_a)
    for opt_a, opt_b in zip(opts_a, opts_b):
        assert opt_a['state'].keys() == opt_b['state'].keys()
        for i in opt_a['state']:
            for key, value in opt_a['state'][i].items():
                assert torch.equal(value, opt_b['state'][i][key]), (i, key)


@pytest.mark.parametrize('poison', [float('nan'), float('inf'), float('-inf')])
@pytest.mark.parametrize('optimizer', ['adamw', 'muon'])
def test_a_non_finite_step_leaves_parameters_and_optimizer_state_bit_identical(optimizer, poison):
    model, x, y = model_and_batch()
    optimizers = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cpu', optimizer)
    for _ in range(3):  # moments, momentum buffers and step counts that are not zero
        step_unless(optimizers, backward_and_skip_flag(model, x, y))
        [opt.zero_grad(set_to_none=True) for opt in optimizers]
    before = state(model, optimizers)
    step_unless(optimizers, backward_and_skip_flag(model, x, y, poison))
    assert_equal_states(before, state(model, optimizers))
    [opt.zero_grad(set_to_none=True) for opt in optimizers]
    step_unless(optimizers, backward_and_skip_flag(model, x, y))  # control: a finite step does change them
    with pytest.raises(AssertionError):
        assert_equal_states(before, state(model, optimizers))


def test_a_skipped_first_muon_step_starts_momentum_as_a_fresh_optimizer_does():
    results = []
    for skip_first in (True, False):
        model, x, y = model_and_batch()
        optimizers = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cpu', 'muon')
        if skip_first:
            step_unless(optimizers, backward_and_skip_flag(model, x, y, poison=float('nan')))
            [opt.zero_grad(set_to_none=True) for opt in optimizers]
        step_unless(optimizers, backward_and_skip_flag(model, x, y))
        results.append(model.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_a_muon_step_selects_on_the_device_and_copies_nothing_beforehand():
    model, x, y = model_and_batch()
    muon, _ = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cpu', 'muon')
    n = sum(len(group['params']) for group in muon.param_groups)
    counts = []
    for poison in (None, None, float('nan')):  # the first step creates the momentum buffers
        skip = backward_and_skip_flag(model, x, y, poison)
        with Ops() as ops:
            step_unless([muon], skip)
        model.zero_grad(set_to_none=True)
        counts.append(ops.counts)
    step, skipped = counts[1:]
    assert skipped == step  # the same kernels, skipped or not: the device decides
    assert skipped[aten.clone] == 0 and skipped.keys().isdisjoint(HOST_READS)
    assert skipped[aten.where] == 2 * n  # one select for each weight, one for its momentum buffer
    assert skipped[aten.copy_] <= 2 * n


def test_train_reads_no_skip_counter_between_logs_but_a_diverged_run_still_stops(data, tmp_path):
    # lr 1e30: the first update sends the weights to ~1e30, every later loss is non-finite
    result = run_in_process(
        'train.py', f'--data_dir={data}', f'--out_dir={tmp_path}', '--n_layer=1', '--n_head=2', '--n_embd=32',
        '--block_size=16', '--batch_size=4', '--eval_iters=1', '--dtype=float32', '--peak_flops=1e12',
        '--sample_tokens=0', '--log_interval=5', '--eval_interval=1000', '--max_iters=1000',
        '--learning_rate=1e30', '--warmup_iters=0', '--max_skipped_steps=3')
    assert result.returncode == 1 and result.stderr.count('\n') == 1, result.stderr
    # noticed at the first log (iteration 5): steps 2-5 were skipped, 4 in a row
    assert 'not finite for 4 steps in a row: the run diverged' in result.stderr
    assert 'iter 5: 4 of the last 5 updates skipped' in result.stdout
    assert not os.path.exists(tmp_path / 'ckpt.pt')
