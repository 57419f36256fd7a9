import dataclasses
import json
import os
import shutil

import matplotlib.pyplot as plt

import numpy as np
import pytest
import torch

from gulliver.circuits import logit_lens, qk_decomposition, residual_stream
from conftest import ROOT, run_in_process
from geometry import (analogy, anisotropy, contextual_geometry, cosine_matrix, drift_vs_frequency, exp_fit,
                      linear_cka, mean_cos_by_distance, nearest_neighbours, nn_overlap, occurrences_by_type,
                      positional_geometry, procrustes_cos, rankdata, rsa, similarity, spearman, type_means, unit_rows)
from model import GPT, GPTConfig
from gulliver.report import save
from gulliver.comparison import seed_replicas, training_markdown, training_study
from gulliver.onset import onset_markdown, onset_study
from gulliver.sections import dynamics_markdown, loss_markdown, loss_study
from gulliver.tokenizer import VOCAB_SIZE, get_tokenizer

POSITIONAL_KEYS = {'norms', 'mean_cos_by_distance', 'exp_fit', 'pca_explained_variance', 'n_components_80',
                   'n_components_90', 'pc_abs_corr_with_position', 'delta_consecutive_cos_mean', 'linear_fit_r2'}
TEXT = ("The king and the queen walked by the sea. A man and a woman rode a horse to the ship. The giant was "
        "not small, said the king to the men and women. He took his hat and she took her book. England is "
        "great and France is greater; the English and the French are smaller. ")


def random_orthogonal(d, rng):
    return np.linalg.qr(rng.standard_normal((d, d)))[0]


def helix(T, freqs):
    """p_t = (cos w_1 t, sin w_1 t, cos w_2 t, sin w_2 t, ...): cos(p_t, p_t+k) = mean_j cos(w_j k)."""
    t = np.arange(T)[:, None]
    return np.concatenate([np.cos(t * np.array(freqs)), np.sin(t * np.array(freqs))], axis=1)


# ---- synthetic geometry with known answers ---------------------------------------------------

def test_straight_line_is_one_direction():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(16), rng.standard_normal(16)
    P = a + np.arange(64)[:, None] * b + 1e-4 * rng.standard_normal((64, 16))
    g = positional_geometry(P)
    assert set(g) == POSITIONAL_KEYS
    assert g['delta_consecutive_cos_mean'] > 0.999
    assert g['linear_fit_r2'] > 0.9999
    assert g['pca_explained_variance'][0] > 0.99 and g['n_components_80'] == 1 and g['n_components_90'] == 1
    assert g['pc_abs_corr_with_position'][0] > 0.9999
    assert np.allclose(g['norms'], np.linalg.norm(P, axis=1))


def test_helix_cosine_depends_only_on_distance_as_the_closed_form_says():
    freqs = [0.05, 0.2, 0.7]
    P = helix(100, freqs)
    C = cosine_matrix(P)
    for k in (1, 7, 40):
        assert np.allclose(np.diagonal(C, k), np.diagonal(C, k)[0], atol=1e-12)  # Toeplitz
    expected = np.cos(np.outer(np.arange(100), freqs)).mean(1)
    assert np.allclose(mean_cos_by_distance(P), expected, atol=1e-12)
    g = positional_geometry(P)
    assert g['n_components_90'] <= 6 and abs(g['linear_fit_r2']) < 0.2
    assert g['delta_consecutive_cos_mean'] < 0.9  # a curve, not a line


def test_isotropic_gaussian_has_no_structure():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((4000, 64))
    aniso = anisotropy(W)
    assert abs(aniso['raw']) < 0.003 and abs(aniso['centred']) < 0.003
    g = positional_geometry(W[:256])
    assert abs(np.mean(g['mean_cos_by_distance'][1:100])) < 0.01
    assert g['linear_fit_r2'] < 0.02 and g['pca_explained_variance'][0] < 0.1
    assert max(g['pc_abs_corr_with_position']) < 0.3
    # differences of independent vectors: cos(p1 - p0, p2 - p1) has mean -1/2
    assert abs(g['delta_consecutive_cos_mean'] + 0.5) < 0.05


def test_anisotropy_matches_brute_force_and_sees_a_shared_direction():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((50, 8)) + np.array([3.0] + [0.0] * 7)
    C = cosine_matrix(W)
    assert np.isclose(anisotropy(W)['raw'], C[~np.eye(50, dtype=bool)].mean())
    # x = 3 e_1 + noise in 8 dimensions: cos(x_i, x_j) ~ 9 / (9 + 8)
    assert abs(anisotropy(W)['raw'] - 9 / 17) < 0.05 and abs(anisotropy(W)['centred']) < 0.05
    # all-zero rows (tokens an embedding never trained) have no direction and do not count
    assert np.isclose(anisotropy(np.vstack([W, np.zeros((30, 8))]))['raw'], anisotropy(W)['raw'])


def test_anisotropy_leaves_zero_rows_out_before_centring():
    # SGNS and GloVe keep all-zero rows for the tokens they never saw: 900 of them beside 300 trained
    W = np.random.default_rng(3).standard_normal((300, 16)) + 0.5
    with_zeros = anisotropy(np.vstack([W, np.zeros((900, 16))]))
    assert with_zeros == anisotropy(W)
    assert abs(with_zeros['centred']) < 0.01 and with_zeros['raw'] > 0.1  # a shared offset, then none


def test_drift_vs_frequency_sign_and_size_on_planted_drifts():
    rng = np.random.default_rng(4)
    counts = np.r_[rng.integers(1, 5000, 500), np.zeros(100, dtype=int)]  # 100 tokens never seen
    W0 = rng.standard_normal((600, 8))
    direction = unit_rows(rng.standard_normal((600, 8)))
    rare_move_more = W0 + direction / np.sqrt(np.maximum(counts, 1))[:, None]
    assert drift_vs_frequency(W0, rare_move_more, counts) == pytest.approx(-1)
    assert drift_vs_frequency(W0, W0 + direction * np.log1p(counts)[:, None], counts) == pytest.approx(1)
    noisy = W0 + direction * (1 + 0.5 * rng.random(600))[:, None] / np.sqrt(np.maximum(counts, 1))[:, None]
    assert -0.97 < drift_vs_frequency(W0, noisy, counts) < -0.8
    assert drift_vs_frequency(W0, W0 + direction, counts) == pytest.approx(0, abs=0.1)  # drift unrelated to count


# ---- static vs contextual: known answers ----------------------------------------------------

def occurrences(n_types=60, windows=40, window=32, seed=5):
    """Token ids of windows x window occurrences, Zipf-like, and the types seen at least 5 times."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(n_types, windows * window, p=1 / np.arange(1, n_types + 1) / (1 / np.arange(1, n_types + 1)).sum())
    types, counts = np.unique(ids, return_counts=True)
    return ids, types[counts >= 5]


def test_a_static_table_is_fully_self_similar():
    # the "model" returns the input embedding at every occurrence: cos(h_i, h_j) = 1 for two occurrences of a type
    ids, types = occurrences()
    E = np.random.default_rng(6).standard_normal((60, 24)) + 1.0  # a shared offset: anisotropic
    g = contextual_geometry(E[ids], ids, types, window=32)
    assert g['anisotropy'] > 0.3
    assert g['self_similarity'] == pytest.approx(1 - g['anisotropy'], abs=1e-12)
    assert np.allclose(list(g['self_similarity_by_type'].values()), 1 - g['anisotropy'], atol=1e-12)
    assert g['pc_share'] == pytest.approx(1, abs=1e-12) and g['pc_share_random'] < 0.9
    assert np.allclose(type_means(E[ids], ids, types), E[types], atol=1e-12)
    assert linear_cka(type_means(E[ids], ids, types), E[types]) == pytest.approx(1)


def test_noise_per_occurrence_is_not_self_similar():
    ids, types = occurrences()
    H = np.random.default_rng(7).standard_normal((len(ids), 256))
    g = contextual_geometry(H, ids, types, window=32)
    assert abs(g['anisotropy']) < 0.005 and abs(g['self_similarity']) < 0.01
    assert abs(g['pc_share'] - g['pc_share_random']) < 0.02
    assert g['intra_context'] == pytest.approx(1 / np.sqrt(32), abs=0.02)  # the mean includes the vector itself


def test_intra_context_is_one_when_a_window_shares_one_vector():
    ids, types = occurrences()
    rng = np.random.default_rng(8)
    H = np.repeat(rng.standard_normal((40, 24)), 32, axis=0)  # every occurrence in window b is v_b
    g = contextual_geometry(H, ids, types, window=32)
    assert g['intra_context'] == pytest.approx(1 - g['anisotropy'], abs=1e-12)
    groups = occurrences_by_type(ids, types)
    assert [sorted(g.tolist()) for g in groups] == [np.flatnonzero(ids == t).tolist() for t in types]


def test_exp_fit_recovers_the_decay_rate():
    curve = np.exp(-0.05 * np.arange(200))
    fit = exp_fit(curve)
    assert abs(fit['alpha'] - 0.05) < 0.0005 and fit['r2'] > 0.9999 and not fit['at_edge']
    # a W_pos whose mean cosine is 1 at k = 0 and just below 0 after: all the R^2 is the point at k = 0
    floor = exp_fit(np.r_[1.0, np.full(127, -0.01)])
    assert floor['alpha'] == 10 and floor['r2'] > 0.95 and floor['at_edge']
    assert exp_fit(np.cos(0.1 * np.arange(200)))['r2'] < 0.5  # an oscillation is no exponential


def test_ranks_with_ties_and_spearman():
    assert rankdata(np.array([10, 20, 20, 30, 20])).tolist() == [1, 3, 3, 5, 3]
    x = np.random.default_rng(3).standard_normal(100)
    assert np.isclose(spearman(x, np.exp(x)), 1) and np.isclose(spearman(x, -x ** 3), -1)
    assert np.isclose(spearman([1, 2, 3, 4], [1, 3, 2, 4]), 0.8)
    assert np.isnan(spearman([1, 2, 3, np.nan], [4, 3, 2, 1]))  # not -1: a NaN is no largest value


@pytest.mark.parametrize('d_out', [16, 24])
def test_rotated_copy_is_the_same_geometry(d_out):
    rng = np.random.default_rng(4)
    A = rng.standard_normal((300, 16))
    B = A @ random_orthogonal(d_out, rng)[:16]  # a rotation, into more dimensions when d_out > 16
    s = similarity(A, B)
    assert np.isclose(s['procrustes_cos'], 1) and np.isclose(s['cka'], 1)
    assert s['nn_overlap_10'] == 1 and np.isclose(s['rsa'], 1)


def test_neighbour_overlap_is_nan_where_every_row_neighbours_all_the_others():
    rng = np.random.default_rng(6)
    A, B = rng.standard_normal((11, 4)), rng.standard_normal((11, 4))
    assert np.isnan(nn_overlap(A, B))  # each row's 10 nearest are the other 10: overlap 1 whatever A and B are
    A, B = rng.standard_normal((12, 4)), rng.standard_normal((12, 4))
    assert 0 <= nn_overlap(A, B) < 1 and nn_overlap(A, A) == 1


def test_independent_random_matrices_are_unrelated():
    rng = np.random.default_rng(5)
    A, B = rng.standard_normal((1000, 16)), rng.standard_normal((1000, 16))
    assert linear_cka(A, B) < 0.05
    assert abs(rsa(A, B)) < 0.02
    assert nn_overlap(A, B) < 0.05
    assert procrustes_cos(A, B) < 0.3
    # a copy with some noise sits in between
    noisy = A + 0.5 * rng.standard_normal(A.shape)
    assert 0.5 < linear_cka(A, noisy) < 0.95 and 0.2 < nn_overlap(A, noisy) < 0.9


def test_rsa_is_a_rank_correlation_of_the_cosines():
    # B's cosines are A's cubed, a monotone function of them: B exists because the elementwise cube of
    # a cosine matrix is positive semi-definite (Schur's product theorem) with a unit diagonal, so
    # B = V sqrt(L) from its eigendecomposition. The ranks agree: Spearman's rho is 1, Pearson's r 0.84
    def cosines(X):  # every pair i < j, independently of geometry.py
        unit = X / np.linalg.norm(X, axis=1, keepdims=True)
        return (unit @ unit.T)[np.triu_indices(len(X), 1)]
    rng = np.random.default_rng(7)
    A = rng.standard_normal((40, 8))
    unit = A / np.linalg.norm(A, axis=1, keepdims=True)
    eigenvalues, V = np.linalg.eigh((unit @ unit.T) ** 3)
    B = V * np.sqrt(eigenvalues.clip(0))
    assert np.allclose(cosines(B), cosines(A) ** 3, atol=1e-12) and np.corrcoef(cosines(A), cosines(B))[0, 1] < 0.9
    assert rsa(A, B) == pytest.approx(1, abs=1e-12)
    # and on a noisy copy: the Pearson correlation of the cosines' ranks (a double argsort: no ties)
    noisy = A + rng.standard_normal(A.shape)
    ranks = lambda X: cosines(X).argsort().argsort()
    assert rsa(A, noisy) == pytest.approx(np.corrcoef(ranks(A), ranks(noisy))[0, 1], abs=1e-12)


def test_procrustes_aligns_by_an_orthogonal_map_alone():
    # B: A's rows stretched 10 times along one axis, then rotated. A general linear map (least squares)
    # would undo most of the stretch (mean cos 0.96); an orthogonal R cannot (0.70). The reference: R is
    # the orthogonal polar factor M (M^T M)^(-1/2) of M = Au^T Bu, here from the eigendecomposition of M^T M
    rng = np.random.default_rng(8)
    A = rng.standard_normal((200, 6))
    B = (A * [1, 1, 1, 1, 1, 10]) @ random_orthogonal(6, rng)
    Au, Bu = (X / np.linalg.norm(X, axis=1, keepdims=True) for X in (A, B))
    M = Au.T @ Bu
    eigenvalues, Q = np.linalg.eigh(M.T @ M)
    R = M @ Q @ np.diag(eigenvalues ** -0.5) @ Q.T
    assert np.allclose(R.T @ R, np.eye(6), atol=1e-12)
    mapped = Au @ R
    expected = ((mapped / np.linalg.norm(mapped, axis=1, keepdims=True)) * Bu).sum(1).mean()
    assert procrustes_cos(A, B) == pytest.approx(expected, abs=1e-12) and expected < 0.75


def test_analogy_and_neighbours_on_a_constructed_embedding():
    rng = np.random.default_rng(6)
    royal, person, male, female = 4 * random_orthogonal(32, rng)[:4]
    W = 0.3 * rng.standard_normal((40, 32))
    W[:4] = [royal + male, royal + female, person + male, person + female]  # king, queen, man, woman
    king, queen, man, woman = range(4)
    result = analogy(W, man, king, woman, queen, k=3)
    assert result['top_excluding_inputs'][0] == queen and result['rank_excluding_inputs'] == 1
    assert queen in result['top'][:2] and result['rank'] <= 2
    assert analogy(W, man, king, woman, 10)['rank_excluding_inputs'] > 1
    neighbours = nearest_neighbours(W, king, k=2)
    assert {i for i, _ in neighbours} == {queen, man} and king not in [i for i, _ in nearest_neighbours(W, king, 39)]
    assert np.isclose(neighbours[0][1], 0.5, atol=0.1)
    # searching only some candidates
    assert [i for i, _ in nearest_neighbours(W, king, 1, candidates=np.array([0, 2, 7]))] == [man]


# ---- the model studies -----------------------------------------------------------------------

def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=32), **overrides})
    return GPT(config).eval()


def test_layer0_decomposition_adds_up_to_the_models_scores():
    model = tiny_model(n_head=4, block_size=16)
    block = model.transformer.h[0]
    with torch.no_grad():  # non-trivial LayerNorm and biases, so that every part is present
        for p, std in ((block.ln_1.weight, 1), (block.ln_1.bias, 0.3), (block.attn.c_attn.weight, 0.3),
                       (block.attn.c_attn.bias, 0.3), (model.transformer.wpe.weight, 0.02)):
            p.normal_(std=std)
    x = torch.randint(0, 50257, (3, 16))
    r = qk_decomposition(model, x)
    assert r['max_abs_error'] < 1e-5 and r['max_abs_score'] > 0.1
    share = np.array(r['share_by_head'])
    assert share.shape == (4, 5) and np.allclose(share.sum(1), 1, atol=1e-4)
    assert np.all(np.abs(share) > 1e-3)
    with torch.no_grad():  # no positions: the three position parts vanish
        model.transformer.wpe.weight.zero_()
    share = np.array(qk_decomposition(model, x)['share_by_head'])
    assert np.allclose(share[:, 1:4], 0, atol=1e-6) and np.allclose(share[:, [0, 4]].sum(1), 1, atol=1e-4)


def test_logit_lens_ends_at_the_models_own_loss():
    model = tiny_model()
    x, y = torch.randint(0, 50257, (2, 2, 32))
    losses = logit_lens(model, x, y)
    assert len(losses) == 3
    assert abs(losses[-1] - model(x, y)[1].item()) < 1e-4


def test_residual_stream_starts_at_the_embeddings_and_ends_at_the_trunk():
    model = tiny_model()
    x = torch.randint(0, 50257, (3, 32))
    stream = residual_stream(model, x)
    assert len(stream) == 3 and all(h.shape == (3, 32, 32) for h in stream)
    with torch.no_grad():
        assert torch.allclose(stream[0], model.transformer.wte(x) + model.W_pos, atol=1e-6)
        assert torch.allclose(stream[1], model.transformer.h[0](stream[0]), atol=1e-6)
        assert torch.allclose(model.transformer.ln_f(stream[-1]), model.trunk(x), atol=1e-6)


def test_a_position_table_too_short_or_of_integers_is_one_line(tmp_path):
    np.save(tmp_path / 'short.npy', np.zeros((7, 4), np.float32))
    np.save(tmp_path / 'ints.npy', np.zeros((10, 4), np.int64))
    for name, message in (('short.npy', 'at least 8 rows, got 7'), ('ints.npy', 'expected a float matrix')):
        result = run_in_process('analyze.py', f'--wpe_file={tmp_path / name}', f'--report_dir={tmp_path / "report"}')
        assert result.returncode == 1 and result.stderr.startswith('error: --wpe_file: ') and message in result.stderr
        assert result.stderr.count('\n') == 1 and not (tmp_path / 'report').exists()


# ---- analyze.py end to end -------------------------------------------------------------------

def save_checkpoint(model, path, data_dir, seed=0):
    torch.save({'model': model.state_dict(), 'model_args': dataclasses.asdict(model.config),
                'config': {'data_dir': str(data_dir), 'seed': seed, 'objective': 'clm'},
                'iter_num': 0, 'best_val_loss': 9.9}, path)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """A tiny checkpoint with log.jsonl and two snapshots, and a data_dir written from TEXT."""
    root = tmp_path_factory.mktemp('analyze')
    enc = get_tokenizer()
    data_dir, out_dir = root / 'data', root / 'out'
    os.makedirs(data_dir)
    os.makedirs(out_dir / 'snapshots')
    np.array(enc.encode_ordinary(TEXT * 8), np.uint16).tofile(data_dir / 'train.bin')
    np.array(enc.encode_ordinary(TEXT * 6), np.uint16).tofile(data_dir / 'val.bin')  # each word 6+ times
    model = tiny_model()
    np.savez(out_dir / 'snapshots' / 'iter_000000.npz', W_E=model.W_E.detach().half().numpy(),
             W_pos=model.W_pos.detach().half().numpy())
    with torch.no_grad():
        model.transformer.wte.weight[enc.encode_ordinary(TEXT)] += 0.1
        model.transformer.wpe.weight.copy_(torch.from_numpy(helix(32, [0.1, 0.3]).repeat(8, axis=1)))
    np.savez(out_dir / 'snapshots' / 'iter_000100.npz', W_E=model.W_E.detach().half().numpy(),
             W_pos=model.W_pos.detach().half().numpy())
    save_checkpoint(model, out_dir / 'ckpt.pt', data_dir)
    with open(out_dir / 'log.jsonl', 'w') as f:
        for i in range(0, 101, 10):
            f.write(json.dumps({'event': 'train', 'iter': i, 'loss': 11 - i / 20, 'lr': 1e-3}) + '\n')
        f.write(json.dumps({'event': 'eval', 'iter': 100, 'train_loss': 6.0, 'val_loss': 6.5,
                            'val_bpb': 2.25}) + '\n')
        f.write('{"event": "train", "it')  # cut short, as while train.py is still writing
    Q = torch.from_numpy(random_orthogonal(32, np.random.default_rng(7))).float()
    os.makedirs(root / 'rotated')  # W_E.npy: the checkpoint's W_E, rotated
    np.save(root / 'rotated' / 'W_E.npy', (model.W_E @ Q).detach().numpy())
    os.makedirs(root / 'seed2')  # a checkpoint whose W_E and W_pos are rotated copies
    other = tiny_model(seed=1)
    with torch.no_grad():
        other.transformer.wte.weight.copy_(model.transformer.wte.weight @ Q)
        other.transformer.wpe.weight.copy_(model.transformer.wpe.weight @ Q)
    save_checkpoint(other, root / 'seed2' / 'ckpt.pt', data_dir, seed=1)
    return root, model


def test_analyze_checkpoint_end_to_end(run):
    root, model = run
    report_dir = root / 'report'
    result = run_in_process('analyze.py', f'--out_dir={root / "out"}', f'--report_dir={report_dir}',
                        f'--compare_out_dir={root / "seed2"}', '--probes', 'Lilliput', 'hat', '--device=cpu')
    assert result.returncode == 0, result.stderr
    report = json.loads((report_dir / 'report.json').read_text())
    assert {'source', 'loss', 'positional', 'attention_layer0', 'tokens', 'logit_lens', 'dynamics', 'stability',
            'figures', 'notes'} <= set(report)
    assert POSITIONAL_KEYS <= set(report['positional'])
    expected = np.cos(np.outer(np.arange(32), [0.1, 0.3])).mean(1)  # the helix planted in W_pos
    assert np.allclose(report['positional']['mean_cos_by_distance'], expected, atol=1e-5)
    assert report['attention_layer0']['max_abs_error'] < 1e-5
    assert np.allclose(np.sum(report['attention_layer0']['share_by_head'], 1), 1, atol=1e-3)
    assert len(report['logit_lens']['loss_by_layer']) == 3
    assert report['loss'] == {'last_iter': 100, 'last_train_loss': 6.0, 'last_val_loss': 6.5, 'last_val_bpb': 2.25,
                              'best_val_loss': 6.5}
    tokens = report['tokens']
    assert set(tokens['neighbours']) == {' king', ' queen', ' man', ' woman', ' ship', ' sea', ' horse', ' giant',
                                         ' small', ' hat'}
    assert any("' Lilliput' is not a single GPT-2 token" in n for n in report['notes'])
    seen = len(set(get_tokenizer().encode_ordinary(TEXT)))
    assert tokens['norm_frequency']['n_seen'] == seen and tokens['candidates'] == seen
    # the seen rows got +0.1 in every coordinate, so they are longer than the untouched ones
    assert tokens['norm_frequency']['mean_norm_seen'] > tokens['norm_frequency']['mean_norm_unseen']
    assert report['dynamics']['iters'] == [0, 100]
    assert report['dynamics']['drift_median']['unseen'] == [0, 0] and report['dynamics']['drift_median']['1-9'][1] > 0.4
    for table, rsa_tol in (('W_E', 1e-4), ('W_pos', 5e-3)):  # the helix's many tied cosines round apart
        assert abs(report['stability'][table]['rsa'] - 1) < rsa_tol
        for key in ('procrustes_cos', 'cka', 'nn_overlap_10'):
            assert abs(report['stability'][table][key] - 1) < 1e-4, (table, key)
        chance = report['stability'][table]['chance']  # the same rows in another order
        assert abs(chance['rsa']) < 0.2 and chance['cka'] < 0.9 and chance['nn_overlap_10'] < 0.5, (table, chance)
    assert 'W_E, rows shuffled (chance) |' in (report_dir / 'report.md').read_text()
    assert report['stability']['tokens_compared'] == (np.bincount(get_tokenizer().encode_ordinary(TEXT * 8)) >= 5).sum()
    for name in report['figures']:
        assert (report_dir / name).stat().st_size > 5000
    assert {'positional_cosine.png', 'positional_pca.png', 'attention_layer0.png', 'token_norm_frequency.png',
            'logit_lens.png', 'dynamics_drift.png', 'dynamics_positional.png', 'loss.png'} <= set(report['figures'])
    md = (report_dir / 'report.md').read_text()
    assert '![positional_cosine.png](positional_cosine.png)' in md and '| king - man + woman |' in md
    # the logit lens' last layer is the model's own val loss on the same tokens
    val = torch.from_numpy(np.fromfile(root / 'data' / 'val.bin', np.uint16).astype(np.int64))
    n = (len(val) - 1) // 32 * 32
    _, loss = model(val[:n].view(-1, 32), val[1:n + 1].view(-1, 32))
    assert abs(report['logit_lens']['loss_by_layer'][-1] - loss.item()) < 1e-4


def abs_corr_with_position(P):
    """Independent of geometry.py: the largest abs Pearson correlation of a PC1-PC3 score with t."""
    X = P - P.mean(0)
    U, S, _ = np.linalg.svd(X, full_matrices=False)
    return max(abs(np.corrcoef(U[:, i] * S[i], np.arange(len(P)))[0, 1]) for i in range(3))


ONSET_ITERS = [0, 50, 100, 150, 200, 250]


def planted_tables(ramp, seed=3):
    """{iteration: W_pos (32, 32)} = P0 + ramp[k] R + noise: R grows along one direction with t."""
    rng = np.random.default_rng(seed)
    P0, u = rng.normal(0, 0.02, (32, 32)), rng.normal(size=32)
    R = np.outer((np.arange(32) - 15.5) / 32, u / np.linalg.norm(u))
    return {i: (P0 + a * R + (rng.normal(0, 0.005, (32, 32)) if i else 0)).astype(np.float16)
            for i, a in zip(ONSET_ITERS, ramp)}


def first_onset(tables, learned):
    """Independent of geometry.py: the first iteration whose abs corr(PC, t) reaches 0.9, or None."""
    P = {i: tables[i].astype(np.float64) - (tables[0] if learned else 0) for i in tables if i or not learned}
    return next((i for i in sorted(P) if abs_corr_with_position(P[i]) >= 0.9), None)


def test_onset_of_a_planted_direction_along_position(run, tmp_path):
    root, _ = run
    out = tmp_path / 'out'
    os.makedirs(out / 'snapshots')
    shutil.copy(root / 'out' / 'ckpt.pt', out / 'ckpt.pt')
    tables = planted_tables([0, 0, 0, 0.5, 1, 1])  # the direction appears at iteration 150
    for i, P in tables.items():
        np.savez(out / 'snapshots' / f'iter_{i:06d}.npz', W_E=np.zeros((VOCAB_SIZE, 32), np.float16), W_pos=P)
    with open(out / 'log.jsonl', 'w') as f:
        f.write(json.dumps({'event': 'start', 'iter': 0, 'tokens_per_iter': 256}) + '\n')
        for i in (0, 100, 200):
            f.write(json.dumps({'event': 'eval', 'iter': i, 'train_loss': 9 - i / 100, 'val_loss': 9.5 - i / 100}) + '\n')
    reference = np.cumsum(np.random.default_rng(4).normal(size=(64, 32)), 0)  # a random walk: smooth in t
    np.save(tmp_path / 'reference.npy', reference)
    result = run_in_process('analyze.py', f'--out_dir={out}', f'--report_dir={tmp_path / "report"}', '--top_n=300',
                            f'--reference_wpe={tmp_path / "reference.npy"}', '--eval_tokens=64')
    assert result.returncode == 0, result.stderr
    onset = json.loads((tmp_path / 'report' / 'report.json').read_text())['onset']
    assert onset['onset_iter'] == first_onset(tables, learned=False)
    assert onset['onset_iter_learned'] == first_onset(tables, learned=True) == 150  # by construction
    train_tokens = len(np.fromfile(root / 'data' / 'train.bin', np.uint16))
    for r in onset['records']:
        i, P = r['iter'], tables[r['iter']].astype(np.float64)
        assert r['tokens_seen'] == 256 * i and r['passes'] == pytest.approx(256 * i / train_tokens, rel=1e-12)
        assert r['val_loss'] == (9.5 - i / 100 if i in (0, 100, 200) else None)
        assert r['W_pos']['pc_corr'] == pytest.approx(abs_corr_with_position(P), abs=1e-9)
        assert r['learned'] is None if i == 0 else \
            r['learned']['pc_corr'] == pytest.approx(abs_corr_with_position(P - tables[0]), abs=1e-9)
        unit = P / np.linalg.norm(P, axis=1, keepdims=True)
        assert r['W_pos']['cos_1'] == pytest.approx((unit[:-1] * unit[1:]).sum(1).mean(), abs=1e-9)
    assert onset['reference']['pc_corr'] == pytest.approx(abs_corr_with_position(reference[:32]), abs=1e-9)
    md = (tmp_path / 'report' / 'report.md').read_text()
    assert 'its learned part at iteration 150 (38,400 tokens' in md and '![onset.png](onset.png)' in md


def test_onset_not_reached_without_a_planted_direction(tmp_path):
    tables = planted_tables([0] * 6)
    out = onset_study(tables, [], 1000, [], None)  # no start events: the tokens seen are unknown
    md = onset_markdown(out, 1000, str(tmp_path))
    assert first_onset(tables, learned=False) is None and first_onset(tables, learned=True) is None
    assert out['onset_iter'] is None and out['onset_iter_learned'] is None
    assert 'Onset: W_pos not reached; its learned part not reached.' in ''.join(md)
    assert all(r['tokens_seen'] is None and r['passes'] is None for r in out['records'])


def test_wpe_file_alone(tmp_path):
    np.save(tmp_path / 'W_pos.npy', helix(40, [0.05, 0.4]).astype(np.float16))
    result = run_in_process('analyze.py', f'--wpe_file={tmp_path / "W_pos.npy"}', f'--report_dir={tmp_path / "r"}')
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / 'r' / 'report.json').read_text())
    assert set(report) == {'source', 'positional', 'figures', 'notes', 'seconds'}
    expected = np.cos(np.outer(np.arange(40), [0.05, 0.4])).mean(1)
    assert np.allclose(report['positional']['mean_cos_by_distance'], expected, atol=2e-3)  # float16 input
    assert report['positional']['n_components_90'] <= 4
    assert len(report['figures']) == 5 and all((tmp_path / 'r' / f).exists() for f in report['figures'])


def test_compare_a_checkpoint_with_a_rotated_w_e(run, tmp_path):
    root, _ = run
    result = run_in_process('analyze.py', '--compare', str(root / 'out'), str(root / 'rotated'), str(root / 'seed2'),
                        f'--report_dir={tmp_path}')
    assert result.returncode == 0, result.stderr
    full = json.loads((tmp_path / 'report.json').read_text())
    report = full['compare']
    names = [os.path.normpath(root / d) for d in ('out', 'rotated', 'seed2')]
    assert report['models'] == names and len(report['pairs']) == 3
    pair = report['pairs'][0]
    assert abs(pair['cka'] - 1) < 1e-4 and pair['nn_overlap_10'] == 1 and abs(pair['procrustes_cos'] - 1) < 1e-4
    assert pair['chance']['cka'] < 0.9 and pair['chance']['nn_overlap_10'] < 0.5
    a, b = (report['token_studies'][n] for n in names[:2])
    assert [t for t, _ in a['neighbours'][' king'][:3]] == [t for t, _ in b['neighbours'][' king'][:3]]
    assert np.allclose([c for _, c in a['neighbours'][' king']], [c for _, c in b['neighbours'][' king']], atol=1e-4)
    assert [x['rank_excluding_inputs'] for x in a['analogies']] == [x['rank_excluding_inputs'] for x in b['analogies']]
    assert (tmp_path / 'compare.png').stat().st_size > 10000 and 'compare.png' in (tmp_path / 'report.md').read_text()
    # the models' losses, from out/log.jsonl (seed2 has no log)
    assert full['training'] == {names[0]: {
        'objective': 'clm', 'seed': 0, 'sampler': None, 'iterations': 100, 'init_val_loss': None,
        'init_expected': pytest.approx(np.log(50257) + 32 * 0.02 ** 2 / 2), 'val_loss': 6.5,
        'perplexity': pytest.approx(np.exp(6.5)), 'val_bpb': 2.25, 'coverage': None}}
    # static vs contextual: the checkpoints by layer, the W_E.npy as one static "layer"
    contextual = full['contextual']
    out, static, seed2 = (contextual['models'][n] for n in names)
    assert contextual['window'] == 32 and contextual['types'] > 30
    assert len(out['layers']) == len(seed2['layers']) == 3 and len(static['layers']) == 1
    assert out['contextual'] and not static['contextual']
    rotated = static['layers'][0]
    assert rotated['self_similarity'] == pytest.approx(1 - rotated['anisotropy'], abs=1e-9)
    assert rotated['pc_share'] == pytest.approx(1) and rotated['cka'][names[1]] == pytest.approx(1)
    # seed2's token and position tables are rotated copies of out's: layer 0 has the same cosines, the blocks differ
    assert contextual['seed_pairs'] == [[names[0], names[2]]]
    for key in ('anisotropy', 'self_similarity', 'intra_context', 'pc_share'):
        assert out['layers'][0][key] == pytest.approx(seed2['layers'][0][key], abs=1e-5)
    assert contextual['seed_spread']['anisotropy'] > 1e-3
    assert out['layers'][0]['cka'][names[1]] == pytest.approx(seed2['layers'][0]['cka'][names[1]], abs=1e-5)
    assert {'contextual.png', 'contextual_cka.png'} <= set(full['figures'])
    assert '# Static vs contextual' in (tmp_path / 'report.md').read_text()


def test_a_position_table_of_few_rows_skips_the_positional_studies(run, tmp_path):
    # block_size 4: W_pos has 4 rows, too few for its studies; the token studies and the comparison still run
    root, _ = run
    for seed in (0, 1):
        os.makedirs(tmp_path / f'short{seed}')
        save_checkpoint(tiny_model(seed, block_size=4), tmp_path / f'short{seed}' / 'ckpt.pt', root / 'data')
    result = run_in_process('analyze.py', f'--out_dir={tmp_path / "short0"}', f'--compare_out_dir={tmp_path / "short1"}',
                            f'--report_dir={tmp_path / "report"}', '--top_n=300', '--eval_tokens=64')
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / 'report' / 'report.json').read_text())
    assert 'positional' not in report and 'tokens' in report and 'W_pos' not in report['stability']
    assert 'the position table has 4 rows (block_size): positional studies skipped, they need 8' in \
        (tmp_path / 'report' / 'report.md').read_text()


def test_compare_skips_the_contextual_study_when_no_token_repeats_in_val(run, tmp_path):
    root, _ = run
    os.makedirs(tmp_path / 'data')
    os.symlink(root / 'data' / 'train.bin', tmp_path / 'data' / 'train.bin')
    np.arange(1000, 1040, dtype=np.uint16).tofile(tmp_path / 'data' / 'val.bin')  # 40 distinct tokens
    result = run_in_process('analyze.py', '--compare', str(root / 'out'), str(root / 'rotated'),
                        f'--data_dir={tmp_path / "data"}', f'--report_dir={tmp_path / "r"}')
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / 'r' / 'report.json').read_text())
    assert 'contextual' not in report and 'contextual.png' not in report['figures']
    assert report['notes'] == ['static vs contextual skipped: no token occurs 5+ times in the val text']


@pytest.mark.parametrize('matrix, message', [
    (None, 'no such file'),
    (np.zeros(16, np.float32), 'expected a matrix (rows, d), got shape (16,)'),
    (np.where(np.eye(10, 4) == 1, np.nan, 0.5), '4 NaN or infinite entries'),
])
def test_bad_wpe_file_is_one_line_and_writes_nothing(tmp_path, matrix, message):
    path = tmp_path / 'W_pos.npy'
    if matrix is not None:
        np.save(path, matrix)
    result = run_in_process('analyze.py', f'--wpe_file={path}', f'--report_dir={tmp_path / "r"}')
    assert result.returncode != 0
    assert result.stderr.startswith('error: ') and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / 'r').exists()


def test_compare_reads_the_data_dir_from_embeddings_json(run, tmp_path):
    # run from a folder without data/gulliver: the token counts can only come from the folders' own record
    root, _ = run
    W = np.load(root / 'rotated' / 'W_E.npy')
    for name, data_dir in (('a', root / 'data'), ('b', root / 'data'), ('c', tmp_path / 'elsewhere')):
        os.makedirs(tmp_path / name)
        np.save(tmp_path / name / 'W_E.npy', W)
        (tmp_path / name / 'embeddings.json').write_text(json.dumps({'settings': {'data_dir': str(data_dir)}}))
    script = os.path.join(ROOT, 'analyze.py')
    same = run_in_process(script, '--compare', 'a', 'b', '--report_dir=r', cwd=tmp_path)
    assert same.returncode == 0, same.stderr
    assert json.loads((tmp_path / 'r' / 'report.json').read_text())['compare']['pairs'][0]['nn_overlap_10'] == 1
    mixed = run_in_process(script, '--compare', 'a', 'c', '--report_dir=r2', cwd=tmp_path)
    assert mixed.returncode == 1 and mixed.stderr.count('\n') == 1 and 'trained on different data' in mixed.stderr


def test_seed_replicas_differ_in_their_seed_alone():
    base = {'seed': 1, 'learning_rate': 1e-3, 'max_iters': 100, 'out_dir': 'a', 'compile': False}
    settings = {'a': base, 'b': {**base, 'seed': 2, 'out_dir': 'b', 'compile': True},  # bookkeeping apart
                'c': {**base, 'seed': 3, 'out_dir': 'c', 'max_iters': 600},  # trained longer
                'd': {**base, 'out_dir': 'd'}}  # a's seed: a rerun of a, a replica of b
    assert seed_replicas(settings) == [('a', 'b'), ('b', 'd')]


def test_a_non_finite_val_loss_in_the_log_is_left_out(tmp_path):
    evals = [{'event': 'eval', 'iter': i, 'train_loss': loss, 'val_loss': loss}
             for i, loss in ((0, 10.9), (5, 7.5), (10, None))]  # None: a NaN, as train.py writes it
    train = [{'event': 'train', 'iter': i, 'loss': 11 - i / 2} for i in range(11)]
    with open(tmp_path / 'log.jsonl', 'w') as f:
        f.writelines(json.dumps(e) + '\n' for e in train + evals)
    loss = loss_study(train, evals)
    loss_markdown(loss, tmp_path, tmp_path)  # the loss curve, drawn from log.jsonl, with the missing val loss
    assert loss['best_val_loss'] == 7.5 and loss['last_val_loss'] is None
    out = training_study(['run'], [{'seed': 0}], [tiny_model()], [evals])
    md = training_markdown(out)
    assert out['run']['perplexity'] is None and out['run']['init_val_loss'] == 10.9 
    assert '| run | clm | 0 |  | 10 | 10.9 | 10.83 |  |  |  |  |' in ''.join(md)  # the final loss and perplexity blank


def test_a_figure_is_written_whole_or_not_at_all(tmp_path):
    (tmp_path / 'x.png').write_bytes(b'the good figure')
    fig = plt.figure()

    def disk_full(path, **kwargs):
        open(path, 'wb').write(b'half a')
        raise OSError(28, 'No space left on device')
    fig.savefig = disk_full
    with pytest.raises(OSError):
        save(fig, tmp_path, 'x.png')
    assert os.listdir(tmp_path) == ['x.png'] and (tmp_path / 'x.png').read_bytes() == b'the good figure'


def test_the_dynamics_curves_take_the_colour_of_their_iteration(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr('gulliver.sections.save', lambda fig, report_dir, name: figures.append(fig) or '')
    iters = [0, 50, 100, 150, 153]
    dynamics_markdown({'iters': iters, 'drift_spearman_log_count': 0.5, 'drift_median': {'1-9': [0.0] * 5},
                       'pos_mean_cos_by_distance': [np.linspace(1, 0, 8)] * 5}, tmp_path)
    [fig] = figures
    colours = [line.get_color() for line in fig.axes[0].lines]
    assert np.allclose(colours, plt.cm.viridis(np.array(iters) / 153))  # as the colour bar, 0 to 153, says


def test_snapshots_in_the_order_of_their_iterations_and_non_finite_weights_are_one_line(run, tmp_path):
    root, _ = run
    shutil.copytree(root / 'out', tmp_path / 'out')
    snapshots = tmp_path / 'out' / 'snapshots'  # past iteration 999,999 the names no longer sort as text does
    os.rename(snapshots / 'iter_000000.npz', snapshots / 'iter_999999.npz')
    os.rename(snapshots / 'iter_000100.npz', snapshots / 'iter_1000000.npz')
    result = run_in_process('analyze.py', f'--out_dir={tmp_path / "out"}', f'--report_dir={tmp_path / "r"}',
                            '--top_n=300', '--eval_tokens=64')
    assert result.returncode == 0, result.stderr
    dynamics = json.loads((tmp_path / 'r' / 'report.json').read_text())['dynamics']
    assert dynamics['iters'] == [999999, 1000000] and dynamics['drift_median']['1-9'][0] == 0
    checkpoint = torch.load(tmp_path / 'out' / 'ckpt.pt', weights_only=True)
    checkpoint['model']['transformer.wpe.weight'][3, 5] = float('nan')
    torch.save(checkpoint, tmp_path / 'out' / 'ckpt.pt')
    result = run_in_process('analyze.py', f'--out_dir={tmp_path / "out"}', f'--report_dir={tmp_path / "r2"}')
    assert result.returncode == 1 and result.stderr.count('\n') == 1
    assert f'{tmp_path / "out" / "ckpt.pt"}: the model holds 1 NaN or infinite weights' in result.stderr
    assert not os.path.exists(tmp_path / 'r2')
