import json
import os

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import run_script
from embeddings import cooccurrence, glove_loss, sgns_loss, train_glove, train_sgns
from tokenizer import VOCAB_SIZE

# --- loss-function facts --------------------------------------------------------


def random_logits(n=7, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_cross_entropy_gradient_wrt_logits_is_p_minus_y():
    logits, target = random_logits().requires_grad_(), 3
    F.cross_entropy(logits[None], torch.tensor([target])).backward()
    p = F.softmax(logits.detach(), -1)
    assert torch.allclose(logits.grad, p - F.one_hot(torch.tensor(target), len(p)), atol=1e-12)


@pytest.mark.parametrize('target', [0, 4])
def test_cross_entropy_hessian_is_diag_p_minus_ppT_and_psd(target):
    logits = random_logits()
    hessian = torch.autograd.functional.hessian(lambda z: F.cross_entropy(z[None], torch.tensor([target])), logits)
    p = F.softmax(logits, -1)
    assert torch.allclose(hessian, torch.diag(p) - torch.outer(p, p), atol=1e-12)  # the same for every target
    assert torch.linalg.eigvalsh(hessian).min() >= -1e-6
    assert torch.allclose(hessian.sum(1), torch.zeros_like(p), atol=1e-12)  # null along (1, ..., 1)


def test_tied_weights_gradient_rows():
    # W is both the embedding (h = tanh(W[x])) and the output layer (logits = W h)
    V, d, x, y = 6, 4, 1, 4
    W = torch.randn(V, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64).requires_grad_()
    h = torch.tanh(W[x])
    logits = W @ h
    F.cross_entropy(logits[None], torch.tensor([y])).backward()
    p, h = F.softmax(logits.detach(), -1), h.detach()
    output_grad = (p - F.one_hot(torch.tensor(y), V))[:, None] * h  # row y: (p_y - 1) h, row i: p_i h
    assert torch.allclose(W.grad[y], (p[y] - 1) * h, atol=1e-12)
    others = [i for i in range(V) if i not in (x, y)]
    assert torch.allclose(W.grad[others], p[others, None] * h, atol=1e-12)
    # the embedding row x also gets the gradient through h: dL/dh = W^T (p - y), dh/dW[x] = 1 - h^2
    input_grad = (1 - h ** 2) * (W.detach().T @ (p - F.one_hot(torch.tensor(y), V)))
    assert torch.allclose(W.grad[x], output_grad[x] + input_grad, atol=1e-12)


def test_derivative_of_log_sigmoid_is_one_minus_sigmoid():
    x = torch.linspace(-20, 20, 101, dtype=torch.float64, requires_grad=True)
    F.logsigmoid(x).sum().backward()
    assert torch.allclose(x.grad, 1 - torch.sigmoid(x.detach()), atol=1e-12)
    x.grad = None
    F.logsigmoid(-x).sum().backward()  # the negative-sample term: d/dx log σ(-x) = -σ(x)
    assert torch.allclose(x.grad, -torch.sigmoid(x.detach()), atol=1e-12)


def test_sgns_gradient_on_the_word_vector():
    # dL/dv_w = (σ(u_c·v_w) - 1) u_c + Σ_k σ(u_k·v_w) u_k
    g = torch.Generator().manual_seed(2)
    v, u_c, u_n = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((1, 8), (1, 8), (1, 5, 8)))
    v.requires_grad_()
    sgns_loss(v, u_c, u_n).backward()
    v_w = v[0].detach()
    expected = (torch.sigmoid(u_c[0] @ v_w) - 1) * u_c[0] + (torch.sigmoid(u_n[0] @ v_w)[:, None] * u_n[0]).sum(0)
    assert torch.allclose(v.grad[0], expected, atol=1e-12)


def test_glove_loss_is_zero_at_a_perfect_fit_and_weighted():
    w_i, w_j = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 0.25]])  # w_i·w_j = 1, exact in binary
    b_i, b_j = torch.tensor([0.5]), torch.tensor([-0.25])
    assert glove_loss(w_i, w_j, b_i, b_j, torch.tensor([1.25]), torch.tensor([0.3])) == 0
    assert glove_loss(w_i, w_j, b_i, b_j, torch.tensor([3.25]), torch.tensor([0.3])) == pytest.approx(0.3 * 4)


# --- the trainers on tiny data --------------------------------------------------

GROUP_A, GROUP_B = np.arange(100, 105), np.arange(200, 205)  # never within a window of each other...
CONTEXT_A, CONTEXT_B = np.arange(300, 310), np.arange(400, 410)  # ...but each group has its own contexts
# 30 distinct tokens: small batches, so that one batch does not pile hundreds of SGD updates on a row
TINY = {'sgns': lambda tokens, seed=0: train_sgns(tokens, 16, 2, 5, epochs=3, batch_size=128, subsample=1.0,
                                                  seed=seed),
        'glove': lambda tokens, seed=0: train_glove(tokens, 16, 2, epochs=10, batch_size=256, seed=seed)}


def planted_corpus(n_sentences=1000, seed=0):
    """Sentences `c c w c c`: w from one group, every c from that group's own context tokens."""
    rng = np.random.default_rng(seed)
    tokens = []
    for _ in range(n_sentences):
        group, context = (GROUP_A, CONTEXT_A) if rng.random() < 0.5 else (GROUP_B, CONTEXT_B)
        tokens += [*rng.choice(context, 2), rng.choice(group), *rng.choice(context, 2)]
    return np.array(tokens, dtype=np.uint16)


@pytest.fixture(scope='module')
def trained():
    tokens = planted_corpus()
    return tokens, {name: train(tokens) for name, train in TINY.items()}


@pytest.mark.parametrize('name', TINY)
def test_trainer_finds_the_planted_groups(trained, name):
    W_E = trained[1][name][0]
    unit = W_E / np.linalg.norm(W_E, axis=1, keepdims=True).clip(1e-12)
    a, b = unit[GROUP_A], unit[GROUP_B]
    off_diagonal = ~np.eye(len(a), dtype=bool)
    within = np.concatenate([(a @ a.T)[off_diagonal], (b @ b.T)[off_diagonal]]).mean()
    between = (a @ b.T).mean()
    assert within > between + 0.3, (within, between)


@pytest.mark.parametrize('name', TINY)
def test_trainer_shapes_loss_and_unseen_rows(trained, name):
    tokens, (W_E, losses) = trained[0], trained[1][name]
    assert W_E.shape == (VOCAB_SIZE, 16) and W_E.dtype == np.float32
    assert len(losses) == (3 if name == 'sgns' else 10) and losses[-1] < 0.9 * losses[0]
    seen = np.zeros(VOCAB_SIZE, dtype=bool)
    seen[tokens] = True
    assert np.all(W_E[~seen] == 0) and np.all(np.abs(W_E[seen]).sum(1) > 0)


@pytest.mark.parametrize('name', TINY)
def test_trainer_is_deterministic_with_a_seed(trained, name):
    tokens, (W_E, losses) = trained[0], trained[1][name]
    again, losses_again = TINY[name](tokens)
    assert np.array_equal(W_E, again) and losses == losses_again
    other, _ = TINY[name](tokens, seed=1)
    assert not np.array_equal(W_E, other)


def test_cooccurrence_counts_by_hand():
    # 5 7 5 9, window 2: distance 1 gives (5,7) (7,5) (5,9), distance 2 gives (5,5) and (7,9) at 1/2
    rows, cols, values = cooccurrence([5, 7, 5, 9], window=2)
    X = np.zeros((10, 10))
    X[rows, cols] = values
    expected = np.zeros((10, 10))
    expected[5, 7] = expected[7, 5] = 2.0
    expected[5, 9] = expected[9, 5] = 1.0
    expected[5, 5] = 1.0  # a pair of equal tokens adds 1/2 to X[5, 5] from each side
    expected[7, 9] = expected[9, 7] = 0.5
    assert np.array_equal(X, expected) and len(values) == 7


def test_cooccurrence_total_and_symmetry():
    tokens = planted_corpus(50)
    rows, cols, values = cooccurrence(tokens, window=3)
    X = np.zeros((410, 410))
    X[rows, cols] = values
    assert np.array_equal(X, X.T)
    n = len(tokens)
    assert values.sum() == pytest.approx(sum(2 * (n - d) / d for d in (1, 2, 3)))


# --- the command line ----------------------------------------------------------


@pytest.fixture(scope='module')
def tiny_data_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp('tiny')
    planted_corpus(600, seed=3).tofile(data_dir / 'train.bin')
    return data_dir


@pytest.mark.parametrize('method', ['sgns', 'glove'])
def test_cli_writes_W_E_and_json(tiny_data_dir, tmp_path, method):
    out_dir = tmp_path / 'out'
    result = run_script('embeddings.py', f'--method={method}', f'--data_dir={tiny_data_dir}',
                        f'--out_dir={out_dir}', '--dim=8', '--window=2', '--epochs=2', '--batch_size=128',
                        '--subsample=1.0', timeout=120)
    assert result.returncode == 0, result.stderr
    assert 'epoch 2/2' in result.stdout and 'pairs/s' in result.stdout
    W_E = np.load(out_dir / 'W_E.npy')
    assert W_E.shape == (VOCAB_SIZE, 8) and W_E.dtype == np.float32
    with open(out_dir / 'embeddings.json') as f:
        summary = json.load(f)
    assert summary['method'] == method and summary['settings']['dim'] == 8 and len(summary['losses']) == 2
    assert summary['rows_trained'] == 30 and summary['unseen_rows'] == 'zeros'
    assert sorted(os.listdir(out_dir)) == ['W_E.npy', 'embeddings.json']  # no temp files left


def check_one_line_error(result, message):
    assert result.returncode != 0
    assert result.stderr.startswith('error: ') and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_without_train_bin(tmp_path):
    result = run_script('embeddings.py', f'--data_dir={tmp_path / "nothing"}', f'--out_dir={tmp_path / "out"}',
                        timeout=60)
    check_one_line_error(result, 'run python prepare.py first')
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('arg, message', [
    ('--method=lsa', "unknown method 'lsa'"),
    ('--dim=0', 'dim must be a positive integer'),
    ('--window=-1', 'window must be a positive integer'),
    ('--epochs=0', 'epochs must be a positive integer'),
    ('--lr=1.0', 'the loss diverged'),  # 30 distinct tokens: a batch of 1024 adds ~200 updates to each row
])
def test_cli_bad_settings(tiny_data_dir, tmp_path, arg, message):
    result = run_script('embeddings.py', f'--data_dir={tiny_data_dir}', f'--out_dir={tmp_path / "out"}', arg,
                        timeout=60)
    check_one_line_error(result, message)
    assert not (tmp_path / 'out').exists()
