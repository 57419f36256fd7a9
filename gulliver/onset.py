"""
When and why W_pos takes shape: the two studies of analyze.py's report that follow the position
table through a run. The onset study reads the run's snapshots (position_statistics of W_pos and of
its learned part at each, with the two published measures); the gradient-noise study splits the
gradient of W_pos at the checkpoint into signal and noise. Each computes its numbers (onset_study,
gradient_noise_study) and a writer turns them into markdown and figures.
"""
import math

import numpy as np
import torch

from geometry import (LOW_FREQUENCIES, gradient_noise, low_frequency_chance, onset, position_probe,
                      position_statistics, smoothness)
from gulliver.circuits import batch_gradients
from gulliver.data import batch_at, random_offsets
from gulliver.report import plt, save, table
from gulliver.runlog import tokens_seen

ONSET_STATISTICS = {'mean_norm': 'mean row norm', 'cos_1': 'mean cos, k=1', 'cos_quarter': 'mean cos, k=T/4',
                    'pc1_share': 'PC1 share', 'pc_corr': 'max abs corr(PC, t)',
                    'delta_cos': 'cos(delta_t, delta_t+1)', 'line_r2': 'line a + t b',
                    'low_freq_share': 'low-frequency share', 'probe_mae': 'probe error (positions)'}
ONSET_THRESHOLD = 0.9  # abs corr(PC score, t): one principal direction follows position


def onset_study(tables, starts, train_tokens, evals, reference):
    """When W_pos takes shape: position_statistics of W_pos and of its learned part W_pos - W_pos(0)
    (0: the first snapshot, the init when the run saved one at iteration 0) at every snapshot,
    tables = {iteration: W_pos}, against the tokens seen (from the run's start events, where it has
    them), passes over the train_tokens of the book and the losses of the eval events at the same
    iterations. The onset is the first snapshot where abs corr(PC, t) reaches ONSET_THRESHOLD.
    reference: a position table to put beside them (GPT-2's rows 0..T-1) or None."""
    iters = sorted(tables)
    first, losses = tables[iters[0]], {e['iter']: e for e in evals}
    records = []
    for i in iters:
        tokens = tokens_seen(starts, i)
        records.append({'iter': i, 'tokens_seen': tokens,
                        'passes': None if tokens is None else tokens / train_tokens,
                        'train_loss': losses.get(i, {}).get('train_loss'),
                        'val_loss': losses.get(i, {}).get('val_loss'),
                        'W_pos': position_statistics(tables[i]),
                        'learned': position_statistics(tables[i] - first) if i != iters[0] else None})
    return {'threshold': ONSET_THRESHOLD, 'first_snapshot': iters[0], 'records': records,
            'onset_iter': onset(iters, [r['W_pos']['pc_corr'] for r in records], ONSET_THRESHOLD),
            'onset_iter_learned': onset(iters, [r['learned'] and r['learned']['pc_corr'] for r in records],
                                        ONSET_THRESHOLD),
            'reference': None if reference is None else position_statistics(reference[:len(first)]),
            'chance': {'low_freq_share': low_frequency_chance(len(first)),  # independent random rows
                       'probe_mae': position_probe(np.random.default_rng(0).normal(size=first.shape))}}


def onset_markdown(study, train_tokens, report_dir):
    """The tables and figure of onset_study, over the train_tokens of the book."""
    records, first = study['records'], study['first_snapshot']
    header = ['iteration', 'tokens seen', 'passes', 'train loss', 'val loss', *ONSET_STATISTICS.values()]
    reference = [] if study['reference'] is None else [
        ['reference', '', '', '', '', *(f"{study['reference'][s]:.3f}" for s in ONSET_STATISTICS)]]
    return ['## When W_pos takes shape\n',
            f"W_pos at each of the run's snapshots, and its learned part W_pos - W_pos({first}): what "
            "training has added to its start (independent random rows, the default start, give mean cosines "
            "near 0 and cos(delta_t, delta_t+1) near -0.5; an all-zero start gives 0 for both, and nan for "
            "PC1's share and corr(PC, t)). max abs corr(PC, t) is the largest of PC1-PC3 (which one in "
            f"brackets); the onset is the first snapshot where it reaches {ONSET_THRESHOLD}. Passes: tokens "
            f"seen over the {train_tokens:,} train tokens. Losses where an evaluation fell on the "
            "snapshot. The two published measures: the share of the variance along t at 1-"
            f"{LOW_FREQUENCIES} cycles over the table's rows (Yamamoto & Matsuzaki 2023; independent random "
            f"rows: {study['chance']['low_freq_share']:.3f}) and the mean absolute error, in positions, of "
            "Wang & Chen (2020)'s linear probe from a row to its position, cross-validated over 5 folds of "
            f"shuffled rows (independent random rows: {study['chance']['probe_mae']:.1f}).\n",
            f"Onset: W_pos {onset_when(records, study['onset_iter'])}; its learned part "
            f"{onset_when(records, study['onset_iter_learned'])}.\n",
            '### W_pos\n', table(header, onset_rows(records, 'W_pos') + reference),
            f'### Learned part, W_pos - W_pos({first})\n', table(header, onset_rows(records, 'learned')[1:]),
            onset_figure(records, first, report_dir)]


def onset_when(records, at):
    """Where the onset came: 'not reached', or its iteration, with the tokens seen and passes where known."""
    if at is None:
        return 'not reached'
    r = next(r for r in records if r['iter'] == at)
    return f"at iteration {at}" + ('' if r['tokens_seen'] is None else
                                   f" ({r['tokens_seen']:,} tokens, {r['passes']:.2f} passes over the book)")


def onset_rows(records, key):
    """A table row for each of onset_study's records: when, the losses and the ONSET_STATISTICS of
    r[key] ('W_pos' or 'learned'); blank where there are none."""
    return [[r['iter'], '' if r['tokens_seen'] is None else f"{r['tokens_seen']:,}",
             '' if r['passes'] is None else f"{r['passes']:.2f}",
             *('' if r[loss] is None else f'{r[loss]:.3f}' for loss in ('train_loss', 'val_loss')),
             *(('', ) * len(ONSET_STATISTICS) if r[key] is None else
               (onset_cell(r[key], s) for s in ONSET_STATISTICS))] for r in records]


def onset_cell(statistics, s):
    """One of a table's position_statistics; for max abs corr(PC, t), with the PC that has it."""
    if s == 'pc_corr' and not math.isnan(statistics[s]):
        return f"{statistics[s]:.3f} (PC{statistics['pc_corr_which']})"
    return f'{statistics[s]:.3f}'


def onset_figure(records, first, report_dir):
    """The statistics of W_pos and of its learned part by iteration, with the val loss (dashed)."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), layout='constrained', sharey=True)
    for ax, key, title in zip(axes, ('W_pos', 'learned'), ('W_pos', f'learned part W_pos - W_pos({first})')):
        kept = [r for r in records if r[key] is not None]
        for k, (s, label) in enumerate(ONSET_STATISTICS.items()):
            if s not in ('mean_norm', 'probe_mae'):  # the others are on one scale, from -1 to 1
                ax.plot([r['iter'] for r in kept], [r[key][s] for r in kept], 'o-', ms=3, color=f'C{k}',
                        label=label)
        ax.axhline(ONSET_THRESHOLD, color='grey', ls=':')
        ax.set(title=title, xlabel='iteration')
        evaluated = [r for r in records if r['val_loss'] is not None]
        if evaluated:
            loss_axis = ax.twinx()
            loss_axis.plot([r['iter'] for r in evaluated], [r['val_loss'] for r in evaluated], 'k--',
                           label='val loss')
            loss_axis.set_ylabel('val loss (dashed)')
    axes[0].legend(fontsize=8)
    return save(fig, report_dir, 'onset.png')


# ---- the gradient of W_pos: signal and noise -----------------------------------------------------

def gradient_noise_study(model, tokens, n_batches, batch_size, objective, seed=0):
    """The gradient of W_pos split into signal and noise, at the model's weights: n_batches
    independent batches of the run's shape (batch_size windows of block_size tokens at random
    offsets of the train tokens), each batch's gradient g_i and their mean G_bar
    (geometry.gradient_noise gives the formulas). For W_pos: the smoothness along t
    (geometry.smoothness) of G_bar and of one batch's g_1, the signal-to-noise ratio of each row at
    the run's batch, and B_simple, the batch in sequences at which a step's noise equals its signal;
    B_simple of W_E (tied with the head) and of layer 0's W_QKV beside it."""
    rng = np.random.default_rng(seed)
    T, vocab_size = model.config.block_size, model.config.vocab_size
    windows = lambda: batch_at(tokens, random_offsets(rng, len(tokens), T, batch_size), T, objective, rng,
                               vocab_size)
    device = next(model.parameters()).device
    batches = (tuple(torch.from_numpy(a).to(device) for a in windows()) for _ in range(n_batches))
    names = {'W_pos': model.transformer.wpe.weight, 'W_E': model.transformer.wte.weight,
             'layer 0 W_QKV': model.transformer.h[0].attn.c_attn.weight}
    with torch.enable_grad():
        grads, k = batch_gradients(model, batches, names)
    rows = gradient_noise(grads['W_pos']['mean'], grads['W_pos']['mean_sq_rows'], k, batch_size)
    return {'batches': k, 'batch_shape': [batch_size, T],
            'b_simple': {label: float(gradient_noise(g['mean'], g['mean_sq'], k, batch_size)['b_simple'])
                         for label, g in grads.items()},
            'snr': rows['snr'], 'mean_gradient': smoothness(grads['W_pos']['mean']),
            'single_batch': smoothness(grads['W_pos']['first'])}


def gradient_noise_markdown(study):
    """The tables and text of gradient_noise_study."""
    snr, (B, T) = np.asarray(study['snr']), study['batch_shape']
    smooth = [('mean cos of neighbouring rows', 'cos_k1'), ('mean cos(delta_t, delta_t+1)', 'cos_delta'),
              (f'share of the variance at 1-{LOW_FREQUENCIES} cycles over the {T} rows', 'low_freq_share')]
    b_simple = [[f'B_simple of {label} (sequences)', value] for label, value in study['b_simple'].items()]
    return ['## The gradient of W_pos: signal and noise\n',
            f"{study['batches']} independent batches of the run's shape ({B} sequences of {T} tokens at "
            "random offsets), each batch's gradient g_i and their mean G_bar, at this checkpoint's weights. "
            "The noise of one batch S = K/(K-1) (mean |g_i|^2 - |G_bar|^2), the signal |G|^2 = |G_bar|^2 - "
            "S/K; B_simple = B S / |G|^2 is the batch, in sequences, at which a step's noise equals its "
            f"signal (independent random rows score {low_frequency_chance(T):.3f} on the low-frequency "
            "share).\n",
            table(['W_pos gradient', 'mean over the batches, G_bar', 'one batch, g_1'],
                  [[label, study['mean_gradient'][key], study['single_batch'][key]]
                   for label, key in smooth]),
            table(['', 'value'], b_simple + [
                ["signal-to-noise of a W_pos row at the run's batch: median", float(np.nanmedian(snr))],
                ['... rows with a signal above their noise', f'{int((snr > 1).sum())} of {len(snr)}'],
                ['... row 0, row 1, the mean of the rest',
                 ', '.join(f'{v:.3g}' for v in (snr[0], snr[1], float(np.nanmean(snr[2:]))))]])]
