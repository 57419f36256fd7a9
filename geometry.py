"""
The geometry of an embedding matrix, as plain numpy functions: each takes arrays (rows are
vectors: W_E is (V, d), W_pos is (T, d)) and returns numbers, lists or dicts, so any of them
can be pasted into a notebook. gulliver/sections.py runs them on models for analyze.py's report.
"""
import numpy as np


def unit_rows(X):
    """Each row scaled to length 1 (an all-zero row stays zero)."""
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1)


def cosine_matrix(X):
    """cos(x_i, x_j) for every pair of rows, (n, n)."""
    U = unit_rows(X)
    return U @ U.T


def pearson(x, y):
    """Pearson correlation of two 1-D arrays (nan when one is constant)."""
    x, y = np.asarray(x, np.float64) - np.mean(x), np.asarray(y, np.float64) - np.mean(y)
    denominator = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denominator) if denominator > 0 else float('nan')


def rankdata(x):
    """Ranks 1..n, ties sharing their average rank (as Spearman's rho needs)."""
    x = np.asarray(x)
    order = np.argsort(x)  # any order within a run of ties: they share its mean rank
    sorted_x = x[order]
    first = np.r_[True, sorted_x[1:] != sorted_x[:-1]]  # where each run of equal values starts
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = ((starts + 1 + ends) / 2)[np.cumsum(first) - 1]  # mean of ranks starts+1 .. ends
    return ranks


def spearman(x, y):
    """Spearman rank correlation: the Pearson correlation of the ranks; nan where either holds a
    NaN (a NaN has no rank: sorted last, it would pass for the largest value)."""
    if np.isnan(x).any() or np.isnan(y).any():
        return float('nan')
    return pearson(rankdata(x), rankdata(y))


# ---- positional embeddings ------------------------------------------------------------------

def mean_cos_by_distance(P):
    """Entry k: the mean over t of cos(p_t, p_{t+k}), k = 0 .. T-1."""
    C = cosine_matrix(P)
    return np.array([np.diagonal(C, k).mean() for k in range(len(P))])


def exp_fit(curve):
    """Least-squares fit of curve[k] ~ exp(-alpha k) by a fine search over alpha; {alpha, r2,
    at_edge}. at_edge: the best alpha is an end of the search (1e-5 or 10), so no decay rate is
    resolved: a cosine that drops from 1 at k = 0 to a floor at once fits alpha = 10 with a high
    R^2, all of it from the point at k = 0."""
    k = np.arange(len(curve))
    alphas = np.geomspace(1e-5, 10, 4000)  # steps of 0.35%
    sse = ((curve[None, :] - np.exp(-alphas[:, None] * k[None, :])) ** 2).sum(1)
    best = int(np.argmin(sse))
    total = ((curve - curve.mean()) ** 2).sum()
    return {'alpha': float(alphas[best]), 'r2': float(1 - sse[best] / total) if total > 0 else float('nan'),
            'at_edge': best in (0, len(alphas) - 1)}


def pca(X):
    """PCA of the mean-centred rows: (explained-variance ratios, scores (n, n_components))."""
    U, S, _ = np.linalg.svd(X - X.mean(0), full_matrices=False)
    total = (S ** 2).sum()
    return S ** 2 / total if total > 0 else np.full(len(S), np.nan), U * S


def n_components(ratios, fraction):
    """How many leading components explain at least this fraction of the variance."""
    return int(np.searchsorted(np.cumsum(ratios), fraction - 1e-12) + 1)


def linear_fit_r2(P):
    """Variance of P explained by the best straight line p_t = a + t b (least squares per column)."""
    t = np.arange(len(P)) - (len(P) - 1) / 2
    Pc = P - P.mean(0)
    b = t @ Pc / (t @ t)
    total = (Pc ** 2).sum()
    return float(1 - ((Pc - np.outer(t, b)) ** 2).sum() / total) if total > 0 else float('nan')


def delta_consecutive_cos(P):
    """Mean over t of cos(D_t, D_{t+1}), D_t = p_{t+1} - p_t: near 1 when the steps are parallel."""
    D = unit_rows(np.diff(P, axis=0))
    return float((D[:-1] * D[1:]).sum(1).mean())


def positional_geometry(P):
    """Every number the report gives for a position table P (T, d)."""
    P = np.asarray(P, np.float64)
    curve = mean_cos_by_distance(P)
    ratios, scores = pca(P)
    n_pc = min(10, int((ratios > 1e-12).sum()))  # components that are not numerically zero
    t = np.arange(len(P))
    return {'norms': np.linalg.norm(P, axis=1), 'mean_cos_by_distance': curve, 'exp_fit': exp_fit(curve),
            'pca_explained_variance': ratios, 'n_components_80': n_components(ratios, 0.8),
            'n_components_90': n_components(ratios, 0.9),
            'pc_abs_corr_with_position': [abs(pearson(scores[:, i], t)) for i in range(n_pc)],
            'delta_consecutive_cos_mean': delta_consecutive_cos(P), 'linear_fit_r2': linear_fit_r2(P)}


LOW_FREQUENCIES = 4  # cycles over a table's T rows that count as low: periods of T/4 rows and longer


def spectrum_weights(T):
    """How often each frequency k = 0 .. T//2 of np.fft.rfft appears in the full spectrum of T
    points: twice (k and T - k), but once for k = 0 and, for an even T, k = T/2."""
    weights = np.full(T // 2 + 1, 2.0)
    weights[0] = 1.0
    if T % 2 == 0:
        weights[-1] = 1.0
    return weights


def low_frequency_share(P, n_low=LOW_FREQUENCIES):
    """The share of a table's variance along t (P is (T, d)) at the lowest frequencies: the power
    of each centred column's discrete Fourier transform at 1 .. n_low cycles over the T rows, over
    the power at every nonzero frequency (Parseval: their sum is T times the variance). GPT-2's W_pos
    has nearly all of it there (Yamamoto & Matsuzaki 2023); independent random rows spread it
    evenly, low_frequency_chance(T). nan for a constant table."""
    power = (np.abs(np.fft.rfft(np.asarray(P, np.float64) - np.mean(P, 0), axis=0)) ** 2).sum(1)
    power *= spectrum_weights(len(P))
    total = power[1:].sum()
    return float(power[1:n_low + 1].sum() / total) if total > 0 else float('nan')


def low_frequency_chance(T, n_low=LOW_FREQUENCIES):
    """low_frequency_share's expected value for independent random rows (white noise along t)."""
    weights = spectrum_weights(T)
    return float(weights[1:n_low + 1].sum() / weights[1:].sum())


def position_probe(P, folds=5, seed=0):
    """Wang & Chen (2020)'s probe: how well a linear map reads a row's position t from the row p_t.
    Ridge regression t ~ a + p_t w on the standardised columns (penalty d, the scale of X X^T's
    diagonal), cross-validated over the rows shuffled into folds; returns the mean absolute error
    of the held-out predictions, in positions. For independent random rows it is about T/3 (no
    better than chance), for a table whose rows follow t, small. Dual form: w = X^T (X X^T + d I)^-1 y,
    as the rows may be fewer than the columns."""
    P = np.asarray(P, np.float64)
    t, order = np.arange(len(P), dtype=np.float64), np.random.default_rng(seed).permutation(len(P))
    errors = []
    for held in np.array_split(order, folds):
        train = np.setdiff1d(order, held)
        mean, std = P[train].mean(0), P[train].std(0)
        std = np.where(std > 0, std, 1.0)
        X, Xh = (P[train] - mean) / std, (P[held] - mean) / std
        y = t[train] - t[train].mean()
        alpha = np.linalg.solve(X @ X.T + P.shape[1] * np.eye(len(X)), y)
        errors.append(np.abs(Xh @ (X.T @ alpha) + t[train].mean() - t[held]))
    return float(np.concatenate(errors).mean())


def position_statistics(P):
    """The numbers of the onset study for one position table P (T, d): the mean row norm, the
    mean cos at distance 1 and T/4, PC1's share of the variance, the largest abs corr(PC score, t)
    over PC1-PC3 and which PC has it, the mean cos(delta_t, delta_t+1) (about -0.5 for independent
    random rows: delta_t and delta_t+1 share -p_t+1), the variance the line a + t b explains, and
    the two published measures: the share of the variance along t at low frequencies
    (low_frequency_share) and the error of Wang & Chen's position probe (position_probe)."""
    P = np.asarray(P, np.float64)
    curve, (ratios, scores), t = mean_cos_by_distance(P), pca(P), np.arange(len(P))
    corr = [abs(pearson(scores[:, i], t)) for i in range(min(3, scores.shape[1]))]
    return {'mean_norm': float(np.linalg.norm(P, axis=1).mean()), 'cos_1': float(curve[1]),
            'cos_quarter': float(curve[len(P) // 4]), 'pc1_share': float(ratios[0]),
            'pc_corr': float(np.max(corr)), 'pc_corr_which': int(np.argmax(corr)) + 1,
            'delta_cos': delta_consecutive_cos(P), 'line_r2': linear_fit_r2(P),
            'low_freq_share': low_frequency_share(P), 'probe_mae': position_probe(P)}


# ---- the gradient of a table: signal and noise --------------------------------------------------

def gradient_noise(mean_g, mean_sq, k, batch_size):
    """The gradient noise scale of McCandlish et al. (2018), from K gradients g_i, each of one batch
    of batch_size sequences, given as their mean G_bar = mean_g and the mean of their squared norms
    mean_sq = mean_i |g_i|^2 (both summed over whatever axes the caller leaves out: a scalar for a
    whole matrix, one number a row for per-row figures):

        noise  S = K / (K - 1) (mean_i |g_i|^2 - |G_bar|^2)      tr(Sigma_B): one batch's noise
        signal |G|^2 = |G_bar|^2 - S / K                          the noise left in G_bar taken out
        B_simple = batch_size S / |G|^2                           in sequences: the batch at which a
                                                                  step's noise equals its signal
        snr = |G|^2 / S                                           signal over noise at batch_size

    Returns {'noise', 'signal', 'b_simple', 'snr'}; b_simple is nan where the signal is not resolved
    (|G|^2 <= 0: K too small for the noise)."""
    mean_g, mean_sq = np.asarray(mean_g, np.float64), np.asarray(mean_sq, np.float64)
    bar = (mean_g ** 2).sum(-1) if mean_g.ndim == mean_sq.ndim + 1 else (mean_g ** 2).sum()
    noise = k / (k - 1) * (mean_sq - bar)
    signal = bar - noise / k
    with np.errstate(divide='ignore', invalid='ignore'):
        b_simple = np.where(signal > 0, batch_size * noise / signal, np.nan)
        return {'noise': noise, 'signal': signal, 'b_simple': b_simple, 'snr': signal / noise}


def smoothness(P):
    """How smooth a table (T, d) is along t: the mean cosine of neighbouring rows, the mean
    cos(delta_t, delta_t+1), and the share of its variance at low frequencies."""
    P = np.asarray(P, np.float64)
    return {'cos_k1': float(mean_cos_by_distance(P)[1]), 'cos_delta': delta_consecutive_cos(P),
            'low_freq_share': low_frequency_share(P)}


def onset(iters, correlations, threshold=0.9):
    """The first iteration whose abs corr(PC, t) reaches threshold, or None if none does."""
    return next((int(i) for i, c in zip(iters, correlations) if c is not None and c >= threshold), None)


# ---- token embeddings -----------------------------------------------------------------------

def mean_pair_cos(X):
    """Mean cos(x_i, x_j) over all pairs i != j of the rows that are not all zero (a zero row has no
    direction); nan for fewer than two such rows."""
    U = unit_rows(X[np.linalg.norm(X, axis=1) > 0].astype(np.float64))
    s, n = U.sum(0), len(U)
    # sum over i != j of u_i . u_j = |sum_i u_i|^2 - n, so no n x n matrix is needed
    return float((s @ s - n) / (n * (n - 1))) if n > 1 else float('nan')


def anisotropy(W):
    """Mean cosine over all pairs of distinct rows, raw and after removing the mean row. Rows that
    are all zero (the untrained rows of SGNS and GloVe) are dropped first: centred, they would all
    become the same row -mean and add a block of cosines of 1."""
    W = W[np.linalg.norm(W, axis=1) > 0]
    return {'raw': mean_pair_cos(W), 'centred': mean_pair_cos(W - W.mean(0))}


def nearest_neighbours(W, i, k=10, candidates=None):
    """The k rows nearest to row i by cosine (row i itself excluded): [(index, cos), ...]."""
    candidates = np.arange(len(W)) if candidates is None else candidates
    candidates = candidates[candidates != i]
    cos = unit_rows(W[candidates]) @ unit_rows(W[i:i + 1])[0]
    top = np.argsort(-cos)[:k]
    return [(int(candidates[j]), float(cos[j])) for j in top]


def analogy(W, a, b, c, answer, k=5, candidates=None):
    """a : b :: c : ? by 3CosAdd, the rows nearest to u_b - u_a + u_c (unit rows u). Returns the top k
    and the rank of the expected answer (1 = best), with and without excluding a, b and c."""
    candidates = np.arange(len(W)) if candidates is None else candidates
    U = unit_rows(W[[a, b, c]])
    cos = unit_rows(W[candidates]) @ (U[1] - U[0] + U[2])
    out = {}
    for key, excluded in (('', []), ('_excluding_inputs', [a, b, c])):
        cos = np.where(np.isin(candidates, excluded), -np.inf, cos)
        answer_cos = cos[candidates == answer]
        out['top' + key] = [int(candidates[j]) for j in np.argsort(-cos)[:k]]
        out['rank' + key] = int((cos > answer_cos[0]).sum() + 1) if len(answer_cos) else None
    return out


def norm_vs_frequency(W, counts):
    """Spearman correlation of row norm with log count over the tokens seen; unseen ones apart."""
    norms, seen = np.linalg.norm(W, axis=1), counts > 0
    return {'spearman_seen': spearman(norms[seen], np.log(counts[seen])), 'n_seen': int(seen.sum()),
            'n_unseen': int((~seen).sum()), 'mean_norm_seen': float(norms[seen].mean()),
            'mean_norm_unseen': float(norms[~seen].mean()) if (~seen).any() else None}


def drift_vs_frequency(W0, W, counts):
    """Spearman correlation of each seen token's drift |W[i] - W0[i]| from an earlier table W0 with
    its log count: negative when rare tokens moved further."""
    seen = counts > 0
    return spearman(np.linalg.norm(W[seen] - W0[seen], axis=1), np.log(counts[seen]))


# ---- two embeddings of the same items (seeds, objectives) -----------------------------------

def procrustes_cos(A, B):
    """Mean cos(u_i R, v_i) after the orthogonal R that best maps the unit rows u of A onto those
    v of B (R = U V^T from the SVD of A^T B; dimensions may differ). R has d^2 / 2 degrees of
    freedom: with few rows per column it aligns unrelated rows too (two random 128 x 256
    matrices: 0.88)."""
    Au, Bu = unit_rows(A.astype(np.float64)), unit_rows(B.astype(np.float64))
    U, _, Vt = np.linalg.svd(Au.T @ Bu, full_matrices=False)
    return float((unit_rows(Au @ U @ Vt) * Bu).sum(1).mean())


def linear_cka(A, B):
    """Linear CKA = |A^T B|_F^2 / (|A^T A|_F |B^T B|_F) on column-centred A and B: 1 for a rotated
    (or uniformly scaled) copy; for unrelated matrices it falls toward 0 only as the rows come to
    far outnumber the columns (two random 128 x 256 matrices: 0.66; 2,000 x 256: 0.11)."""
    A, B = A - A.mean(0), B - B.mean(0)
    A, B = A.astype(np.float64), B.astype(np.float64)
    return float(np.linalg.norm(A.T @ B) ** 2 / (np.linalg.norm(A.T @ A) * np.linalg.norm(B.T @ B)))


def rsa(A, B):
    """Representational similarity: Spearman correlation of the upper triangles of the two
    cosine-similarity matrices."""
    upper = np.triu_indices(len(A), 1)
    return spearman(cosine_matrix(A)[upper], cosine_matrix(B)[upper])


def nn_overlap(A, B, k=10):
    """Mean over rows of |N_A(i) & N_B(i)| / k, N(i) the k nearest rows by cosine. Cosine
    neighbours are unchanged by any rotation, so this is the same before or after Procrustes.
    nan for k + 1 rows or fewer, where every row's k nearest would be all the others."""
    if len(A) <= k + 1:
        return float('nan')
    def neighbours(X):
        C = cosine_matrix(X)
        np.fill_diagonal(C, -np.inf)
        return np.argpartition(-C, k, axis=1)[:, :k]
    nA, nB = neighbours(A), neighbours(B)
    return float((nA[:, :, None] == nB[:, None, :]).any(2).sum(1).mean() / k)


def similarity(A, B):
    """All four comparisons of two embeddings of the same n items (rows in the same order)."""
    return {'procrustes_cos': procrustes_cos(A, B), 'cka': linear_cka(A, B), 'rsa': rsa(A, B),
            'nn_overlap_10': nn_overlap(A, B, 10)}


# ---- contextual embeddings: one vector per occurrence of a token ----------------------------
# H (n, d) holds the vector of each token occurrence in a text at one layer, ids (n,) its token id.
# A static table W gives H = W[ids]; a transformer gives each occurrence a vector of its own.

def occurrences_by_type(ids, types):
    """For each token id in types, the indices of its occurrences in ids."""
    order = np.argsort(ids, kind='stable')
    starts = np.searchsorted(ids[order], types)
    ends = np.searchsorted(ids[order], types, side='right')
    return [order[a:b] for a, b in zip(starts, ends)]


def first_pc_share(X):
    """Share of the (uncentred) sum of squares of the rows X explained by their first principal
    component, sigma_1^2 / sum sigma_i^2: 1 when the rows are multiples of one vector. The sigma_i^2
    are the eigenvalues of X X^T and of X^T X, whichever is smaller."""
    X = np.asarray(X, np.float64)
    gram = X @ X.T if len(X) < X.shape[1] else X.T @ X
    return float(np.linalg.eigvalsh(gram)[-1] / np.trace(gram))


def intra_context_similarity(H, window):
    """Mean over occurrences of cos(h_t, mean of the h in its context window), the occurrences
    coming in consecutive windows of `window` (zero rows left out). The mean includes h_t itself,
    so vectors of pure noise give about 1/sqrt(window), not 0."""
    H = np.asarray(H, np.float64)
    window_means = np.repeat(H.reshape(-1, window, H.shape[-1]).mean(1), window, 0)  # each row's own window
    cos = (unit_rows(H) * unit_rows(window_means)).sum(1)
    return float(cos[np.linalg.norm(H, axis=1) > 0].mean())


def contextual_geometry(H, ids, types, window, seed=0):
    """How context-dependent one layer's occurrence vectors H are (Ethayarajh 2019), averaged over
    `types` (ids with at least 2 occurrences):
      anisotropy       mean cos of two random occurrences: the baseline of the next two
      self_similarity  mean cos between occurrences of the same type, minus anisotropy
                       (a static table: 1 - anisotropy; a fresh vector per occurrence: ~0)
      intra_context    mean cos of an occurrence with its window's mean vector, minus anisotropy
      pc_share         share of a type's occurrence vectors on their first principal component
                       (static: 1), and pc_share_random for as many occurrences of any type.
    self_similarity_by_type gives each type's value, minus anisotropy."""
    groups, rng = occurrences_by_type(ids, types), np.random.default_rng(seed)
    baseline = mean_pair_cos(H)
    self_similarity = np.array([mean_pair_cos(H[g]) for g in groups]) - baseline
    return {'anisotropy': baseline, 'self_similarity': float(np.nanmean(self_similarity)),
            'intra_context': intra_context_similarity(H, window) - baseline,
            'pc_share': float(np.mean([first_pc_share(H[g]) for g in groups])),
            'pc_share_random': float(np.mean([first_pc_share(H[rng.choice(len(H), len(g), replace=False)])
                                              for g in groups])),
            'self_similarity_by_type': dict(zip(np.asarray(types).tolist(), self_similarity.tolist()))}


def type_means(H, ids, types):
    """The mean occurrence vector of each type, (len(types), d): a static table read off a layer."""
    return np.stack([H[g].mean(0) for g in occurrences_by_type(ids, types)])
