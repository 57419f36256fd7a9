"""
What a trained GPT-2 put in its embeddings: the geometry of the position table W_pos and the
token table W_E, how layer-0 attention uses them, how they formed during training and how
stable they are across seeds. Writes report.md (tables, figures inline), report.json and PNGs.

    $ python analyze.py --out_dir=out-gulliver              # a run of train.py: its best.pt, else ckpt.pt
    $ python analyze.py --init_from=gpt2                    # the pretrained GPT-2 weights
    $ python analyze.py --wpe_file=W_pos.npy                # any position table (T, d), T >= 8
    $ python analyze.py --out_dir=out-gulliver --compare_out_dir=out-gulliver-seed2
    $ python analyze.py --compare out-gulliver out-mlm out-sgns out-glove

The studies themselves are plain functions of arrays in geometry.py, and of the model in
circuits.py; this script loads, checks, wires and reports.
"""
import glob
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import matplotlib
matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from atomic import write_atomic
from circuits import TERMS, logit_lens, position_table, qk_decomposition, residual_stream
from configurator import at_least, check, configure, one_of, resolve_device
from data import read_split
from download import DownloadError
from geometry import (analogy, anisotropy, contextual_geometry, cosine_matrix, drift_vs_frequency, linear_cka,
                      mean_cos_by_distance, nearest_neighbours, norm_vs_frequency, pca, positional_geometry, similarity,
                      type_means)
from model import load_model
from runlog import plot_losses, read_events
from tokenizer import VOCAB_SIZE, get_tokenizer

# -----------------------------------------------------------------------------
init_from = 'resume'      # 'resume' (the run in out_dir), 'gpt2'..'gpt2-xl', or a Hugging Face directory
out_dir = 'out-gulliver'  # with init_from='resume': best.pt or ckpt.pt, log.jsonl and snapshots/
checkpoint = 'best'       # 'best': a run's best.pt where train.py kept one, else its ckpt.pt; 'last': ckpt.pt
wpe_file = ''             # a .npy position table (T, d) to analyse instead of a model
wte_file = ''             # a .npy token table (50257, d) to analyse instead of a model
data_dir = ''             # train.bin and val.bin; '': the checkpoint's data_dir, else data/gulliver
report_dir = 'report'     # where report.md, report.json and the figures go
compare_out_dir = ''      # the same model trained with another seed: how stable is the geometry?
compare = []              # `--compare DIR DIR ...`: directories with ckpt.pt or W_E.npy, W_E side by side
probes = ''               # more probe words, comma-separated; each is looked up as ' word' (as in running text)
eval_tokens = 2048        # val tokens for the logit lens and the layer-0 attention decomposition
top_n = 3000              # at most this many of the most frequent tokens in RSA, CKA and neighbour overlap
device = 'auto'           # 'auto', 'cpu', 'cuda', ...
# -----------------------------------------------------------------------------
PROBE_WORDS = [' king', ' queen', ' man', ' woman', ' ship', ' sea', ' horse', ' giant', ' small']
ANALOGIES = [(' man', ' king', ' woman', ' queen'), (' man', ' men', ' woman', ' women'),  # a : b :: c : d
             (' he', ' his', ' she', ' her'), (' great', ' greater', ' small', ' smaller'),
             (' England', ' English', ' France', ' French')]
MIN_COUNT = 5  # tokens seen fewer times in train.bin are left out of the comparisons between tables
SIMILARITIES = {'cka': 'linear CKA', 'rsa': 'RSA (Spearman of the cosines)', 'nn_overlap_10': 'neighbour overlap @10',
                'procrustes_cos': 'mean cosine after Procrustes'}
CONTEXT_PROBES = [' king', ' sea', ' ship', ' little', ' great', ' said']
CONTEXT_MEASURES = {'anisotropy': 'anisotropy (mean cos of two occurrences)',
                    'self_similarity': 'self-similarity - anisotropy',
                    'intra_context': 'intra-context similarity - anisotropy',
                    'pc_share': 'share of a type on its first PC'}
FREQUENCY_BINS = [(0, 0, 'unseen'), (1, 9, '1-9'), (10, 99, '10-99'), (100, 999, '100-999'), (1000, math.inf, '1000+')]


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


# ---- loading: every check happens here, before anything is written -------------------------

def load_matrix(path, name, min_rows=1, rows=None):
    """A finite float matrix (n, d) from a .npy file; anything else exits with one line."""
    try:
        M = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        sys.exit(f"error: --{name}: no such file {path}")
    except (OSError, ValueError, EOFError):
        sys.exit(f"error: --{name}: {path} is not a .npy file of numbers (write one with numpy.save)")
    if not isinstance(M, np.ndarray):
        sys.exit(f"error: --{name}: {path} holds several arrays (.npz); save one matrix with numpy.save")
    if M.ndim != 2:
        sys.exit(f"error: --{name}: expected a matrix (rows, d), got shape {M.shape}")
    if M.dtype.kind != 'f':
        sys.exit(f"error: --{name}: expected a float matrix, got dtype {M.dtype}")
    if len(M) < min_rows or (rows is not None and len(M) != rows):
        sys.exit(f"error: --{name}: expected {rows or f'at least {min_rows}'} rows, got {len(M)}")
    if not np.isfinite(M).all():
        sys.exit(f"error: --{name}: {path} has {int((~np.isfinite(M)).sum())} NaN or infinite entries; save a matrix "
                 f"of finite numbers")
    return M.astype(np.float32)


def load_eval_model(init_from, out_dir, device):
    """(model in eval mode, train.py's settings or {}), or exit with one line."""
    try:
        model, saved = load_model(init_from, out_dir, device, checkpoint)
    except (DownloadError, ValueError) as e:
        sys.exit(f"error: {e}")
    return model.eval(), saved.get('config', {})


def load_tables(path, name):
    """(W_E, W_pos or None, settings, model or None) from a directory with ckpt.pt (train.py's
    settings, and the model) or W_E.npy (embeddings.py's, from embeddings.json: data_dir among them)."""
    if os.path.exists(os.path.join(path, 'ckpt.pt')):
        model, config = load_eval_model('resume', path, 'cpu')
        P = position_table(model)
        return model.W_E.detach().numpy(), None if P is None else P.detach().numpy(), config, model
    if os.path.exists(os.path.join(path, 'W_E.npy')):
        summary_path, settings = os.path.join(path, 'embeddings.json'), {}
        if os.path.exists(summary_path):
            try:
                with open(summary_path, encoding='utf-8') as f:
                    settings = json.load(f)['settings']
            except (ValueError, KeyError, TypeError, OSError):
                sys.exit(f"error: --{name}: {summary_path} is damaged; train the embeddings again")
        return load_matrix(os.path.join(path, 'W_E.npy'), name, rows=VOCAB_SIZE), None, settings, None
    sys.exit(f"error: --{name}: {path} holds neither ckpt.pt nor W_E.npy; pass directories written by train.py or embeddings.py")


def load_tokens(data_dir, split):
    """The token ids of data_dir/{split}.bin (data.read_split), or exit with one line."""
    try:
        return read_split(data_dir, split)
    except ValueError as e:
        sys.exit(f"error: {e}")


def load_snapshots(folder, counts):
    """Per-token drift |W_E(t) - W_E(0)| by frequency, and the W_pos cosine-vs-distance curve, at each
    snapshot (np.savez files iter_*.npz with W_E and, for a learned table, W_pos)."""
    paths = sorted(glob.glob(os.path.join(folder, 'iter_*.npz')))
    if len(paths) < 2:
        return None
    out = {'iters': [], 'drift_median': {label: [] for *_, label in FREQUENCY_BINS}, 'pos_mean_cos_by_distance': []}
    W0 = None
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as z:
                W, P = z['W_E'][:VOCAB_SIZE].astype(np.float32), z['W_pos'].astype(np.float32) if 'W_pos' in z else None
            out['iters'].append(int(os.path.basename(path)[5:-4]))
        except (OSError, ValueError, KeyError, EOFError):
            sys.exit(f"error: {path} is not a snapshot written by train.py (np.savez with W_E)")
        W0 = W if W0 is None else W0
        if W.shape != W0.shape:
            sys.exit(f"error: {path} holds W_E of shape {W.shape}, {paths[0]} {W0.shape}: snapshots of two runs "
                     f"in {folder}; keep one run's")
        drift = np.linalg.norm(W - W0, axis=1)
        for lo, hi, label in FREQUENCY_BINS:
            in_bin = (counts >= lo) & (counts <= hi)
            out['drift_median'][label].append(float(np.median(drift[in_bin])) if in_bin.any() else None)
        if P is not None:
            out['pos_mean_cos_by_distance'].append(mean_cos_by_distance(P))
    out['drift_spearman_log_count'] = drift_vs_frequency(W0, W, counts)
    return out


def read_log(path):
    """The train and eval events of log.jsonl (a last line still being written, with no newline yet, is left out)."""
    try:
        events = read_events(path)
    except ValueError as e:
        sys.exit(f"error: {e}")
    return [e for e in events if e.get('event') == 'train'], [e for e in events if e.get('event') == 'eval']


def frequent_tokens(counts):
    """Ids (ascending) of the top_n most frequent tokens, of those seen at least MIN_COUNT times."""
    order = np.argsort(-counts, kind='stable')
    return np.sort(order[counts[order] >= MIN_COUNT][:top_n])


# ---- figures and report ---------------------------------------------------------------------

def save(fig, name):
    """Write a figure into report_dir; return the markdown that shows it."""
    fig.savefig(os.path.join(report_dir, name), dpi=110)
    plt.close(fig)
    figures.append(name)
    return f'![{name}]({name})\n'


def plot_lines(name, title, xlabel, ylabel, lines, **axes):
    """A figure of curves, lines = [(x, y, style, label or None), ...]; returns its markdown."""
    fig, ax = plt.subplots(figsize=(6.5, 4), layout='constrained')
    for x, y, style, label in lines:
        ax.plot(x, y, style, ms=3, label=label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, **axes)
    if any(label for *_, label in lines):
        ax.legend()
    return save(fig, name)


def heatmap(ax, fig, M, title, xlabels, ylabels, label, **imshow):
    """An annotated matrix with its colour bar."""
    im = ax.imshow(M, aspect='auto', **imshow)
    fig.colorbar(im, ax=ax, label=label)
    ax.set(title=title, xticks=range(len(xlabels)), yticks=range(len(ylabels)), yticklabels=ylabels)
    ax.set_xticklabels(xlabels, rotation=30, ha='right')
    for (i, j), v in np.ndenumerate(M):
        r, g, b, _ = im.cmap(im.norm(v))  # dark text on light cells, light text on dark ones
        ax.text(j, i, f'{v:.2f}', ha='center', va='center', fontsize=8, color='k' if r + 2 * g + b > 2 else 'w')


def table(header, rows):
    return '\n'.join(['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)] +
                     ['| ' + ' | '.join(f'{c:.4g}' if isinstance(c, float) else str(c) for c in row) + ' |'
                      for row in rows]) + '\n'


def show(token):
    """A token in markdown: quoted, with newlines and table bars escaped."""
    return '`' + repr(token).replace('|', '\\|').replace('`', "'") + '`'


def positional_section(P):
    """The positional studies of a table P (T, d), with their figures: (json, markdown)."""
    g, k, T = positional_geometry(P), np.arange(len(P)), len(P)
    ratios, alpha, r2 = g['pca_explained_variance'], g['exp_fit']['alpha'], g['exp_fit']['r2']
    dc, line = g['delta_consecutive_cos_mean'], g['linear_fit_r2']
    md = ['## Positional embeddings (W_pos, %d x %d)\n' % P.shape, table(['quantity', 'value'], [
        ['norm of p_t: min / mean / max', ' / '.join(f"{f(g['norms']):.3f}" for f in (np.min, np.mean, np.max))],
        ['mean cos at distance 1 / T/4 / T/2', ' / '.join(f"{g['mean_cos_by_distance'][j]:.3f}" for j in (1, T // 4, T // 2))],
        ['fit cos ~ exp(-alpha k)', f'alpha = {alpha:.4g}, R^2 = {r2:.3f}'],
        ['variance of PC1, PC2, PC3', ', '.join(f'{r:.1%}' for r in ratios[:3])],
        ['components for 80% / 90% of the variance', f"{g['n_components_80']} / {g['n_components_90']}"],
        ['abs corr(PC score, t) for PC1, PC2, PC3', ', '.join(f'{c:.3f}' for c in g['pc_abs_corr_with_position'][:3])],
        ['mean cos(delta_t, delta_t+1), delta_t = p_t+1 - p_t', f'{dc:.3f}'],
        ['variance explained by the line p_t = a + t b', f'{line:.1%}']]),
        f"The steps delta_t are {'nearly parallel' if dc > 0.9 else 'far from parallel'} (mean cosine {dc:.2f}) and the "
        f"best line a + t b explains {line:.0%} of the variance: the picture p_t ~ a + t b "
        f"{'holds' if line > 0.9 else 'does not hold'} for this table.\n",
        plot_lines('positional_norms.png', 'W_pos: norm of each position', 'position t', '||p_t||',
                   [(k, g['norms'], '-', None)]),
        plot_lines('positional_cos_by_distance.png', 'W_pos: cosine similarity vs distance', 'distance k',
                   'mean cos(p_t, p_t+k)', [(k, g['mean_cos_by_distance'], '-', 'mean over t'),
                                            (k, np.exp(-alpha * k), '--', f'exp(-{alpha:.3g} k), R^2 = {r2:.2f}')])]
    fig, ax = plt.subplots(figsize=(5.5, 4.5), layout='constrained')
    fig.colorbar(ax.imshow(cosine_matrix(P), cmap='RdBu_r', vmin=-1, vmax=1), ax=ax, label='cos(p_i, p_j)')
    ax.set(title='W_pos: cosine similarity of positions', xlabel='position j', ylabel='position i')
    md.append(save(fig, 'positional_cosine.png'))
    scores = pca(np.asarray(P, np.float64))[1]
    pairs = [(i, j) for i, j in ((0, 1), (1, 2)) if j < scores.shape[1]]
    if pairs:
        fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4.2), layout='constrained', squeeze=False)
        for ax, (i, j) in zip(axes[0], pairs):
            points = ax.scatter(scores[:, i], scores[:, j], c=k, cmap='viridis', s=10)
            ax.set(title=f'W_pos: PC{i + 1} vs PC{j + 1}', xlabel=f'PC{i + 1} ({ratios[i]:.0%} of variance)',
                   ylabel=f'PC{j + 1} ({ratios[j]:.0%} of variance)')
        fig.colorbar(points, ax=axes[0].tolist(), label='position t')
        md.append(save(fig, 'positional_pca.png'))
    fig, ax = plt.subplots(figsize=(6.5, 4), layout='constrained')
    n = np.arange(1, min(len(ratios), max(30, g['n_components_90'] + 5)) + 1)
    ax.bar(n, ratios[:len(n)], label='each component')
    ax.plot(n, np.cumsum(ratios)[:len(n)], 'o-', color='C1', ms=3, label='cumulative (dotted: 80%, 90%)')
    ax.axhline(0.8, color='grey', ls=':'), ax.axhline(0.9, color='grey', ls=':')
    ax.set(title='W_pos: PCA explained variance', xlabel='principal component', ylabel='fraction of variance',
           ylim=(0, 1.02))
    ax.legend()
    return g, md + [save(fig, 'positional_explained_variance.png')]


def attention_section(qk):
    share = np.array(qk['share_by_head'])
    fig, ax = plt.subplots(figsize=(7, 1.4 + 0.45 * len(share)), layout='constrained')
    heatmap(ax, fig, share, 'Layer 0: share of the within-query score variance', TERMS,
            [f'head {h}' for h in range(len(share))], 'Cov(part, score) / Var(score)', cmap='RdBu_r', vmin=-1, vmax=1)
    return ['### Layer-0 attention: what the query-key scores are made of\n',
            "LN(e + p) = gamma*e_c/sigma + gamma*p_c/sigma + beta with one sigma, so each score q_i.k_j splits exactly "
            "into five parts. A cell is the part's share Cov(part, score) / Var(score) of the score variance within a "
            "query (softmax ignores what is the same for all of a query's keys); a head's shares add up to 1. "
            f"Over {qk['tokens']} val tokens the parts add back to the model's own scores within "
            f"{qk['max_abs_error']:.1e} (largest score {qk['max_abs_score']:.1f}).\n",
            table(['head'] + TERMS, [[h, *(f'{v:.3f}' for v in row)] for h, row in enumerate(share)] +
                  [['mean', *(f'{v:.3f}' for v in qk['share_mean'])]]), save(fig, 'attention_layer0.png')]


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
            f"{int(np.median(ranks))} of {first['candidates']} (chance: about {first['candidates'] // 2}).\n",
            table(['', *studies], [[label, *(s[key][sub] for s in columns)] for label, key, sub in (
                ('Spearman(norm, log count), seen tokens', 'norm_frequency', 'spearman_seen'),
                ('mean norm, seen tokens', 'norm_frequency', 'mean_norm_seen'),
                ('mean norm, never-seen tokens', 'norm_frequency', 'mean_norm_unseen'),
                ('anisotropy, all rows: raw', 'anisotropy', 'raw'),
                ('anisotropy, all rows: centred', 'anisotropy', 'centred'),
                ('anisotropy, seen rows: raw', 'anisotropy_seen', 'raw'),
                ('anisotropy, seen rows: centred', 'anisotropy_seen', 'centred'))])]


def token_section(W, counts, probe_ids, enc):
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
                     save(fig, 'token_norm_frequency.png')]


def dynamics_section(snapshots):
    iters = snapshots['iters']
    md = ['## During training\n', f"Spearman(drift at the last snapshot, log count) over the tokens seen: "
          f"{snapshots['drift_spearman_log_count']:.3f}.\n",
          plot_lines('dynamics_drift.png', 'W_E: drift from init, median by token frequency', 'iteration',
                     'median ||W_E(t) - W_E(0)||',
                     [(iters, v, 'o-', f'count {label}') for label, v in snapshots['drift_median'].items()])]
    if snapshots['pos_mean_cos_by_distance']:
        fig, ax = plt.subplots(figsize=(6.5, 4), layout='constrained')
        for curve, colour in zip(snapshots['pos_mean_cos_by_distance'], plt.cm.viridis(np.linspace(0, 1, len(iters)))):
            ax.plot(curve, color=colour, lw=1)
        fig.colorbar(plt.cm.ScalarMappable(plt.Normalize(iters[0], iters[-1]), 'viridis'), ax=ax, label='iteration')
        ax.set(title='W_pos: cosine vs distance during training', xlabel='distance k', ylabel='mean cos(p_t, p_t+k)')
        md.append(save(fig, 'dynamics_positional.png'))
    return md


def compare_section(names, tables, counts, probe_ids, enc):
    """Token studies of each W_E, and CKA, RSA, neighbour overlap, Procrustes between each pair: (json, markdown)."""
    tokens = frequent_tokens(counts)
    studies = {name: token_studies(W, counts, probe_ids, enc) for name, W in zip(names, tables)}
    pairs = {(i, j): similarity(tables[i][tokens], tables[j][tokens])
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
          similarity_table([f'{names[i]} vs {names[j]}' for i, j in pairs], pairs.values()), save(fig, 'compare.png')]
    return {'models': names, 'tokens_compared': len(tokens), 'token_studies': studies,
            'pairs': [{'a': names[i], 'b': names[j], **s} for (i, j), s in pairs.items()]}, md


def training_section(names, settings, models, dirs):
    """Each checkpoint's loss at initialisation (against ln V + s^2/2) and at the end, as perplexity
    and bits per byte, from its log.jsonl: (json, markdown)."""
    out = {}
    for name, config, model, folder in zip(names, settings, models, dirs):
        path = os.path.join(folder, 'log.jsonl')
        evals = read_log(path)[1] if model is not None and os.path.exists(path) else []
        if not evals:
            continue
        # at init the logits h.w_i have variance s^2 = n_embd * 0.02^2 (LN output times N(0, 0.02^2) rows),
        # and the mean of log sum exp over V roughly normal logits is ln V + s^2 / 2
        expected = math.log(model.config.vocab_size) + model.config.n_embd * 0.02 ** 2 / 2
        out[name] = {'objective': config.get('objective', 'clm'), 'seed': config.get('seed'),
                     'sampler': config.get('sampler'), 'iterations': evals[-1]['iter'],
                     'init_val_loss': evals[0]['val_loss'] if evals[0]['iter'] == 0 else None,
                     'init_expected': expected, 'val_loss': evals[-1]['val_loss'],
                     'perplexity': math.exp(evals[-1]['val_loss']), 'val_bpb': evals[-1].get('val_bpb'),
                     'coverage': evals[-1].get('coverage')}
    if not out:
        return out, []
    return out, ['## The models\n', "The val loss before the first step against ln V + s^2/2 (logits of variance s^2 = "
                 "n_embd x 0.02^2 at init), and at the end as perplexity e^loss and bits per byte. A masked LM's loss "
                 "is over its masked tokens only: its perplexity is a pseudo-perplexity and it has no bits per byte.\n",
                 table(['model', 'objective', 'seed', 'sampler', 'iterations', 'val loss at init', 'ln V + s^2/2',
                        'final val loss', 'perplexity', 'val bpb', 'coverage'],
                       [[name, *(('' if r[key] is None else r[key]) for key in list(r))] for name, r in out.items()])]


def contextual_section(names, tables, models, counts, val, enc):
    """Static vs contextual over the val text: for each transformer the measures of
    geometry.contextual_geometry after every layer, for each static table the same with every
    occurrence given its row, and the CKA of each layer's per-type means with every table: (json, markdown)."""
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
    # two checkpoints of one shape and objective differ only by their seed: their gap is the noise floor
    seeds = [(a, b) for i, a in enumerate(models) for b in list(models)[i + 1:] if models[a].config == models[b].config]
    out['seed_pairs'] = [list(pair) for pair in seeds]
    out['seed_spread'] = {key: max(abs(x[key] - y[key]) for a, b in seeds for x, y in
                                   zip(out['models'][a]['layers'], out['models'][b]['layers']))
                          for key in CONTEXT_MEASURES} if seeds else None
    return out, contextual_markdown(out, names)


def contextual_markdown(out, names):
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
    figure = save(fig, 'contextual.png')
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
    cka_figure = save(fig, 'contextual_cka.png')
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
            "a static table scores 1 - anisotropy and a first-PC share of 1; a fresh vector per occurrence "
            "scores about 0.\n",
            table(header, [[name, label, *values, *[''] * (n_layers - len(values))] for name, label, *values in rows]),
            (f"Noise floor: {' and '.join(' vs '.join(pair) for pair in out['seed_pairs'])}, the same model with "
             "another seed, differ by at most " + ', '.join(f'{spread[key]:.3f} in {key.replace("_", " ")}'
                                                           for key in CONTEXT_MEASURES) + ' at any layer.\n')
            if spread else 'Add a second seed of a model to --compare to see the noise floor.\n',
            figure, '## Self-similarity of probe words (minus anisotropy; count in the val text)\n',
            table(['model', 'word', *(f'layer {i}' for i in range(n_layers))], probe_rows),
            '## How much of each static table a layer still holds\n',
            "Linear CKA between a layer's per-type mean vectors and each model's W_E rows, over the same types.\n",
            table(['model', 'vs W_E of', *(f'layer {i}' for i in range(n_layers))],
                  [[name, other, *(layer['cka'][other] for layer in models[name]['layers'])]
                   for name in contextual for other in names]), cka_figure]


def similarity_table(names, sims):
    return table(['', *SIMILARITIES.values()], [[name, *(s[key] for key in SIMILARITIES)] for name, s in zip(names, sims)])


def plain(o):
    """report.json values: numpy to lists and numbers, NaN and inf to None (JSON has neither)."""
    if isinstance(o, dict):
        return {str(k): plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple, np.ndarray)):
        return [plain(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(o) else None
    return int(o) if isinstance(o, np.integer) else o


if __name__ == '__main__':
    configure(globals())
    check(globals(), {'checkpoint': one_of('best', 'last'), 'eval_tokens': at_least(1), 'top_n': at_least(11)})
    t0, enc, figures, report, notes = time.time(), get_tokenizer(), [], {}, []
    device = resolve_device(device)
    probe_words = PROBE_WORDS + [' ' + w.strip() for w in probes.split(',') if w.strip()]
    probe_ids = {w: enc.encode_ordinary(w)[0] for w in probe_words if len(enc.encode_ordinary(w)) == 1}
    notes += [f'probe {w!r} is not a single GPT-2 token; skipped' for w in probe_words if w not in probe_ids]
    model, W_E, W_pos, config, other, log, snapshots = None, None, None, {}, None, None, None
    # load and check everything first, so that bad input leaves no partial report behind
    if compare:
        if len(compare) < 2:
            sys.exit("error: --compare needs at least two directories, e.g. --compare out-gulliver out-sgns")
        loaded = [load_tables(d, 'compare') for d in compare]
        trained_on = sorted({c['data_dir'] for _, _, c, _ in loaded if 'data_dir' in c})
        if len(trained_on) > 1 and not data_dir:
            sys.exit(f"error: the directories were trained on different data ({', '.join(trained_on)}); "
                     f"pass the --data_dir whose token counts the comparison should use")
        config = {'data_dir': trained_on[0]} if trained_on else {}
        names = [os.path.normpath(d) for d in compare]
    elif wpe_file or wte_file:
        W_pos = load_matrix(wpe_file, 'wpe_file', min_rows=8) if wpe_file else None
        W_E = load_matrix(wte_file, 'wte_file', rows=VOCAB_SIZE) if wte_file else None
    else:
        model, config = load_eval_model(init_from, out_dir, device)
        W_E, P = model.W_E.detach().cpu().numpy(), position_table(model)
        W_pos = None if P is None else P.detach().cpu().numpy()
    data_dir = data_dir or config.get('data_dir') or 'data/gulliver'
    counts = np.bincount(load_tokens(data_dir, 'train'), minlength=VOCAB_SIZE) if W_E is not None or compare else None
    val = load_tokens(data_dir, 'val') if model is not None or compare else None
    if model is not None:
        T = min(model.config.block_size, len(val) - 1)
        ids = torch.from_numpy(val[:max(1, min(eval_tokens, len(val) - 1) // T) * T + 1].astype(np.int64)).to(device)
        x, y = ids[:-1].view(-1, T), ids[1:].view(-1, T)  # consecutive val chunks and their next tokens
    if compare_out_dir:
        if W_E is None:
            sys.exit("error: --compare_out_dir compares token tables; give a checkpoint or --wte_file as well")
        other = load_tables(compare_out_dir, 'compare_out_dir')
    if (compare or other) and len(frequent_tokens(counts)) < 11:
        sys.exit(f"error: fewer than 11 tokens occur {MIN_COUNT}+ times in {data_dir}/train.bin; too few to compare")
    if model is not None and init_from == 'resume':
        log_path = os.path.join(out_dir, 'log.jsonl')
        log = read_log(log_path) if os.path.exists(log_path) else None
        snapshots = load_snapshots(os.path.join(out_dir, 'snapshots'), counts)

    try:
        os.makedirs(report_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=report_dir):
            pass
    except OSError as e:
        sys.exit(f"error: cannot write to report_dir {report_dir!r} ({e.strerror}); pass a --report_dir you can write to")
    if compare:
        tables, _, settings, models = zip(*loaded)
        report['compare'], md = compare_section(names, tables, counts, probe_ids, enc)
        report['compare']['data_dir'] = data_dir
        report['training'], section = training_section(names, settings, models, compare)
        md += section
        if any(models):
            contextual, section = contextual_section(
                names, tables, {name: m for name, m in zip(names, models) if m is not None}, counts, val, enc)
            if contextual:
                report['contextual'] = contextual
            md += section
    else:
        source = wpe_file or wte_file or (out_dir if init_from == 'resume' else init_from)
        report['source'] = {'source': source, 'data_dir': None if counts is None else data_dir,
                            'model_args': None if model is None else vars(model.config),
                            'objective': config.get('objective')}
        md = [f'# Embedding geometry of {source}\n']
        if log is not None and log[0]:
            train, evals = log
            report['loss'] = {'last_iter': train[-1]['iter'], 'last_train_loss': train[-1]['loss'],
                              'last_val_loss': evals[-1]['val_loss'] if evals else None,
                              'last_val_bpb': evals[-1].get('val_bpb') if evals else None,
                              'best_val_loss': min(e['val_loss'] for e in evals) if evals else None}
            plot_losses(out_dir, os.path.join(report_dir, 'loss.png'))
            figures.append('loss.png')
            md += ['## Training\n', table(list(report['loss']), [list(report['loss'].values())]), '![loss.png](loss.png)\n']
        if W_pos is not None:
            report['positional'], section = positional_section(W_pos)
            md += section
            if model is not None:
                report['attention_layer0'] = qk_decomposition(model, x)
                md += attention_section(report['attention_layer0'])
        else:
            notes.append('no position table is added to the embeddings (pos_emb rope, alibi or none): '
                         'positional studies skipped')
        if W_E is not None:
            report['tokens'], section = token_section(W_E, counts, probe_ids, enc)
            md += section
        if model is not None and model.config.causal:
            losses = logit_lens(model, x, y)
            report['logit_lens'] = {'loss_by_layer': losses, 'tokens': x.numel()}
            md += ['## Logit lens\n', table(['layer (0 = embeddings)', 'val loss'], list(enumerate(losses))),
                   plot_lines('logit_lens.png', 'Logit lens: each layer decoded through LN_f and the tied head',
                              'layer (0 = embeddings)', 'val loss (nats)', [(range(len(losses)), losses, 'o-', None)],
                              xticks=range(len(losses)))]
        elif model is not None:
            notes.append('logit lens skipped: it measures next-token loss, and this model is a masked LM')
        if snapshots is not None:
            report['dynamics'] = snapshots
            md += dynamics_section(snapshots)
        if other is not None:
            tokens = frequent_tokens(counts)
            report['stability'] = {'compare_out_dir': compare_out_dir, 'tokens_compared': len(tokens),
                                   'W_E': similarity(W_E[tokens], other[0][tokens])}
            if W_pos is not None and other[1] is not None:
                n = min(len(W_pos), len(other[1]))
                report['stability']['W_pos'] = similarity(W_pos[:n], other[1][:n])
            names = [k for k in ('W_E', 'W_pos') if k in report['stability']]
            md += [f'## Across seeds: this run vs {compare_out_dir}\n', f'W_E over the {len(tokens)} most frequent '
                   f'tokens seen at least {MIN_COUNT} times; W_pos over all positions.\n',
                   similarity_table(names, [report['stability'][k] for k in names])]
    md += ['## Notes\n', *(f'- {n}\n' for n in notes)] if notes else []
    report.update(figures=figures, notes=notes, seconds=round(time.time() - t0, 1))
    write_atomic({os.path.join(report_dir, 'report.json'): (json.dumps(plain(report), indent=1) + '\n').encode(),
                  os.path.join(report_dir, 'report.md'): '\n'.join(md).encode()})
    print(f"wrote {report_dir}/report.md, report.json and {len(figures)} figures in {time.time() - t0:.1f} s")
