"""
The sections of analyze.py's report on one model or table, in the order they appear in it. Each
section is a pair:

    <name>_study(...) -> dict            its numbers, from what analyze.py loaded and checked: plain
                                         dicts, lists and arrays, its entry in report.json
    <name>_markdown(study, ..., report_dir) -> list of markdown lines, after writing its figures into
                                         report_dir; beside the study it takes only what a figure
                                         draws from the inputs (a table, the token counts, the run)

The report on one model: loss, positional, attention, token, logit_lens, dynamics, stability
(this run against another seed); when and why W_pos takes shape (onset, gradient_noise) is in
gulliver/onset.py. The report on several tables side by side (compare, training,
contextual) is in gulliver/comparison.py, which takes from here what both use: token_study and
token_tables, frequent_tokens, similarity_and_chance and similarity_table, MIN_COUNT, SIMILARITIES
and CHANCE. The studies are built from plain functions of arrays in geometry.py and of the model in
gulliver/circuits.py; where one of those is the whole study (geometry.positional_geometry,
circuits.qk_decomposition), analyze.py calls it and only the writer is here.
"""
import math
import os

import numpy as np

from geometry import (analogy, anisotropy, cosine_matrix, drift_vs_frequency, mean_cos_by_distance,
                      nearest_neighbours, norm_vs_frequency, pca, similarity)
from gulliver.circuits import TERMS, logit_lens
from gulliver.report import heatmap, image, plot_lines, plt, save, show, table
from gulliver.runlog import plot_losses

PROBE_WORDS = [' king', ' queen', ' man', ' woman', ' ship', ' sea', ' horse', ' giant', ' small']
ANALOGIES = [(' man', ' king', ' woman', ' queen'), (' man', ' men', ' woman', ' women'),  # a : b :: c : d
             (' he', ' his', ' she', ' her'), (' great', ' greater', ' small', ' smaller'),
             (' England', ' English', ' France', ' French')]
MIN_COUNT = 5  # tokens seen fewer times in train.bin are left out of the comparisons between tables
SIMILARITIES = {'cka': 'linear CKA', 'rsa': 'RSA (Spearman of the cosines)',
                'nn_overlap_10': 'neighbour overlap @10', 'procrustes_cos': 'mean cosine after Procrustes'}
CHANCE = ("A row 'rows shuffled (chance)' scores the same tables with one's rows in random order: what "
          "tables of these shapes score when their rows do not correspond. CKA and Procrustes are far above "
          "0 there unless the rows far outnumber the columns.")
MIN_POSITIONS = 8  # rows a position table needs for its studies (cos at distance T/4, three PCs, ...)
FREQUENCY_BINS = [(0, 0, 'unseen'), (1, 9, '1-9'), (10, 99, '10-99'), (100, 999, '100-999'),
                  (1000, math.inf, '1000+')]


def frequent_tokens(counts, top_n):
    """Ids (ascending) of the top_n most frequent tokens, of those seen at least MIN_COUNT times."""
    order = np.argsort(-counts, kind='stable')
    return np.sort(order[counts[order] >= MIN_COUNT][:top_n])


# ---- training: the run's log.jsonl ----------------------------------------------------------

def loss_study(train, evals):
    """The last and best losses of a run, from the train and eval events of its log.jsonl."""
    return {'last_iter': train[-1]['iter'], 'last_train_loss': train[-1]['loss'],
            'last_val_loss': evals[-1]['val_loss'] if evals else None,
            'last_val_bpb': evals[-1].get('val_bpb') if evals else None,
            'best_val_loss': min((e['val_loss'] for e in evals if e['val_loss'] is not None), default=None)}


def loss_markdown(study, run_dir, report_dir):
    """The losses of loss_study, and the loss curve drawn from the log.jsonl in run_dir."""
    plot_losses(run_dir, os.path.join(report_dir, 'loss.png'))
    return ['## Training\n', table(list(study), [list(study.values())]), image('loss.png')]


# ---- positional embeddings: the study is geometry.positional_geometry ------------------------

def positional_markdown(study, P, report_dir):
    """The table and figures of study = geometry.positional_geometry(P), P a position table (T, d)."""
    T, cos, ratios = len(P), study['mean_cos_by_distance'], study['pca_explained_variance']
    fit, dc, line = study['exp_fit'], study['delta_consecutive_cos_mean'], study['linear_fit_r2']
    norms = ' / '.join(f"{f(study['norms']):.3f}" for f in (np.min, np.mean, np.max))
    rows = [['norm of p_t: min / mean / max', norms],
            ['mean cos at distance 1 / T/4 / T/2', ' / '.join(f'{cos[j]:.3f}' for j in (1, T // 4, T // 2))],
            ['fit cos ~ exp(-alpha k)', f"alpha = {fit['alpha']:.4g}, R^2 = {fit['r2']:.3f}" + (
                ' (the end of the search: no decay rate resolved)' if fit['at_edge'] else '')],
            ['variance of PC1, PC2, PC3', ', '.join(f'{r:.1%}' for r in ratios[:3])],
            ['components for 80% / 90% of the variance',
             f"{study['n_components_80']} / {study['n_components_90']}"],
            ['abs corr(PC score, t) for PC1, PC2, PC3',
             ', '.join(f'{c:.3f}' for c in study['pc_abs_corr_with_position'][:3])],
            ['mean cos(delta_t, delta_t+1), delta_t = p_t+1 - p_t', f'{dc:.3f}'],
            ['variance explained by the line p_t = a + t b', f'{line:.1%}']]
    return ['## Positional embeddings (W_pos, %d x %d)\n' % P.shape, table(['quantity', 'value'], rows),
            f"The steps delta_t are {'nearly parallel' if dc > 0.9 else 'far from parallel'} (mean cosine "
            f"{dc:.2f}) and the best line a + t b explains {line:.0%} of the variance: the picture "
            f"p_t ~ a + t b {'holds' if line > 0.9 else 'does not hold'} for this table.\n",
            *positional_figures(study, P, report_dir)]


def positional_figures(study, P, report_dir):
    """The figures of a position table P (T, d) and of study = positional_geometry(P): the norms, the
    cosine by distance with its fit, the cosine of every pair, the PC scores and the PCA spectrum."""
    k, ratios = np.arange(len(P)), study['pca_explained_variance']
    alpha, r2 = study['exp_fit']['alpha'], study['exp_fit']['r2']
    md = [plot_lines(report_dir, 'positional_norms.png', 'W_pos: norm of each position', 'position t',
                     '||p_t||', [(k, study['norms'], '-', None)]),
          plot_lines(report_dir, 'positional_cos_by_distance.png', 'W_pos: cosine similarity vs distance',
                     'distance k', 'mean cos(p_t, p_t+k)',
                     [(k, study['mean_cos_by_distance'], '-', 'mean over t'),
                      (k, np.exp(-alpha * k), '--', f'exp(-{alpha:.3g} k), R^2 = {r2:.2f}')])]
    fig, ax = plt.subplots(figsize=(5.5, 4.5), layout='constrained')
    fig.colorbar(ax.imshow(cosine_matrix(P), cmap='RdBu_r', vmin=-1, vmax=1), ax=ax, label='cos(p_i, p_j)')
    ax.set(title='W_pos: cosine similarity of positions', xlabel='position j', ylabel='position i')
    md.append(save(fig, report_dir, 'positional_cosine.png'))
    scores = pca(np.asarray(P, np.float64))[1]
    pairs = [(i, j) for i, j in ((0, 1), (1, 2)) if j < scores.shape[1]]
    if pairs:
        fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4.2), layout='constrained',
                                 squeeze=False)
        for ax, (i, j) in zip(axes[0], pairs):
            points = ax.scatter(scores[:, i], scores[:, j], c=k, cmap='viridis', s=10)
            ax.set(title=f'W_pos: PC{i + 1} vs PC{j + 1}', xlabel=f'PC{i + 1} ({ratios[i]:.0%} of variance)',
                   ylabel=f'PC{j + 1} ({ratios[j]:.0%} of variance)')
        fig.colorbar(points, ax=axes[0].tolist(), label='position t')
        md.append(save(fig, report_dir, 'positional_pca.png'))
    fig, ax = plt.subplots(figsize=(6.5, 4), layout='constrained')
    n = np.arange(1, min(len(ratios), max(30, study['n_components_90'] + 5)) + 1)
    ax.bar(n, ratios[:len(n)], label='each component')
    ax.plot(n, np.cumsum(ratios)[:len(n)], 'o-', color='C1', ms=3, label='cumulative (dotted: 80%, 90%)')
    ax.axhline(0.8, color='grey', ls=':'), ax.axhline(0.9, color='grey', ls=':')
    ax.set(title='W_pos: PCA explained variance', xlabel='principal component', ylabel='fraction of variance',
           ylim=(0, 1.02))
    ax.legend()
    return md + [save(fig, report_dir, 'positional_explained_variance.png')]


# ---- layer-0 attention: the study is circuits.qk_decomposition -------------------------------

def attention_markdown(study, report_dir):
    """The table and figure of circuits.qk_decomposition: layer 0's query-key scores split into their
    token and position parts."""
    share = np.array(study['share_by_head'])
    fig, ax = plt.subplots(figsize=(7, 1.4 + 0.45 * len(share)), layout='constrained')
    heatmap(ax, fig, share, 'Layer 0: share of the within-query score variance', TERMS,
            [f'head {h}' for h in range(len(share))], 'Cov(part, score) / Var(score)', cmap='RdBu_r',
            vmin=-1, vmax=1)
    return ['### Layer-0 attention: what the query-key scores are made of\n',
            "LN(e + p) = gamma*e_c/sigma + gamma*p_c/sigma + beta with one sigma, so each score q_i.k_j "
            "splits exactly into five parts. A cell is the part's share Cov(part, score) / Var(score) of the "
            "score variance within a query (softmax ignores what is the same for all of a query's keys); a "
            "head's shares add up to 1. "
            f"Over {study['tokens']} val tokens the parts add back to the model's own scores within "
            f"{study['max_abs_error']:.1e} (largest score {study['max_abs_score']:.1f}).\n",
            table(['head'] + TERMS, [[h, *(f'{v:.3f}' for v in row)] for h, row in enumerate(share)] +
                  [['mean', *(f'{v:.3f}' for v in study['share_mean'])]]),
            save(fig, report_dir, 'attention_layer0.png')]


# ---- token embeddings -----------------------------------------------------------------------

def token_study(W, counts, probe_ids, enc):
    """Neighbours of the probe tokens and analogies (both among the tokens seen in training),
    norm vs log frequency, and anisotropy, for one token table W (V, d)."""
    seen = np.flatnonzero(counts > 0)
    ids = {w: enc.encode_ordinary(w)[0] for analogy_words in ANALOGIES for w in analogy_words}
    analogies = []
    for a, b, c, answer in ANALOGIES:
        result = analogy(W, ids[a], ids[b], ids[c], ids[answer], 5, np.union1d(seen, ids[answer]))
        analogies.append({'analogy': f'{b.strip()} - {a.strip()} + {c.strip()}', 'expected': answer,
                          'expected_count': int(counts[ids[answer]]), **result,
                          'top': [enc.decode([i]) for i in result['top']],
                          'top_excluding_inputs': [enc.decode([i]) for i in result['top_excluding_inputs']]})
    return {'neighbours': {w: [(enc.decode([j]), c) for j, c in nearest_neighbours(W, i, 10, seen)]
                           for w, i in probe_ids.items()},
            'probe_counts': {w: int(counts[i]) for w, i in probe_ids.items()},
            'analogies': analogies, 'candidates': len(seen), 'norm_frequency': norm_vs_frequency(W, counts),
            'anisotropy': anisotropy(W), 'anisotropy_seen': anisotropy(W[seen])}


def token_tables(studies):
    """The tables of the token studies of one or more tables side by side, {label: token_study(...)}."""
    first, columns = next(iter(studies.values())), list(studies.values())
    ranks = [a['rank_excluding_inputs'] for s in columns for a in s['analogies']]
    return [f"Neighbours are searched among the {first['candidates']} tokens seen in train.bin (counts in "
            "brackets), analogies among these and the expected word.\n",
            table(['probe', *studies], [
                [f"{show(w)} ({first['probe_counts'][w]})",
                 *(', '.join(show(t) for t, _ in s['neighbours'][w][:6]) for s in columns)]
                for w in first['neighbours']]),
            "Analogies by 3CosAdd: the rank of the expected word with the input words excluded / included, "
            "and the top word.\n",
            table(['analogy', 'expected', *studies], [
                [a['analogy'], f"{show(a['expected'])} ({a['expected_count']})",
                 *(f"{s['analogies'][i]['rank_excluding_inputs']} / {s['analogies'][i]['rank']}, "
                   f"{show(s['analogies'][i]['top_excluding_inputs'][0])}" for s in columns)]
                for i, a in enumerate(first['analogies'])]),
            f"The expected word comes first in {ranks.count(1)} of {len(ranks)} cases; the median rank is "
            f"{np.median(ranks):g} of {first['candidates']} (chance: about {first['candidates'] // 2}).\n",
            table(['', *studies], [[label, *(s[key][sub] for s in columns)] for label, key, sub in (
                ('Spearman(norm, log count), seen tokens', 'norm_frequency', 'spearman_seen'),
                ('mean norm, seen tokens', 'norm_frequency', 'mean_norm_seen'),
                ('mean norm, never-seen tokens', 'norm_frequency', 'mean_norm_unseen'),
                ('anisotropy, all nonzero rows: raw', 'anisotropy', 'raw'),
                ('anisotropy, all nonzero rows: centred', 'anisotropy', 'centred'),
                ('anisotropy, seen rows: raw', 'anisotropy_seen', 'raw'),
                ('anisotropy, seen rows: centred', 'anisotropy_seen', 'centred'))])]


def token_markdown(study, W, counts, report_dir):
    """The tables of token_study(W, ...) for the one model, and W's norm-vs-frequency scatter."""
    nf, norms, seen = study['norm_frequency'], np.linalg.norm(W, axis=1), counts > 0
    fig, ax = plt.subplots(figsize=(6.5, 4.2), layout='constrained')
    ax.scatter(counts[seen], norms[seen], s=4, alpha=0.4, label=f"seen in train.bin ({nf['n_seen']})")
    ax.scatter(np.full((~seen).sum(), 0.5), norms[~seen], s=4, alpha=0.2, color='C3',
               label=f"never seen ({nf['n_unseen']}), drawn at 0.5")
    ax.set(xscale='log', xlabel='count in train.bin', ylabel='||W_E[i]||',
           title=f"W_E: norm vs frequency (Spearman {nf['spearman_seen']:.2f} over seen tokens)")
    ax.legend()
    return ['## Token embeddings (W_E)\n', *token_tables({'this model': study}),
            save(fig, report_dir, 'token_norm_frequency.png')]


# ---- logit lens -----------------------------------------------------------------------------

def logit_lens_study(model, x, y):
    """The loss on the next tokens y of each layer's residual stream over the val tokens x, decoded
    through LN_f and the tied head."""
    return {'loss_by_layer': logit_lens(model, x, y), 'tokens': x.numel()}


def logit_lens_markdown(study, report_dir):
    """The table and curve of logit_lens_study."""
    losses = study['loss_by_layer']
    return ['## Logit lens\n', table(['layer (0 = embeddings)', 'val loss'], list(enumerate(losses))),
            plot_lines(report_dir, 'logit_lens.png', 'Logit lens: each layer decoded through LN_f and the '
                       'tied head', 'layer (0 = embeddings)', 'val loss (nats)',
                       [(range(len(losses)), losses, 'o-', None)], xticks=range(len(losses)))]


# ---- during training: the run's snapshots ---------------------------------------------------

def dynamics_study(snapshots, position_tables, counts):
    """W_E's drift from its first snapshot, median |W_E(t) - W_E(0)| in each FREQUENCY_BINS bin of the
    train counts, at each snapshot, and at the last one the Spearman correlation of the drift with log
    count; W_pos's mean cosine by distance at each snapshot. snapshots: (iteration, W_E) in the order
    of training, read one at a time where it is a generator; position_tables: {iteration: W_pos}."""
    out = {'iters': [], 'drift_median': {label: [] for *_, label in FREQUENCY_BINS},
           'pos_mean_cos_by_distance': [mean_cos_by_distance(P) for P in position_tables.values()]}
    W0 = None
    for i, W in snapshots:
        out['iters'].append(i)
        W0 = W if W0 is None else W0
        drift = np.linalg.norm(W - W0, axis=1)
        for lo, hi, label in FREQUENCY_BINS:
            in_bin = (counts >= lo) & (counts <= hi)
            out['drift_median'][label].append(float(np.median(drift[in_bin])) if in_bin.any() else None)
    out['drift_spearman_log_count'] = drift_vs_frequency(W0, W, counts)
    return out


def dynamics_markdown(study, report_dir):
    """The figures of dynamics_study: the drift by frequency, and the cosine-vs-distance curves."""
    iters = study['iters']
    md = ['## During training\n', f"Spearman(drift at the last snapshot, log count) over the tokens seen: "
          f"{study['drift_spearman_log_count']:.3f}.\n",
          plot_lines(report_dir, 'dynamics_drift.png', 'W_E: drift from init, median by token frequency',
                     'iteration', 'median ||W_E(t) - W_E(0)||',
                     [(iters, v, 'o-', f'count {label}') for label, v in study['drift_median'].items()])]
    if study['pos_mean_cos_by_distance']:
        fig, ax = plt.subplots(figsize=(6.5, 4), layout='constrained')
        scale = plt.Normalize(iters[0], iters[-1])  # a curve's colour is its iteration's, as on the bar
        for curve, colour in zip(study['pos_mean_cos_by_distance'], plt.cm.viridis(scale(np.array(iters)))):
            ax.plot(curve, color=colour, lw=1)
        fig.colorbar(plt.cm.ScalarMappable(scale, 'viridis'), ax=ax, label='iteration')
        ax.set(title='W_pos: cosine vs distance during training', xlabel='distance k',
               ylabel='mean cos(p_t, p_t+k)')
        md.append(save(fig, report_dir, 'dynamics_positional.png'))
    return md


# ---- across seeds: this run against another ---------------------------------------------------

def stability_study(W_E, W_pos, other_name, other_W_E, other_W_pos, counts, top_n):
    """How alike this run's tables and another seed's are (CKA, RSA, neighbour overlap, Procrustes):
    W_E over the most frequent tokens, W_pos over the positions both have (where there are MIN_POSITIONS)."""
    tokens = frequent_tokens(counts, top_n)
    out = {'compare_out_dir': other_name, 'tokens_compared': len(tokens),
           'W_E': similarity_and_chance(W_E[tokens], other_W_E[tokens])}
    n = min(len(W_pos), len(other_W_pos)) if W_pos is not None and other_W_pos is not None else 0
    if n >= MIN_POSITIONS:
        out['W_pos'] = similarity_and_chance(W_pos[:n], other_W_pos[:n])
    return out


def stability_markdown(study):
    """The table of stability_study."""
    names = [k for k in ('W_E', 'W_pos') if k in study]
    return [f"## Across seeds: this run vs {study['compare_out_dir']}\n",
            f"W_E over the {study['tokens_compared']} most frequent tokens seen at least {MIN_COUNT} times"
            + ('; W_pos over the positions both have' if 'W_pos' in study else '') + '. ' + CHANCE + '\n',
            similarity_table(names, [study[k] for k in names])]


def similarity_and_chance(A, B):
    """geometry.similarity of A and B, and under 'chance' the same with B's rows shuffled: what two
    tables of these shapes and spectra score when their rows do not correspond. CKA and Procrustes
    stay far above 0 there unless the rows far outnumber the columns (two random 128 x 256
    matrices: CKA 0.66, Procrustes 0.88)."""
    shuffled = B[np.random.default_rng(0).permutation(len(B))]
    return {**similarity(A, B), 'chance': similarity(A, shuffled)}


def similarity_table(names, sims):
    """Two rows of SIMILARITIES per name: the tables compared, and by chance (similarity_and_chance)."""
    rows = [row for name, s in zip(names, sims) for row in
            ([name, *(s[key] for key in SIMILARITIES)], [f'{name}, rows shuffled (chance)',
                                                         *(s['chance'][key] for key in SIMILARITIES)])]
    return table(['', *SIMILARITIES.values()], rows)
