"""
The sections of analyze.py's report, in the order they appear in it. Each section runs its studies
(plain functions of arrays in geometry.py, and of the model in gulliver/circuits.py) on what analyze.py
loaded and checked, writes its figures into report_dir and returns its markdown, most of them
with the section's report.json entry: (json, markdown).
"""
import math
import os

import numpy as np
import torch

from gulliver.circuits import TERMS, logit_lens, qk_decomposition, residual_stream
from geometry import (analogy, anisotropy, contextual_geometry, cosine_matrix, linear_cka, nearest_neighbours,
                      norm_vs_frequency, onset, pca, position_statistics, positional_geometry, similarity, type_means)
from gulliver.report import heatmap, image, plot_lines, plt, save, show, table
from gulliver.runlog import plot_losses
from gulliver.tokenizer import VOCAB_SIZE

PROBE_WORDS = [' king', ' queen', ' man', ' woman', ' ship', ' sea', ' horse', ' giant', ' small']
ANALOGIES = [(' man', ' king', ' woman', ' queen'), (' man', ' men', ' woman', ' women'),  # a : b :: c : d
             (' he', ' his', ' she', ' her'), (' great', ' greater', ' small', ' smaller'),
             (' England', ' English', ' France', ' French')]
MIN_COUNT = 5  # tokens seen fewer times in train.bin are left out of the comparisons between tables
SIMILARITIES = {'cka': 'linear CKA', 'rsa': 'RSA (Spearman of the cosines)', 'nn_overlap_10': 'neighbour overlap @10',
                'procrustes_cos': 'mean cosine after Procrustes'}
CHANCE = ("A row 'rows shuffled (chance)' scores the same tables with one's rows in random order: what tables "
          "of these shapes score when their rows do not correspond. CKA and Procrustes are far above 0 there "
          "unless the rows far outnumber the columns.")
# train.py settings that do not change what a run learns
RUN_BOOKKEEPING = {'out_dir', 'init_from', 'overwrite', 'eval_only', 'device', 'backend', 'compile', 'log_interval',
                   'sample_tokens', 'snapshot_interval', 'sync_debug', 'peak_flops', 'max_skipped_steps'}
CONTEXT_PROBES = [' king', ' sea', ' ship', ' little', ' great', ' said']
CONTEXT_MEASURES = {'anisotropy': 'anisotropy (mean cos of two occurrences)',
                    'self_similarity': 'self-similarity - anisotropy',
                    'intra_context': 'intra-context similarity - anisotropy',
                    'pc_share': 'share of a type on its first PC'}
ONSET_STATISTICS = {'mean_norm': 'mean row norm', 'cos_1': 'mean cos, k=1', 'cos_quarter': 'mean cos, k=T/4',
                    'pc1_share': 'PC1 share', 'pc_corr': 'max abs corr(PC, t)', 'delta_cos': 'cos(delta_t, delta_t+1)',
                    'line_r2': 'line a + t b'}
ONSET_THRESHOLD = 0.9  # abs corr(PC score, t): one principal direction follows position
MIN_POSITIONS = 8  # rows a position table needs for its studies (cos at distance T/4, three PCs, ...)
FREQUENCY_BINS = [(0, 0, 'unseen'), (1, 9, '1-9'), (10, 99, '10-99'), (100, 999, '100-999'), (1000, math.inf, '1000+')]


def frequent_tokens(counts, top_n):
    """Ids (ascending) of the top_n most frequent tokens, of those seen at least MIN_COUNT times."""
    order = np.argsort(-counts, kind='stable')
    return np.sort(order[counts[order] >= MIN_COUNT][:top_n])


def loss_section(train, evals, run_dir, report_dir):
    """The last and best losses of a run's log.jsonl, and its loss curve: (json, markdown)."""
    loss = {'last_iter': train[-1]['iter'], 'last_train_loss': train[-1]['loss'],
            'last_val_loss': evals[-1]['val_loss'] if evals else None,
            'last_val_bpb': evals[-1].get('val_bpb') if evals else None,
            'best_val_loss': min((e['val_loss'] for e in evals if e['val_loss'] is not None), default=None)}
    plot_losses(run_dir, os.path.join(report_dir, 'loss.png'))
    return loss, ['## Training\n', table(list(loss), [list(loss.values())]), image('loss.png')]


def positional_section(P, report_dir):
    """The positional studies of a table P (T, d), with their figures: (json, markdown)."""
    g, k, T = positional_geometry(P), np.arange(len(P)), len(P)
    ratios, alpha, r2 = g['pca_explained_variance'], g['exp_fit']['alpha'], g['exp_fit']['r2']
    dc, line = g['delta_consecutive_cos_mean'], g['linear_fit_r2']
    md = ['## Positional embeddings (W_pos, %d x %d)\n' % P.shape, table(['quantity', 'value'], [
        ['norm of p_t: min / mean / max', ' / '.join(f"{f(g['norms']):.3f}" for f in (np.min, np.mean, np.max))],
        ['mean cos at distance 1 / T/4 / T/2', ' / '.join(f"{g['mean_cos_by_distance'][j]:.3f}" for j in (1, T // 4, T // 2))],
        ['fit cos ~ exp(-alpha k)', f'alpha = {alpha:.4g}, R^2 = {r2:.3f}' + (
            ' (the end of the search: no decay rate resolved)' if g['exp_fit']['at_edge'] else '')],
        ['variance of PC1, PC2, PC3', ', '.join(f'{r:.1%}' for r in ratios[:3])],
        ['components for 80% / 90% of the variance', f"{g['n_components_80']} / {g['n_components_90']}"],
        ['abs corr(PC score, t) for PC1, PC2, PC3', ', '.join(f'{c:.3f}' for c in g['pc_abs_corr_with_position'][:3])],
        ['mean cos(delta_t, delta_t+1), delta_t = p_t+1 - p_t', f'{dc:.3f}'],
        ['variance explained by the line p_t = a + t b', f'{line:.1%}']]),
        f"The steps delta_t are {'nearly parallel' if dc > 0.9 else 'far from parallel'} (mean cosine {dc:.2f}) and the "
        f"best line a + t b explains {line:.0%} of the variance: the picture p_t ~ a + t b "
        f"{'holds' if line > 0.9 else 'does not hold'} for this table.\n",
        plot_lines(report_dir, 'positional_norms.png', 'W_pos: norm of each position', 'position t', '||p_t||',
                   [(k, g['norms'], '-', None)]),
        plot_lines(report_dir, 'positional_cos_by_distance.png', 'W_pos: cosine similarity vs distance', 'distance k',
                   'mean cos(p_t, p_t+k)', [(k, g['mean_cos_by_distance'], '-', 'mean over t'),
                                            (k, np.exp(-alpha * k), '--', f'exp(-{alpha:.3g} k), R^2 = {r2:.2f}')])]
    fig, ax = plt.subplots(figsize=(5.5, 4.5), layout='constrained')
    fig.colorbar(ax.imshow(cosine_matrix(P), cmap='RdBu_r', vmin=-1, vmax=1), ax=ax, label='cos(p_i, p_j)')
    ax.set(title='W_pos: cosine similarity of positions', xlabel='position j', ylabel='position i')
    md.append(save(fig, report_dir, 'positional_cosine.png'))
    scores = pca(np.asarray(P, np.float64))[1]
    pairs = [(i, j) for i, j in ((0, 1), (1, 2)) if j < scores.shape[1]]
    if pairs:
        fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4.2), layout='constrained', squeeze=False)
        for ax, (i, j) in zip(axes[0], pairs):
            points = ax.scatter(scores[:, i], scores[:, j], c=k, cmap='viridis', s=10)
            ax.set(title=f'W_pos: PC{i + 1} vs PC{j + 1}', xlabel=f'PC{i + 1} ({ratios[i]:.0%} of variance)',
                   ylabel=f'PC{j + 1} ({ratios[j]:.0%} of variance)')
        fig.colorbar(points, ax=axes[0].tolist(), label='position t')
        md.append(save(fig, report_dir, 'positional_pca.png'))
    fig, ax = plt.subplots(figsize=(6.5, 4), layout='constrained')
    n = np.arange(1, min(len(ratios), max(30, g['n_components_90'] + 5)) + 1)
    ax.bar(n, ratios[:len(n)], label='each component')
    ax.plot(n, np.cumsum(ratios)[:len(n)], 'o-', color='C1', ms=3, label='cumulative (dotted: 80%, 90%)')
    ax.axhline(0.8, color='grey', ls=':'), ax.axhline(0.9, color='grey', ls=':')
    ax.set(title='W_pos: PCA explained variance', xlabel='principal component', ylabel='fraction of variance',
           ylim=(0, 1.02))
    ax.legend()
    return g, md + [save(fig, report_dir, 'positional_explained_variance.png')]


def attention_section(model, x, report_dir):
    """Layer 0's query-key scores split into their token and position parts, over the val tokens x: (json, markdown)."""
    qk = qk_decomposition(model, x)
    share = np.array(qk['share_by_head'])
    fig, ax = plt.subplots(figsize=(7, 1.4 + 0.45 * len(share)), layout='constrained')
    heatmap(ax, fig, share, 'Layer 0: share of the within-query score variance', TERMS,
            [f'head {h}' for h in range(len(share))], 'Cov(part, score) / Var(score)', cmap='RdBu_r', vmin=-1, vmax=1)
    return qk, ['### Layer-0 attention: what the query-key scores are made of\n',
                "LN(e + p) = gamma*e_c/sigma + gamma*p_c/sigma + beta with one sigma, so each score q_i.k_j splits "
                "exactly into five parts. A cell is the part's share Cov(part, score) / Var(score) of the score "
                "variance within a query (softmax ignores what is the same for all of a query's keys); a head's "
                "shares add up to 1. "
                f"Over {qk['tokens']} val tokens the parts add back to the model's own scores within "
                f"{qk['max_abs_error']:.1e} (largest score {qk['max_abs_score']:.1f}).\n",
                table(['head'] + TERMS, [[h, *(f'{v:.3f}' for v in row)] for h, row in enumerate(share)] +
                      [['mean', *(f'{v:.3f}' for v in qk['share_mean'])]]),
                save(fig, report_dir, 'attention_layer0.png')]


def token_studies(W, counts, probe_ids, enc):
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


def token_markdown(studies):
    """Tables of the token studies of one or more tables, {label: token_studies(...)}."""
    first, columns = next(iter(studies.values())), list(studies.values())
    ranks = [a['rank_excluding_inputs'] for s in columns for a in s['analogies']]
    return [f"Neighbours are searched among the {first['candidates']} tokens seen in train.bin (counts in brackets), "
            "analogies among these and the expected word.\n",
            table(['probe', *studies], [[f"{show(w)} ({first['probe_counts'][w]})",
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


def token_section(W, counts, probe_ids, enc, report_dir):
    """The token studies of W_E with the norm-vs-frequency scatter: (json, markdown)."""
    studies = token_studies(W, counts, probe_ids, enc)
    nf, norms, seen = studies['norm_frequency'], np.linalg.norm(W, axis=1), counts > 0
    fig, ax = plt.subplots(figsize=(6.5, 4.2), layout='constrained')
    ax.scatter(counts[seen], norms[seen], s=4, alpha=0.4, label=f"seen in train.bin ({nf['n_seen']})")
    ax.scatter(np.full((~seen).sum(), 0.5), norms[~seen], s=4, alpha=0.2, color='C3',
               label=f"never seen ({nf['n_unseen']}), drawn at 0.5")
    ax.set(xscale='log', xlabel='count in train.bin', ylabel='||W_E[i]||',
           title=f"W_E: norm vs frequency (Spearman {nf['spearman_seen']:.2f} over seen tokens)")
    ax.legend()
    return studies, ['## Token embeddings (W_E)\n', *token_markdown({'this model': studies}),
                     save(fig, report_dir, 'token_norm_frequency.png')]


def logit_lens_section(model, x, y, report_dir):
    """The val loss of each layer decoded through LN_f and the tied head: (json, markdown)."""
    losses = logit_lens(model, x, y)
    return {'loss_by_layer': losses, 'tokens': x.numel()}, [
        '## Logit lens\n', table(['layer (0 = embeddings)', 'val loss'], list(enumerate(losses))),
        plot_lines(report_dir, 'logit_lens.png', 'Logit lens: each layer decoded through LN_f and the tied head',
                   'layer (0 = embeddings)', 'val loss (nats)', [(range(len(losses)), losses, 'o-', None)],
                   xticks=range(len(losses)))]


def dynamics_section(snapshots, report_dir):
    """W_E's drift from init by token frequency, and W_pos's cosine-vs-distance curve, at each snapshot."""
    iters = snapshots['iters']
    md = ['## During training\n', f"Spearman(drift at the last snapshot, log count) over the tokens seen: "
          f"{snapshots['drift_spearman_log_count']:.3f}.\n",
          plot_lines(report_dir, 'dynamics_drift.png', 'W_E: drift from init, median by token frequency', 'iteration',
                     'median ||W_E(t) - W_E(0)||',
                     [(iters, v, 'o-', f'count {label}') for label, v in snapshots['drift_median'].items()])]
    if snapshots['pos_mean_cos_by_distance']:
        fig, ax = plt.subplots(figsize=(6.5, 4), layout='constrained')
        scale = plt.Normalize(iters[0], iters[-1])  # a curve's colour is its iteration's, as on the colour bar
        for curve, colour in zip(snapshots['pos_mean_cos_by_distance'], plt.cm.viridis(scale(np.array(iters)))):
            ax.plot(curve, color=colour, lw=1)
        fig.colorbar(plt.cm.ScalarMappable(scale, 'viridis'), ax=ax, label='iteration')
        ax.set(title='W_pos: cosine vs distance during training', xlabel='distance k', ylabel='mean cos(p_t, p_t+k)')
        md.append(save(fig, report_dir, 'dynamics_positional.png'))
    return md


def onset_section(tables, seen, train_tokens, evals, reference, report_dir):
    """When W_pos takes shape: position_statistics of W_pos and of its learned part W_pos - W_pos(0)
    (0: the first snapshot, the init when the run saved one at iteration 0) at every snapshot,
    tables = {iteration: W_pos}, against tokens seen ({iteration: tokens} or None), passes over
    the train_tokens of the book and the losses of the evaluations at the same iterations. The
    onset is the first snapshot where abs corr(PC, t) reaches ONSET_THRESHOLD. reference: a
    position table to put beside them (GPT-2's rows 0..T-1) or None. (json, markdown)"""
    iters = sorted(tables)
    first, losses = tables[iters[0]], {e['iter']: e for e in evals}
    records = []
    for i in iters:
        tokens = None if seen is None else seen[i]
        records.append({'iter': i, 'tokens_seen': tokens, 'passes': None if tokens is None else tokens / train_tokens,
                        'train_loss': losses.get(i, {}).get('train_loss'), 'val_loss': losses.get(i, {}).get('val_loss'),
                        'W_pos': position_statistics(tables[i]),
                        'learned': position_statistics(tables[i] - first) if i != iters[0] else None})
    T = len(first)
    out = {'threshold': ONSET_THRESHOLD, 'first_snapshot': iters[0], 'records': records,
           'onset_iter': onset(iters, [r['W_pos']['pc_corr'] for r in records], ONSET_THRESHOLD),
           'onset_iter_learned': onset(iters, [r['learned'] and r['learned']['pc_corr'] for r in records],
                                       ONSET_THRESHOLD),
           'reference': None if reference is None else position_statistics(reference[:T])}

    def rows(key):
        return [[r['iter'], '' if r['tokens_seen'] is None else f"{r['tokens_seen']:,}",
                 '' if r['passes'] is None else f"{r['passes']:.2f}",
                 *('' if r[loss] is None else f'{r[loss]:.3f}' for loss in ('train_loss', 'val_loss')),
                 *(('', ) * len(ONSET_STATISTICS) if r[key] is None else
                   (f"{r[key][s]:.3f} (PC{r[key]['pc_corr_which']})" if s == 'pc_corr' and not math.isnan(r[key][s])
                    else f'{r[key][s]:.3f}'
                    for s in ONSET_STATISTICS))] for r in records]
    header = ['iteration', 'tokens seen', 'passes', 'train loss', 'val loss', *ONSET_STATISTICS.values()]
    reference_row = [] if reference is None else [['reference', '', '', '', '',
                                                    *(f"{out['reference'][s]:.3f}" for s in ONSET_STATISTICS)]]

    def said(at):
        if at is None:
            return 'not reached'
        r = records[iters.index(at)]
        return f"at iteration {at}" + ('' if r['tokens_seen'] is None else
                                       f" ({r['tokens_seen']:,} tokens, {r['passes']:.2f} passes over the book)")

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), layout='constrained', sharey=True)
    for ax, key, title in zip(axes, ('W_pos', 'learned'), ('W_pos', f'learned part W_pos - W_pos({iters[0]})')):
        kept = [r for r in records if r[key] is not None]
        for k, (s, label) in enumerate(ONSET_STATISTICS.items()):
            if s != 'mean_norm':
                ax.plot([r['iter'] for r in kept], [r[key][s] for r in kept], 'o-', ms=3, color=f'C{k}', label=label)
        ax.axhline(ONSET_THRESHOLD, color='grey', ls=':')
        ax.set(title=title, xlabel='iteration')
        evaluated = [r for r in records if r['val_loss'] is not None]
        if evaluated:
            loss_axis = ax.twinx()
            loss_axis.plot([r['iter'] for r in evaluated], [r['val_loss'] for r in evaluated], 'k--', label='val loss')
            loss_axis.set_ylabel('val loss (dashed)')
    axes[0].legend(fontsize=8)
    return out, ['## When W_pos takes shape\n',
                 f"W_pos at each of the run's snapshots, and its learned part W_pos - W_pos({iters[0]}): what training "
                 "has added to its start (independent random rows, the default start, give mean cosines near 0 and "
                 "cos(delta_t, delta_t+1) near -0.5; an all-zero start gives 0 for both, and nan for PC1's share and corr(PC, t)). max abs corr(PC, t) is the largest of PC1-PC3 (which one in "
                 f"brackets); the onset is the first snapshot where it reaches {ONSET_THRESHOLD}. Passes: tokens seen "
                 f"over the {train_tokens:,} train tokens. Losses where an evaluation fell on the snapshot.\n",
                 f"Onset: W_pos {said(out['onset_iter'])}; its learned part {said(out['onset_iter_learned'])}.\n",
                 '### W_pos\n', table(header, rows('W_pos') + reference_row),
                 f'### Learned part, W_pos - W_pos({iters[0]})\n', table(header, rows('learned')[1:]),
                 save(fig, report_dir, 'onset.png')]


def stability_section(W_E, W_pos, other_name, other_W_E, other_W_pos, counts, top_n):
    """How alike this run's tables and another seed's are (CKA, RSA, neighbour overlap, Procrustes):
    W_E over the most frequent tokens, W_pos over the positions both have: (json, markdown)."""
    tokens = frequent_tokens(counts, top_n)
    out = {'compare_out_dir': other_name, 'tokens_compared': len(tokens),
           'W_E': similarity_and_chance(W_E[tokens], other_W_E[tokens])}
    n = min(len(W_pos), len(other_W_pos)) if W_pos is not None and other_W_pos is not None else 0
    if n >= MIN_POSITIONS:
        out['W_pos'] = similarity_and_chance(W_pos[:n], other_W_pos[:n])
    names = [k for k in ('W_E', 'W_pos') if k in out]
    return out, [f'## Across seeds: this run vs {other_name}\n', f'W_E over the {len(tokens)} most frequent '
                 f'tokens seen at least {MIN_COUNT} times' + ('; W_pos over the positions both have' if n >= MIN_POSITIONS
                                                            else '') + '. ' + CHANCE + '\n',
                 similarity_table(names, [out[k] for k in names])]


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


def compare_section(names, tables, counts, probe_ids, enc, top_n, report_dir):
    """Token studies of each W_E, and CKA, RSA, neighbour overlap, Procrustes between each pair: (json, markdown)."""
    tokens = frequent_tokens(counts, top_n)
    studies = {name: token_studies(W, counts, probe_ids, enc) for name, W in zip(names, tables)}
    pairs = {(i, j): similarity_and_chance(tables[i][tokens], tables[j][tokens])
             for i in range(len(names)) for j in range(i + 1, len(names))}
    fig, axes = plt.subplots(2, 2, figsize=(12, 10), layout='constrained')
    for ax, (key, title) in zip(axes.flat, SIMILARITIES.items()):
        M = np.eye(len(names))
        for (i, j), s in pairs.items():
            M[i, j] = M[j, i] = s[key]
        heatmap(ax, fig, M, title, names, names, key, cmap='RdBu_r', vmin=-1, vmax=1)
    fig.suptitle(f'W_E compared over the {len(tokens)} most frequent tokens seen at least {MIN_COUNT} times')
    md = [f"# Token embeddings compared: {', '.join(names)}\n", '## Each table on its own\n',
          *token_markdown(studies),
          f'## Between tables, over the {len(tokens)} most frequent tokens seen at least {MIN_COUNT} times\n',
          CHANCE + '\n',
          similarity_table([f'{names[i]} vs {names[j]}' for i, j in pairs], pairs.values()),
          save(fig, report_dir, 'compare.png')]
    return {'models': names, 'tokens_compared': len(tokens), 'token_studies': studies,
            'pairs': [{'a': names[i], 'b': names[j], **s} for (i, j), s in pairs.items()]}, md


def training_section(names, settings, models, evals_by_model):
    """Each checkpoint's loss at initialisation (against ln V + s^2/2) and at the end, as perplexity
    and bits per byte, from the eval events of its log.jsonl ([] for none): (json, markdown)."""
    out = {}
    for name, config, model, evals in zip(names, settings, models, evals_by_model):
        if not evals:
            continue
        # at init the logits h.w_i have variance s^2 = n_embd * 0.02^2 (LN output times N(0, 0.02^2) rows),
        # and the mean of log sum exp over V roughly normal logits is ln V + s^2 / 2
        expected = math.log(model.config.vocab_size) + model.config.n_embd * 0.02 ** 2 / 2
        out[name] = {'objective': config.get('objective', 'clm'), 'seed': config.get('seed'),
                     'sampler': config.get('sampler'), 'iterations': evals[-1]['iter'],
                     'init_val_loss': evals[0]['val_loss'] if evals[0]['iter'] == 0 else None,
                     'init_expected': expected, 'val_loss': evals[-1]['val_loss'],
                     'perplexity': None if evals[-1]['val_loss'] is None else math.exp(evals[-1]['val_loss']),
                     'val_bpb': evals[-1].get('val_bpb'),
                     'coverage': evals[-1].get('coverage')}
    if not out:
        return out, []
    return out, ['## The models\n', "The val loss before the first step against ln V + s^2/2 (logits of variance s^2 = "
                 "n_embd x 0.02^2 at init), and at the end as perplexity e^loss and bits per byte. A masked LM's loss "
                 "is over its masked tokens only: its perplexity is a pseudo-perplexity and it has no bits per byte.\n",
                 table(['model', 'objective', 'seed', 'sampler', 'iterations', 'val loss at init', 'ln V + s^2/2',
                        'final val loss', 'perplexity', 'val bpb', 'coverage'],
                       [[name, *(('' if r[key] is None else r[key]) for key in list(r))] for name, r in out.items()])]


def seed_replicas(settings):
    """The pairs of runs, from {name: train.py's settings}, that differ in their seed and in nothing
    else that changes what they learn (RUN_BOOKKEEPING aside): the same experiment repeated."""
    learned = {name: {k: v for k, v in s.items() if k not in RUN_BOOKKEEPING and k != 'seed'}
               for name, s in settings.items()}
    names = list(settings)
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
            if settings[a].get('seed') != settings[b].get('seed') and learned[a] == learned[b]]


def contextual_section(names, tables, models, settings, counts, val, enc, report_dir, notes):
    """Static vs contextual over the val text: for each transformer (models, with its train.py
    settings) the measures of geometry.contextual_geometry after every layer, for each static table
    the same with every occurrence given its row, and the CKA of each layer's per-type means with
    every table: (json, markdown)."""
    T = min(len(val), *(m.config.block_size for m in models.values()))
    ids = val[:len(val) // T * T].astype(np.int64)
    types = np.flatnonzero((np.bincount(ids, minlength=VOCAB_SIZE) >= MIN_COUNT) & (counts > 0))
    if not len(types):
        notes.append(f'static vs contextual skipped: no token occurs {MIN_COUNT}+ times in the val text')
        return None, []
    probe_ids = {w: enc.encode_ordinary(w)[0] for w in CONTEXT_PROBES}
    out = {'tokens': len(ids), 'window': T, 'types': len(types), 'min_count': MIN_COUNT,
           'probe_counts': {w: int((ids == i).sum()) for w, i in probe_ids.items()}, 'models': {}}
    for name, W in zip(names, tables):
        model = models.get(name)
        layers = [W[ids]] if model is None else [h.flatten(0, 1).double().numpy() for h in
                                                 residual_stream(model, torch.from_numpy(ids).view(-1, T))]
        rows = []
        for H in layers:
            g = contextual_geometry(H, ids, types, T)
            by_type = g.pop('self_similarity_by_type')
            means = type_means(H, ids, types)
            rows.append({**g, 'probes': {w: by_type.get(i) for w, i in probe_ids.items()},
                         'cka': {other: linear_cka(means, W_other[types]) for other, W_other in zip(names, tables)}})
        out['models'][name] = {'contextual': model is not None, 'layers': rows}
    # two checkpoints of one shape trained alike but for their seed: their gap is the noise floor
    seeds = [(a, b) for a, b in seed_replicas(settings) if models[a].config == models[b].config]
    out['seed_pairs'] = [list(pair) for pair in seeds]
    out['seed_spread'] = {key: max(abs(x[key] - y[key]) for a, b in seeds for x, y in
                                   zip(out['models'][a]['layers'], out['models'][b]['layers']))
                          for key in CONTEXT_MEASURES} if seeds else None
    return out, contextual_markdown(out, names, report_dir)


def contextual_markdown(out, names, report_dir):
    """The tables and figures of contextual_section's results."""
    models, n_layers = out['models'], max(len(m['layers']) for m in out['models'].values())
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), layout='constrained')
    for ax, (key, title) in zip(axes.flat, CONTEXT_MEASURES.items()):
        for k, (name, m) in enumerate(models.items()):
            values = [layer[key] for layer in m['layers']]
            if m['contextual']:
                ax.plot(range(len(values)), values, 'o-', color=f'C{k}', ms=4, label=name)
                if key == 'pc_share':  # the same for as many occurrences of any type
                    ax.plot(range(len(values)), [layer['pc_share_random'] for layer in m['layers']], ':',
                            color=f'C{k}')
            else:
                ax.axhline(values[0], ls='--', color=f'C{k}', label=f'{name} (static)')
        ax.set(title=title, xlabel='layer (0 = embeddings)', xticks=range(n_layers))
    axes.flat[0].legend(fontsize=8)
    axes.flat[3].set_title(CONTEXT_MEASURES['pc_share'] + ' (dotted: random occurrences)')
    fig.suptitle(f"One vector per occurrence: {out['tokens']:,} val tokens, {out['types']} token types seen "
                 f"{out['min_count']}+ times")
    figure = save(fig, report_dir, 'contextual.png')
    contextual = [name for name, m in models.items() if m['contextual']]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), layout='constrained', squeeze=False)
    for ax, table_name in zip(axes[0], names):
        for k, name in enumerate(models):
            if name in contextual:
                ax.plot([layer['cka'][table_name] for layer in models[name]['layers']], 'o-', color=f'C{k}', ms=4,
                        label=name)
        ax.set(title=f'vs W_E of {table_name}', xlabel='layer', ylim=(0, 1), xticks=range(n_layers))
    axes[0, 0].set_ylabel('linear CKA of per-type means')
    axes[0, 0].legend(fontsize=7)
    cka_figure = save(fig, report_dir, 'contextual_cka.png')
    header = ['model', 'measure', *(f'layer {i}' for i in range(n_layers))]
    rows = [[name, label, *(layer[key] for layer in m['layers'])] for key, label in CONTEXT_MEASURES.items()
            for name, m in models.items()]
    rows += [[name, 'first-PC share, random occurrences', *(layer['pc_share_random'] for layer in m['layers'])]
             for name, m in models.items() if m['contextual']]
    probe_rows = [[name, f"{show(w)} ({out['probe_counts'][w]})",
                   *('' if layer['probes'][w] is None else layer['probes'][w] for layer in models[name]['layers'])]
                  for name in contextual for w in CONTEXT_PROBES]
    spread = out['seed_spread']
    return ['# Static vs contextual: one vector per word, or one per occurrence\n',
            f"The val text, {out['tokens']:,} tokens read as windows of {out['window']}: for each transformer the "
            "residual stream after the embeddings (layer 0, token plus position) and after each block gives one "
            "vector per occurrence (the masked LM reads the text with nothing masked); a static table gives every "
            "occurrence of a token its row. Averages are over the "
            f"{out['types']} token types that occur at least {out['min_count']} times there and were seen in "
            "train.bin. Self-similarity and intra-context similarity are given minus the layer's anisotropy: "
            "a static table's self-similarity is 1 - anisotropy and its first-PC share 1; with a fresh random "
            f"vector per occurrence self-similarity is about 0 and intra-context similarity about "
            f"1/sqrt({out['window']}) = {out['window'] ** -0.5:.3f}.\n",
            table(header, [[name, label, *values, *[''] * (n_layers - len(values))] for name, label, *values in rows]),
            (f"Noise floor: {' and '.join(' vs '.join(pair) for pair in out['seed_pairs'])}, the same model "
             "trained alike with another seed, differ by at most "
             + ', '.join(f'{spread[key]:.3f} in {key.replace("_", " ")}' for key in CONTEXT_MEASURES) + ' at any layer.\n')
            if spread else 'Add the same run with another --seed to --compare to see the noise floor.\n',
            figure, '## Self-similarity of probe words (minus anisotropy; count in the val text)\n',
            table(['model', 'word', *(f'layer {i}' for i in range(n_layers))], probe_rows),
            '## How much of each static table a layer still holds\n',
            "Linear CKA between a layer's per-type mean vectors and each model's W_E rows, over the same types.\n",
            table(['model', 'vs W_E of', *(f'layer {i}' for i in range(n_layers))],
                  [[name, other, *(layer['cka'][other] for layer in models[name]['layers'])]
                   for name in contextual for other in names]), cka_figure]
