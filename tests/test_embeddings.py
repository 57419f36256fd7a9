import json
import os

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import run_in_process
from embeddings import (cooccurrence, glove_loss, glove_weight, keep_probability, noise_distribution, sgns_loss,
                        skipgram_pairs, train_glove, train_sgns, METHOD_DEFAULTS)
from model import GPT, GPTConfig
from gulliver.tokenizer import VOCAB_SIZE

# --- the gradients the objectives rest on, through the project's own code --------


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=40, dropout=0.0)).double()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 40, (2, 8), generator=g), torch.randint(0, 40, (2, 8), generator=g)


def loss_of_logits(model, x, y):
    """z -> the loss model(x, y) computes when its head outputs the logits z (B, T, V): the model's
    own cross-entropy as a function of the logits."""
    def loss(z):
        hook = model.lm_head.register_forward_hook(lambda module, inputs, output: z)
        try:
            return model(x, y)[1]
        finally:
            hook.remove()
    return loss


def test_gradient_of_the_model_loss_wrt_its_logits_is_p_minus_y():
    model, (x, y) = tiny_gpt(), batch()
    logits = model(x)[0].detach().requires_grad_()
    loss_of_logits(model, x, y)(logits).backward()
    p = F.softmax(logits.detach(), -1)
    assert torch.allclose(logits.grad, (p - F.one_hot(y, 40)) / y.numel(), atol=1e-15)  # the mean over B*T


def test_the_tied_matrix_gets_the_output_gradient_plus_the_input_gradient():
    # W = wte.weight is both the embedding and the head: dL/dW = (p - y)^T h_final + the lookups' gradients
    model, (x, y) = tiny_gpt(), batch()
    W = model.transformer.wte.weight
    assert W is model.lm_head.weight
    captured = {}

    def keep(name):  # a forward hook that keeps a module's output and its gradient
        def hook(module, inputs, output):
            output.retain_grad()
            captured[name] = output
        return hook
    hooks = [model.transformer.wte.register_forward_hook(keep('lookup')),
             model.transformer.ln_f.register_forward_hook(keep('h_final')),
             model.lm_head.register_forward_hook(keep('logits'))]
    model(x, y)[1].backward()
    for hook in hooks:
        hook.remove()
    h, logits = captured['h_final'].detach().reshape(-1, 16), captured['logits']
    output_part = logits.grad.reshape(-1, 40).T @ h  # row i: sum over positions of (p_i - y_i) h
    input_part = torch.zeros_like(W).index_add_(0, x.flatten(), captured['lookup'].grad.reshape(-1, 16))
    assert torch.allclose(W.grad, output_part + input_part, atol=1e-15)
    unused = sorted(set(range(40)) - set(x.flatten().tolist()) - set(y.flatten().tolist()))
    p = F.softmax(logits.detach(), -1).reshape(-1, 40)
    assert unused and torch.allclose(W.grad[unused], p[:, unused].T @ h / y.numel(), atol=1e-15)  # only p_i h


def test_sgns_gradients_are_those_of_log_sigmoid():
    # L = -log σ(u_c·v) - Σ_k log σ(-u_k·v), and d/dx log σ(x) = 1 - σ(x):
    # dL/dv = (σ(u_c·v) - 1) u_c + Σ_k σ(u_k·v) u_k, dL/du_c = (σ(u_c·v) - 1) v, dL/du_k = σ(u_k·v) v
    g = torch.Generator().manual_seed(2)
    v, u_c, u_n = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
                   for shape in ((3, 8), (3, 8), (3, 5, 8)))
    sgns_loss(v, u_c, u_n).backward()
    positive = torch.sigmoid((u_c * v).sum(-1, keepdim=True)).detach()
    negative = torch.sigmoid(torch.einsum('bkd,bd->bk', u_n, v))[..., None].detach()
    assert torch.allclose(v.grad, (positive - 1) * u_c + (negative * u_n).sum(1), atol=1e-12)
    assert torch.allclose(u_c.grad, (positive - 1) * v, atol=1e-12)
    assert torch.allclose(u_n.grad, negative * v[:, None], atol=1e-12)
    assert sgns_loss(v, u_c, u_n).item() == pytest.approx(
        -(torch.log(positive).sum() + torch.log(1 - negative).sum()).item(), rel=1e-12)


def test_glove_weighting():
    x = np.array([0.5, 10, 50, 100, 400])
    assert np.allclose(glove_weight(x, 100, 0.75), [0.005 ** 0.75, 0.1 ** 0.75, 0.5 ** 0.75, 1, 1], rtol=1e-12)


def test_subsampling_keeps_a_token_of_frequency_f_with_sqrt_t_over_f():
    counts = np.array([1, 4, 16, 979])  # total 1000: frequencies 0.001, 0.004, 0.016, 0.979
    assert np.allclose(keep_probability(counts, 0.004), [1, 1, 0.5, np.sqrt(0.004 / 0.979)], rtol=1e-12)


def test_noise_distribution_is_the_unigram_to_the_three_quarters():
    p = noise_distribution(np.array([1, 16, 81, 0]))  # 16^0.75 = 8, 81^0.75 = 27
    assert np.allclose(p, np.array([1, 8, 27, 0]) / 36, rtol=1e-12)


def test_skipgram_pairs_draw_one_span_per_word():
    # distinct tokens, so every pair names its two positions
    n, window = 4000, 4
    words, contexts = skipgram_pairs(np.arange(n), window, np.random.default_rng(0))
    spans = np.zeros(n, dtype=int)
    np.maximum.at(spans, words, np.abs(contexts - words))
    for i in (0, 1, 1000, n - 1):  # each word pairs with every token within its span on both sides, no further
        expected = {j for j in range(i - spans[i], i + spans[i] + 1) if j != i and 0 <= j < n}
        assert set(contexts[words == i].tolist()) == expected
    inner = spans[window:-window]
    assert set(inner.tolist()) == set(range(1, window + 1))
    assert np.allclose(np.bincount(inner)[1:] / len(inner), 1 / window, atol=0.03)  # b uniform on 1..window
    distance = np.abs(contexts - words)
    # so a context at distance d is used with probability (window - d + 1) / window
    assert np.allclose(np.bincount(distance)[1:] / (2 * n), [1, 0.75, 0.5, 0.25], atol=0.03)


def test_glove_loss_is_zero_at_a_perfect_fit_and_weighted():
    w_i, w_j = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 0.25]])  # w_i·w_j = 1, exact in binary
    b_i, b_j = torch.tensor([0.5]), torch.tensor([-0.25])
    assert glove_loss(w_i, w_j, b_i, b_j, torch.tensor([1.25]), torch.tensor([0.3])) == 0
    assert glove_loss(w_i, w_j, b_i, b_j, torch.tensor([3.25]), torch.tensor([0.3])) == pytest.approx(0.3 * 4)


def test_glove_loss_and_its_gradient_are_sums_over_the_pairs_of_a_batch():
    # J = Σ_n f_n e_n^2, e_n = w_n·w~_n + b_n + b~_n - log X_n: a sum (run_epochs divides an epoch's total
    # by its pairs), so dJ/dw_n = 2 f_n e_n w~_n and dJ/db_n = 2 f_n e_n, whatever the batch's size
    g = torch.Generator().manual_seed(3)
    w_i, w_j = (torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    b_i, b_j = (torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    log_x, f = torch.randn(6, generator=g, dtype=torch.float64), torch.rand(6, generator=g, dtype=torch.float64)
    loss = glove_loss(w_i, w_j, b_i, b_j, log_x, f)
    loss.backward()
    Wi, Wj, Bi, Bj, logX, fX = (t.detach().numpy() for t in (w_i, w_j, b_i, b_j, log_x, f))
    error = np.einsum('nd,nd->n', Wi, Wj) + Bi + Bj - logX
    assert loss.item() == pytest.approx((fX * error ** 2).sum(), rel=1e-12)
    assert np.allclose(w_i.grad.numpy(), 2 * (fX * error)[:, None] * Wj, rtol=1e-12, atol=0)
    assert np.allclose(b_j.grad.numpy(), 2 * fX * error, rtol=1e-12, atol=0)


# --- the trainers on tiny data --------------------------------------------------

GROUP_A, GROUP_B = np.arange(100, 105), np.arange(200, 205)  # never within a window of each other...
# ...but each group has its own contexts, tokens 300.. and 400..
# small and fast: 16 dimensions, a few epochs
TINY = {'sgns': lambda tokens, seed=0: train_sgns(tokens, 16, 2, 5, epochs=3, batch_size=128, lr=0.05, subsample=1.0,
                                                  seed=seed),
        'glove': lambda tokens, seed=0: train_glove(tokens, 16, 2, x_max=100, alpha=0.75, epochs=10, batch_size=256,
                                                    lr=0.05, seed=seed)}


def planted_corpus(n_sentences=1000, n_contexts=10, seed=0):
    """Sentences `c c w c c`: w from one group, every c from that group's own n_contexts context tokens."""
    rng = np.random.default_rng(seed)
    tokens = []
    for _ in range(n_sentences):
        group, context = (GROUP_A, 300) if rng.random() < 0.5 else (GROUP_B, 400)
        context = context + np.arange(n_contexts)
        tokens += [*rng.choice(context, 2), rng.choice(group), *rng.choice(context, 2)]
    return np.array(tokens, dtype=np.uint16)


@pytest.fixture(scope='module')
def trained():
    tokens = planted_corpus()
    return tokens, {name: train(tokens) for name, train in TINY.items()}


def group_cosines(W_E):
    """(mean cosine within the planted groups, mean cosine between them)."""
    unit = W_E / np.linalg.norm(W_E, axis=1, keepdims=True).clip(1e-12)
    a, b = unit[GROUP_A], unit[GROUP_B]
    off_diagonal = ~np.eye(len(a), dtype=bool)
    return np.concatenate([(a @ a.T)[off_diagonal], (b @ b.T)[off_diagonal]]).mean(), (a @ b.T).mean()


@pytest.mark.parametrize('name', TINY)
def test_trainer_finds_the_planted_groups(trained, name):
    within, between = group_cosines(trained[1][name][0])
    assert within > between + 0.3, (within, between)


@pytest.mark.parametrize('name', TINY)
def test_default_settings_on_a_small_vocabulary(name):
    # 40 distinct tokens in 40,000: each batch looks every row up dozens to hundreds of times
    tokens = planted_corpus(8000, n_contexts=15)
    assert len(np.unique(tokens)) == 40
    train = train_sgns if name == 'sgns' else train_glove
    import embeddings  # its settings' defaults, as the script runs with them
    method_args = ({'negatives': embeddings.negatives, 'subsample': embeddings.subsample} if name == 'sgns'
                   else {'x_max': embeddings.x_max, 'alpha': embeddings.alpha})
    W_E, losses = train(tokens, 256, 2, **method_args, **METHOD_DEFAULTS[name], seed=1337)
    assert np.isfinite(W_E).all() and np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0], losses
    within, between = group_cosines(W_E)
    assert within > between + 0.2, (within, between)


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
    result = run_in_process('embeddings.py', f'--method={method}', f'--data_dir={tiny_data_dir}',
                        f'--out_dir={out_dir}', '--dim=8', '--window=2', '--epochs=2', '--batch_size=128',
                        '--subsample=1.0')
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
    result = run_in_process('embeddings.py', f'--data_dir={tmp_path / "nothing"}', f'--out_dir={tmp_path / "out"}')
    check_one_line_error(result, 'run python prepare.py first')
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('arg, message', [
    ('--method=lsa', "method must be one of 'sgns', 'glove', not 'lsa'"),
    ('--dim=0', 'dim must be an integer >= 1, not 0'),
    ('--window=-1', 'window must be an integer >= 1, not -1'),
    ('--epochs=0', 'epochs must be None or an integer >= 1, not 0'),
    ('--lr=fast', "lr must be None or > 0, not 'fast'"),
    ('--lr=10.0', 'sgns: the loss is'),  # non-finite: refused, nothing written
])
def test_cli_bad_settings(tiny_data_dir, tmp_path, arg, message):
    result = run_in_process('embeddings.py', f'--data_dir={tiny_data_dir}', f'--out_dir={tmp_path / "out"}', arg)
    check_one_line_error(result, message)
    assert not (tmp_path / 'out').exists()
