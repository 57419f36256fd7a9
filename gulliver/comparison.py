"""
The sections of analyze.py's report on several tables side by side (--compare), in the order they
appear in it, each a <name>_study and a <name>_markdown as in gulliver/sections.py:

    compare      each W_E's token study, and how alike each pair of tables is over the frequent tokens
    training     how each checkpoint trained: its loss at initialisation and at the end
    contextual   static vs contextual: each transformer's layers against the static tables, with the
                 noise floor of the seed_replicas among them

What they share with the report on one model (the token study, frequent_tokens, the similarities
and their chance level) is in gulliver/sections.py and imported from there.
"""
import math

import numpy as np
import torch

from gulliver.circuits import residual_stream
from geometry import contextual_geometry, linear_cka, type_means
from gulliver.report import heatmap, plt, save, show, table
from gulliver.sections import (CHANCE, MIN_COUNT, SIMILARITIES, frequent_tokens, similarity_and_chance,
                               similarity_table, token_study, token_tables)
from gulliver.tokenizer import VOCAB_SIZE

# train.py settings that do not change what a run learns
RUN_BOOKKEEPING = {'out_dir', 'init_from', 'overwrite', 'eval_only', 'device', 'backend', 'compile',
                   'log_interval', 'sample_tokens', 'snapshot_interval', 'sync_debug', 'peak_flops',
                   'max_skipped_steps'}
CONTEXT_PROBES = [' king', ' sea', ' ship', ' little', ' great', ' said']
CONTEXT_MEASURES = {'anisotropy': 'anisotropy (mean cos of two occurrences)',
                    'self_similarity': 'self-similarity - anisotropy',
                    'intra_context': 'intra-context similarity - anisotropy',
                    'pc_share': 'share of a type on its first PC'}


def index_pairs(n):
    """The pairs (i, j), i < j, of n items, in the order of the comparison's tables and figure."""
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def compare_study(names, tables, counts, probe_ids, enc, top_n):
    """The token studies of each W_E, and CKA, RSA, neighbour overlap and Procrustes between each pair
    over the most frequent tokens."""
    tokens = frequent_tokens(counts, top_n)
    studies = {name: token_study(W, counts, probe_ids, enc) for name, W in zip(names, tables)}
    pairs = [{'a': names[i], 'b': names[j], **similarity_and_chance(tables[i][tokens], tables[j][tokens])}
             for i, j in index_pairs(len(names))]
    return {'models': names, 'tokens_compared': len(tokens), 'token_studies': studies, 'pairs': pairs}


def compare_markdown(study, report_dir):
    """The tables of compare_study, and a heatmap of each similarity between the tables."""
    names, tokens, pairs = study['models'], study['tokens_compared'], study['pairs']
    fig, axes = plt.subplots(2, 2, figsize=(12, 10), layout='constrained')
    for ax, (key, title) in zip(axes.flat, SIMILARITIES.items()):
        M = np.eye(len(names))
        for (i, j), s in zip(index_pairs(len(names)), pairs):
            M[i, j] = M[j, i] = s[key]
        heatmap(ax, fig, M, title, names, names, key, cmap='RdBu_r', vmin=-1, vmax=1)
    fig.suptitle(f'W_E compared over the {tokens} most frequent tokens seen at least {MIN_COUNT} times')
    return [f"# Token embeddings compared: {', '.join(names)}\n", '## Each table on its own\n',
            *token_tables(study['token_studies']),
            f'## Between tables, over the {tokens} most frequent tokens seen at least {MIN_COUNT} times\n',
            CHANCE + '\n',
            similarity_table([f"{s['a']} vs {s['b']}" for s in pairs], pairs),
            save(fig, report_dir, 'compare.png')]


def training_study(names, settings, models, evals_by_model):
    """Each checkpoint's loss at initialisation (against ln V + s^2/2) and at the end, as perplexity
    and bits per byte, from the eval events of its log.jsonl ([] for none: left out)."""
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
    return out


def training_markdown(study):
    """The table of training_study; nothing where no checkpoint has eval events."""
    if not study:
        return []
    return ['## The models\n', "The val loss before the first step against ln V + s^2/2 (logits of variance "
            "s^2 = n_embd x 0.02^2 at init), and at the end as perplexity e^loss and bits per byte. A "
            "masked LM's loss is over its masked tokens only: its perplexity is a pseudo-perplexity and it "
            "has no bits per byte.\n",
            table(['model', 'objective', 'seed', 'sampler', 'iterations', 'val loss at init', 'ln V + s^2/2',
                   'final val loss', 'perplexity', 'val bpb', 'coverage'],
                  [[name, *(('' if r[key] is None else r[key]) for key in list(r))]
                   for name, r in study.items()])]


def seed_replicas(settings):
    """The pairs of runs, from {name: train.py's settings}, that differ in their seed and in nothing
    else that changes what they learn (RUN_BOOKKEEPING aside): the same experiment repeated."""
    learned = {name: {k: v for k, v in s.items() if k not in RUN_BOOKKEEPING and k != 'seed'}
               for name, s in settings.items()}
    names = list(settings)
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
            if settings[a].get('seed') != settings[b].get('seed') and learned[a] == learned[b]]


def contextual_study(names, tables, models, settings, counts, val, enc):
    """Static vs contextual over the val text: for each transformer (models, with its train.py
    settings) the measures of geometry.contextual_geometry after every layer, for each static table
    the same with every occurrence given its row, and the CKA of each layer's per-type means with
    every table. None where no token seen in training occurs MIN_COUNT times in the val text."""
    T = min(len(val), *(m.config.block_size for m in models.values()))
    ids = val[:len(val) // T * T].astype(np.int64)
    types = np.flatnonzero((np.bincount(ids, minlength=VOCAB_SIZE) >= MIN_COUNT) & (counts > 0))
    if not len(types):
        return None
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
                         'cka': {other: linear_cka(means, W_other[types])
                                 for other, W_other in zip(names, tables)}})
        out['models'][name] = {'contextual': model is not None, 'layers': rows}
    # two checkpoints of one shape trained alike but for their seed: their gap is the noise floor
    seeds = [(a, b) for a, b in seed_replicas(settings) if models[a].config == models[b].config]
    out['seed_pairs'] = [list(pair) for pair in seeds]
    out['seed_spread'] = {key: max(abs(x[key] - y[key]) for a, b in seeds for x, y in
                                   zip(out['models'][a]['layers'], out['models'][b]['layers']))
                          for key in CONTEXT_MEASURES} if seeds else None
    return out


def contextual_markdown(study, names, report_dir):
    """The tables and figures of contextual_study(names, ...)."""
    models, n_layers = study['models'], max(len(m['layers']) for m in study['models'].values())
    figure = contextual_figure(study, n_layers, report_dir)
    cka_figure = contextual_cka_figure(study, names, n_layers, report_dir)
    transformers = [name for name, m in models.items() if m['contextual']]
    layers = [f'layer {i}' for i in range(n_layers)]
    rows = [[name, label, *(layer[key] for layer in m['layers'])] for key, label in CONTEXT_MEASURES.items()
            for name, m in models.items()]
    rows += [[name, 'first-PC share, random occurrences', *(r['pc_share_random'] for r in m['layers'])]
             for name, m in models.items() if m['contextual']]
    probe_rows = [[name, f"{show(w)} ({study['probe_counts'][w]})",
                   *('' if layer['probes'][w] is None else layer['probes'][w]
                     for layer in models[name]['layers'])]
                  for name in transformers for w in CONTEXT_PROBES]
    window, spread = study['window'], study['seed_spread']
    return ['# Static vs contextual: one vector per word, or one per occurrence\n',
            f"The val text, {study['tokens']:,} tokens read as windows of {window}: for each transformer "
            "the residual stream after the embeddings (layer 0, token plus position) and after each block "
            "gives one vector per occurrence (the masked LM reads the text with nothing masked); a static "
            "table gives every occurrence of a token its row. Averages are over the "
            f"{study['types']} token types that occur at least {study['min_count']} times there and were "
            "seen in train.bin. Self-similarity and intra-context similarity are given minus the layer's "
            "anisotropy: a static table's self-similarity is 1 - anisotropy and its first-PC share 1; with a "
            "fresh random vector per occurrence self-similarity is about 0 and intra-context similarity "
            f"about 1/sqrt({window}) = {window ** -0.5:.3f}.\n",
            table(['model', 'measure', *layers], [[name, label, *values, *[''] * (n_layers - len(values))]
                                                  for name, label, *values in rows]),
            (f"Noise floor: {' and '.join(' vs '.join(pair) for pair in study['seed_pairs'])}, the same "
             "model trained alike with another seed, differ by at most "
             + ', '.join(f'{spread[key]:.3f} in {key.replace("_", " ")}' for key in CONTEXT_MEASURES)
             + ' at any layer.\n')
            if spread else 'Add the same run with another --seed to --compare to see the noise floor.\n',
            figure, '## Self-similarity of probe words (minus anisotropy; count in the val text)\n',
            table(['model', 'word', *layers], probe_rows),
            '## How much of each static table a layer still holds\n',
            "Linear CKA between a layer's per-type mean vectors and each model's W_E rows, over the same "
            "types.\n",
            table(['model', 'vs W_E of', *layers],
                  [[name, other, *(layer['cka'][other] for layer in models[name]['layers'])]
                   for name in transformers for other in names]), cka_figure]


def contextual_figure(study, n_layers, report_dir):
    """Each measure of contextual_study by layer: a line for each transformer, a level for each
    static table."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), layout='constrained')
    for ax, (key, title) in zip(axes.flat, CONTEXT_MEASURES.items()):
        for k, (name, m) in enumerate(study['models'].items()):
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
    fig.suptitle(f"One vector per occurrence: {study['tokens']:,} val tokens, {study['types']} token "
                 f"types seen {study['min_count']}+ times")
    return save(fig, report_dir, 'contextual.png')


def contextual_cka_figure(study, names, n_layers, report_dir):
    """The CKA of each transformer's layers with the W_E of each table, a panel per table."""
    models = study['models']
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), layout='constrained',
                             squeeze=False)
    for ax, table_name in zip(axes[0], names):
        for k, (name, m) in enumerate(models.items()):
            if m['contextual']:
                ax.plot([layer['cka'][table_name] for layer in m['layers']], 'o-', color=f'C{k}', ms=4,
                        label=name)
        ax.set(title=f'vs W_E of {table_name}', xlabel='layer', ylim=(0, 1), xticks=range(n_layers))
    axes[0, 0].set_ylabel('linear CKA of per-type means')
    axes[0, 0].legend(fontsize=7)
    return save(fig, report_dir, 'contextual_cka.png')
