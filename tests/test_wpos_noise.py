"""The W_pos study's measures, on planted inputs whose answers are known and against independent
numpy: the gradient noise scale and per-row signal-to-noise (McCandlish et al. 2018), the smoothness
of a table along t, the low-frequency share (Yamamoto & Matsuzaki 2023) and the position probe
(Wang & Chen 2020); and the gradients the study draws from a model, against plain autograd."""
import json

import numpy as np
import pytest
import torch

from conftest import run_in_process, write_token_data
from geometry import (gradient_noise, low_frequency_chance, low_frequency_share, position_probe, smoothness)
from gulliver.circuits import batch_gradients
from model import GPT, GPTConfig

T, D, B = 64, 32, 8


def planted_gradients(k, sigma, rng):
    """k batch gradients (k, T, D) = a smooth signal s (one cycle along t, a phase per column) + noise
    independent for each entry, of variance sigma^2 per sequence, so sigma^2 / B for a batch of B."""
    t = np.arange(T)[:, None]
    signal = 0.01 * np.cos(2 * np.pi * t / T + np.linspace(0, np.pi, D)[None, :])
    return signal, signal + rng.normal(scale=sigma / np.sqrt(B), size=(k, T, D))


def statistics(g):
    """What batch_gradients hands to gradient_noise, from the stack of the batches' gradients."""
    return g.mean(0), (g ** 2).sum(-1).mean(0), (g ** 2).sum((1, 2)).mean()


def test_the_noise_and_signal_equal_an_independent_computation_from_the_batches():
    g = planted_gradients(12, 0.05, np.random.default_rng(0))[1]
    mean, mean_sq_rows, mean_sq = statistics(g)
    rows, whole = gradient_noise(mean, mean_sq_rows, 12, B), gradient_noise(mean, mean_sq, 12, B)
    noise_rows = np.var(g, axis=0, ddof=1).sum(-1)  # the unbiased variance of each entry over the batches
    signal_rows = (mean ** 2).sum(-1) - noise_rows / 12
    np.testing.assert_allclose(rows['noise'], noise_rows, rtol=1e-10)
    np.testing.assert_allclose(rows['snr'], signal_rows / noise_rows, rtol=1e-10)
    np.testing.assert_allclose(whole['b_simple'], B * noise_rows.sum() / signal_rows.sum(), rtol=1e-10)


def test_on_a_planted_gradient_the_noise_scale_and_each_rows_signal_are_recovered():
    # 400 draws of K = 16 batches; S / K is about the signal itself, so an estimate that left the noise
    # of the mean of K batches in |G|^2 would double it
    rng, k, sigma = np.random.default_rng(1), 16, 0.08
    signal = planted_gradients(1, sigma, rng)[0]
    draws = [gradient_noise(*statistics(planted_gradients(k, sigma, rng)[1])[::2], k, B) for _ in range(400)]
    rows = [gradient_noise(*statistics(planted_gradients(k, sigma, rng)[1])[:2], k, B) for _ in range(400)]
    true_noise, true_signal = T * D * sigma ** 2 / B, (signal ** 2).sum()
    assert np.mean([d['noise'] for d in draws]) == pytest.approx(true_noise, rel=0.01)
    assert np.mean([d['signal'] for d in draws]) == pytest.approx(true_signal, rel=0.05)
    assert true_noise / k == pytest.approx(true_signal, rel=0.3)  # the correction is as large as the signal
    b_simple = B * np.mean([d['noise'] for d in draws]) / np.mean([d['signal'] for d in draws])
    assert b_simple == pytest.approx(T * D * sigma ** 2 / true_signal, rel=0.05)  # B_simple: tr(Sigma_1)/|G|^2
    row_signal = np.mean([r['signal'] for r in rows], axis=0)
    np.testing.assert_allclose(row_signal, (signal ** 2).sum(1), rtol=0.2)


def test_the_mean_gradient_is_smooth_where_one_batch_is_rows_of_independent_noise():
    # the mean of 4,000 batches keeps a noise of 1e-4 an entry beside steps of 1e-3 along t; one batch
    # whose noise (0.18) drowns the signal (0.01) is rows of independent noise
    rng = np.random.default_rng(2)
    signal, g = planted_gradients(4000, 0.02, rng)
    mean, one = smoothness(g.mean(0)), smoothness(planted_gradients(1, 0.5, rng)[1][0])
    exact = smoothness(signal)
    assert exact["cos_delta"] > 0.99  # a closed curve of one cycle: each step turns by about 2 pi / T
    assert exact['low_freq_share'] == pytest.approx(1.0) and exact['cos_k1'] > 0.99
    assert mean['cos_delta'] > 0.9 and mean['low_freq_share'] > 0.9
    assert one['cos_delta'] == pytest.approx(-0.5, abs=0.06)  # differences of independent rows
    assert one['low_freq_share'] == pytest.approx(low_frequency_chance(T), abs=0.05)


def test_the_low_frequency_share_equals_the_full_spectrum_and_its_chance_level():
    rng = np.random.default_rng(3)
    for n in (64, 65):  # an even T has a lone highest frequency, an odd one none
        P = rng.normal(size=(n, 16)) + np.linspace(0, 3, n)[:, None]
        power = (np.abs(np.fft.fft(P - P.mean(0), axis=0)) ** 2).sum(1)  # the two-sided spectrum
        low = power[1:5].sum() + power[n - 4:].sum()  # 1..4 cycles, and their mirror images
        assert low_frequency_share(P) == pytest.approx(low / power[1:].sum(), rel=1e-12)
        shares = [low_frequency_share(rng.normal(size=(n, 16))) for _ in range(300)]
        assert np.mean(shares) == pytest.approx(low_frequency_chance(n), rel=0.05)
        assert low_frequency_chance(n) == pytest.approx(8 / (n - 1), rel=1e-12)


def test_the_position_probe_equals_ridge_regression_in_its_primal_form():
    rng = np.random.default_rng(4)
    for P in (rng.normal(size=(40, 8)), rng.normal(size=(40, 100)), np.arange(40)[:, None] * rng.normal(size=(1, 8))
              + rng.normal(size=(40, 8))):
        order, errors = np.random.default_rng(0).permutation(len(P)), []
        for held in np.array_split(order, 5):
            train = np.setdiff1d(order, held)
            mean, std = P[train].mean(0), P[train].std(0)
            X, Xh = (P[train] - mean) / std, (P[held] - mean) / std
            # w = (X^T X + d I)^-1 X^T (t - mean t): the primal solution, by least squares on stacked rows
            A = np.vstack([X, np.sqrt(P.shape[1]) * np.eye(P.shape[1])])
            w = np.linalg.lstsq(A, np.r_[train - train.mean(), np.zeros(P.shape[1])], rcond=None)[0]
            errors.append(np.abs(Xh @ w + train.mean() - held))
        assert position_probe(P) == pytest.approx(np.concatenate(errors).mean(), rel=1e-9)
    line = np.arange(40)[:, None] * np.ones((1, 8)) + 0.01 * rng.normal(size=(40, 8))
    assert position_probe(line) < 0.5 < 10 < position_probe(rng.normal(size=(40, 8)))  # chance: about T/3


def test_the_batch_gradients_are_those_of_autograd_batch_by_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=50, n_layer=1, n_head=2, n_embd=16)).eval()
    batches = [(torch.randint(0, 50, (3, 8)), torch.randint(0, 50, (3, 8))) for _ in range(4)]
    names = {'W_pos': model.transformer.wpe.weight, 'W_E': model.transformer.wte.weight}
    sums, k = batch_gradients(model, batches, names)
    assert k == 4
    for label, parameter in names.items():
        grads = [torch.autograd.grad(model(x, y)[1], parameter)[0].double().numpy() for x, y in batches]
        np.testing.assert_allclose(sums[label]['mean'], np.mean(grads, 0), rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(sums[label]['mean_sq_rows'], np.mean([(g ** 2).sum(1) for g in grads], 0),
                                   rtol=1e-6)
        np.testing.assert_allclose(sums[label]['first'], grads[0], rtol=1e-6, atol=1e-12)


def test_analyze_writes_the_gradient_noise_and_the_published_measures_of_a_run(tmp_path):
    pattern = np.random.default_rng(0).integers(0, 500, 50)
    write_token_data(tmp_path / 'data', np.resize(pattern, 3000), np.resize(pattern, 500))
    result = run_in_process('train.py', f'--data_dir={tmp_path / "data"}', f'--out_dir={tmp_path / "out"}',
                            '--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=16', '--batch_size=4',
                            '--max_iters=4', '--eval_interval=4', '--eval_iters=1', '--snapshot_interval=2',
                            '--sample_tokens=0', '--peak_flops=1e12', '--dtype=float32')
    assert result.returncode == 0, result.stderr
    result = run_in_process('analyze.py', f'--out_dir={tmp_path / "out"}', f'--report_dir={tmp_path / "r"}',
                            '--top_n=300', '--eval_tokens=64', '--noise_batches=5')
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / 'r' / 'report.json').read_text())
    noise = report['gradient_noise']
    assert noise['batches'] == 5 and noise['batch_shape'] == [4, 16] and len(noise['snr']) == 16
    assert set(noise['b_simple']) == {'W_pos', 'W_E', 'layer 0 W_QKV'}
    for key in ('mean_gradient', 'single_batch'):
        assert set(noise[key]) == {'cos_k1', 'cos_delta', 'low_freq_share'}
    onset = report['onset']
    assert onset['chance']['low_freq_share'] == pytest.approx(low_frequency_chance(16))
    for record in onset['records']:
        assert 0 <= record['W_pos']['low_freq_share'] <= 1 and record['W_pos']['probe_mae'] > 0
    assert '## The gradient of W_pos: signal and noise' in (tmp_path / 'r' / 'report.md').read_text()
