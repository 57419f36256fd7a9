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
gulliver/circuits.py; gulliver/sections.py turns them into the report's sections, with gulliver/report.py's tables and
figures. This script loads and checks its input, then runs the sections in the order of the
report, and writes it.
"""
import glob
import json
import os
import re
import sys
import tempfile
import time

import numpy as np
import torch

from gulliver.atomic import remove_orphans, write_atomic
from gulliver.checkpoint import load_model
from gulliver.circuits import position_table
from gulliver.configurator import a_path, at_least, check, configure, one_of, optional, resolve_device
from gulliver.data import read_split
from gulliver.download import DownloadError
from geometry import drift_vs_frequency, mean_cos_by_distance
from gulliver.pretrained import PRETRAINED
from gulliver.report import figures_shown, plain
from gulliver.runlog import read_events, tokens_seen
from gulliver.sections import (FREQUENCY_BINS, MIN_COUNT, MIN_POSITIONS, PROBE_WORDS, attention_section, compare_section,
                      contextual_section, dynamics_section, frequent_tokens, logit_lens_section, loss_section,
                      onset_section, positional_section, stability_section, token_section, training_section)
from gulliver.tokenizer import VOCAB_SIZE, get_tokenizer

# -----------------------------------------------------------------------------
init_from = 'resume'      # 'resume' (the run in out_dir), 'gpt2'..'gpt2-xl', or a Hugging Face directory
out_dir = 'out-gulliver'  # with init_from='resume': best.pt or ckpt.pt, log.jsonl and snapshots/
checkpoint = 'best'       # 'best': a run's best.pt where train.py kept one, else its ckpt.pt; 'last': ckpt.pt
wpe_file = None           # a .npy position table (T, d) to analyse instead of a model (None: the model's)
wte_file = None           # a .npy token table (50257, d) to analyse instead of a model (None: the model's)
data_dir = None           # train.bin and val.bin; None: the checkpoint's data_dir, else data/gulliver
report_dir = 'report'     # where report.md, report.json and the figures go
reference_wpe = None      # the W_pos onset study's reference row: a .npy position table, or 'gpt2' (its rows 0..T-1)
compare_out_dir = None    # the same model trained with another seed: how stable is the geometry? (None: no such run)
compare = []              # `--compare DIR DIR ...`: directories with ckpt.pt or W_E.npy, W_E side by side
probes = []               # `--probes Lilliput hat`: more probe words, each looked up as ' word' (as in running text)
eval_tokens = 2048        # val tokens for the logit lens and the layer-0 attention decomposition
top_n = 3000              # at most this many of the most frequent tokens in RSA, CKA and neighbour overlap
device = 'auto'           # 'auto', 'cpu', 'cuda', ...
# -----------------------------------------------------------------------------

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


def load_eval_model(init_from, out_dir, device, checkpoint):
    """(model in eval mode, train.py's settings or {}), or exit with one line; checkpoint: 'best' or 'last'."""
    try:
        model, saved = load_model(init_from, out_dir, device, checkpoint)
    except (DownloadError, ValueError) as e:
        sys.exit(f"error: {e}")
    bad = sum(int((~torch.isfinite(p)).sum()) for p in model.parameters())
    if bad:
        source = out_dir if init_from == 'resume' else init_from
        sys.exit(f"error: {source}: the model holds {bad} NaN or infinite weights (a diverged run?); analyse a "
                 f"checkpoint whose weights are finite (--checkpoint=best or last)")
    return model.eval(), saved.get('config', {})


def load_tables(path, name, checkpoint):
    """(W_E, W_pos or None, settings, model or None) from a directory with ckpt.pt (train.py's
    settings, and the model) or W_E.npy (embeddings.py's, from embeddings.json: data_dir among them)."""
    if os.path.exists(os.path.join(path, 'ckpt.pt')):
        model, config = load_eval_model('resume', path, 'cpu', checkpoint)
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


def load_reference(name, out_dir, device):
    """A reference position table: GPT-2's W_pos for a pretrained name ('gpt2', ...), else a .npy file."""
    if name in PRETRAINED:
        model = load_eval_model(name, out_dir, device, 'best')[0]
        return model.W_pos.detach().cpu().numpy()
    return load_matrix(name, 'reference_wpe', min_rows=8)


def load_tokens(data_dir, split):
    """The token ids of data_dir/{split}.bin (data.read_split), or exit with one line."""
    try:
        return read_split(data_dir, split)
    except ValueError as e:
        sys.exit(f"error: {e}")


def load_snapshots(folder, counts):
    """Per-token drift |W_E(t) - W_E(0)| by frequency, and the W_pos cosine-vs-distance curve, at each
    snapshot (np.savez files iter_*.npz with W_E and, for a learned table, W_pos); and the W_pos of
    each, {iteration: W_pos} (empty without a learned table). (None, {}) for fewer than two snapshots."""
    iteration = lambda path: int(os.path.basename(path)[5:-4])
    paths = sorted((path for path in glob.glob(os.path.join(folder, 'iter_*.npz'))
                    if re.fullmatch(r'iter_\d+\.npz', os.path.basename(path))), key=iteration)  # 999999 < 1000000
    if len(paths) < 2:
        return None, {}
    out = {'iters': [], 'drift_median': {label: [] for *_, label in FREQUENCY_BINS}, 'pos_mean_cos_by_distance': []}
    W0, position_tables = None, {}
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as z:
                W, P = z['W_E'][:VOCAB_SIZE].astype(np.float32), z['W_pos'].astype(np.float32) if 'W_pos' in z else None
            out['iters'].append(iteration(path))
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
            position_tables[out['iters'][-1]] = P
    out['drift_spearman_log_count'] = drift_vs_frequency(W0, W, counts)
    return out, position_tables


def read_log(path):
    """The train, eval and start events of log.jsonl (a last line still being written, with no newline
    yet, is left out), or exit with one line."""
    try:
        events = read_events(path)
    except ValueError as e:
        sys.exit(f"error: {e}")
    return tuple([e for e in events if e.get('event') == kind] for kind in ('train', 'eval', 'start'))


# ---- the two reports: each section's json under its key in report.json, its markdown in report.md --

def model_report(source, objective, model, W_pos, W_E, counts, data_dir, batch, log, snapshots, position_tables,
                 reference, other, probe_ids, enc, top_n, report_dir, notes):
    """The report on one model, or on the tables of --wpe_file and --wte_file: (report, markdown).
    batch: (x, y) val tokens and their next tokens for the model; log: (train, eval, start) events of
    the run's log.jsonl; snapshots, position_tables: load_snapshots(...); reference: the onset study's
    reference position table; other: (compare_out_dir, its W_E, its W_pos). Each is None where there is none."""
    report = {'source': {'source': source, 'data_dir': None if counts is None else data_dir,
                         'model_args': None if model is None else vars(model.config), 'objective': objective}}
    md = [f'# Embedding geometry of {source}\n']
    if log is not None and log[0]:
        report['loss'], section = loss_section(*log[:2], source, report_dir)  # source: the run's out_dir, with log.jsonl
        md += section
    if W_pos is not None:
        report['positional'], section = positional_section(W_pos, report_dir)
        md += section
        if model is not None:
            report['attention_layer0'], section = attention_section(model, batch[0], report_dir)
            md += section
    if W_E is not None:
        report['tokens'], section = token_section(W_E, counts, probe_ids, enc, report_dir)
        md += section
    if model is not None and model.config.causal:
        report['logit_lens'], section = logit_lens_section(model, *batch, report_dir)
        md += section
    elif model is not None:
        notes.append('logit lens skipped: it measures next-token loss, and this model is a masked LM')
    if snapshots is not None:
        report['dynamics'] = snapshots
        md += dynamics_section(snapshots, report_dir)
    if position_tables:
        train, evals, starts = log or ([], [], [])
        seen = {i: tokens_seen(starts, i) for i in position_tables}
        report['onset'], section = onset_section(position_tables, None if None in seen.values() else seen,
                                                 int(counts.sum()), evals, reference, report_dir)
        md += section
    if other is not None:
        report['stability'], section = stability_section(W_E, W_pos, *other, counts, top_n)
        md += section
    return report, md


def compare_report(names, loaded, evals_by_model, counts, val, data_dir, probe_ids, enc, top_n, report_dir, notes):
    """The token tables of several directories side by side (loaded: load_tables(...) of each), how the
    checkpoints among them trained (evals_by_model: each one's eval events, [] for none) and what their
    layers make of the tokens: (report, markdown)."""
    tables, _, settings, models = zip(*loaded)
    report = {}
    report['compare'], md = compare_section(names, tables, counts, probe_ids, enc, top_n, report_dir)
    report['compare']['data_dir'] = data_dir
    report['training'], section = training_section(names, settings, models, evals_by_model)
    md += section
    if any(models):
        checkpoints = {name: m for name, m in zip(names, models) if m is not None}
        checkpoint_settings = {name: s for name, s, m in zip(names, settings, models) if m is not None}
        contextual, section = contextual_section(names, tables, checkpoints, checkpoint_settings, counts, val, enc,
                                                 report_dir, notes)
        if contextual:
            report['contextual'] = contextual
        md += section
    return report, md


if __name__ == '__main__':
    configure(globals())
    check(globals(), {'checkpoint': one_of('best', 'last'), 'eval_tokens': at_least(1), 'top_n': at_least(12),
                      **{name: optional(a_path) for name in ('wpe_file', 'wte_file', 'data_dir', 'compare_out_dir',
                                                             'reference_wpe')}})
    t0, enc, notes = time.time(), get_tokenizer(), []
    device = resolve_device(device)
    probe_words = PROBE_WORDS + [' ' + w.strip() for w in probes if w.strip()]
    probe_ids = {w: enc.encode_ordinary(w)[0] for w in probe_words if len(enc.encode_ordinary(w)) == 1}
    notes += [f'probe {w!r} is not a single GPT-2 token; skipped' for w in probe_words if w not in probe_ids]
    model, W_E, W_pos, config, batch, other, log, snapshots, position_tables, reference = (None, None, None, {}, None,
                                                                                          None, None, None, {}, None)
    # load and check everything first, so that bad input leaves no partial report behind
    if compare:
        if len(compare) < 2:
            sys.exit("error: --compare needs at least two directories, e.g. --compare out-gulliver out-sgns")
        loaded = [load_tables(d, 'compare', checkpoint) for d in compare]
        trained_on = sorted({c['data_dir'] for _, _, c, _ in loaded if 'data_dir' in c})
        if len(trained_on) > 1 and not data_dir:
            sys.exit(f"error: the directories were trained on different data ({', '.join(trained_on)}); "
                     f"pass the --data_dir whose token counts the comparison should use")
        config = {'data_dir': trained_on[0]} if trained_on else {}
        names = [os.path.normpath(d) for d in compare]
        logs = [os.path.join(d, 'log.jsonl') for d in compare]
        evals_by_model = [read_log(path)[1] if m is not None and os.path.exists(path) else []
                          for path, (*_, m) in zip(logs, loaded)]
    elif wpe_file or wte_file:
        W_pos = load_matrix(wpe_file, 'wpe_file', min_rows=MIN_POSITIONS) if wpe_file else None
        W_E = load_matrix(wte_file, 'wte_file', rows=VOCAB_SIZE) if wte_file else None
    else:
        model, config = load_eval_model(init_from, out_dir, device, checkpoint)
        W_E, P = model.W_E.detach().cpu().numpy(), position_table(model)
        W_pos = None if P is None else P.detach().cpu().numpy()
        if P is None:
            notes.append('no position table is added to the embeddings (pos_emb rope, alibi or none): '
                         'positional studies skipped')
        elif len(W_pos) < MIN_POSITIONS:
            notes.append(f'the position table has {len(W_pos)} rows (block_size): positional studies skipped, '
                         f'they need {MIN_POSITIONS}')
            W_pos = None
    data_dir = data_dir or config.get('data_dir') or 'data/gulliver'
    counts = np.bincount(load_tokens(data_dir, 'train'), minlength=VOCAB_SIZE) if W_E is not None or compare else None
    val = load_tokens(data_dir, 'val') if model is not None or compare else None
    if model is not None:
        T = min(model.config.block_size, len(val) - 1)
        ids = torch.from_numpy(val[:max(1, min(eval_tokens, len(val) - 1) // T) * T + 1].astype(np.int64)).to(device)
        batch = ids[:-1].view(-1, T), ids[1:].view(-1, T)  # consecutive val chunks and their next tokens
    if compare_out_dir:
        if W_E is None:
            sys.exit("error: --compare_out_dir compares token tables; give a checkpoint or --wte_file as well")
        other = (compare_out_dir, *load_tables(compare_out_dir, 'compare_out_dir', checkpoint)[:2])
    if (compare or other) and len(frequent_tokens(counts, top_n)) < 12:  # neighbour overlap @10 needs 12
        sys.exit(f"error: fewer than 12 tokens occur {MIN_COUNT}+ times in {data_dir}/train.bin; too few to compare")
    if model is not None and init_from == 'resume':
        log_path = os.path.join(out_dir, 'log.jsonl')
        log = read_log(log_path) if os.path.exists(log_path) else None
        snapshots, position_tables = load_snapshots(os.path.join(out_dir, 'snapshots'), counts)
        position_tables = position_tables if W_pos is not None else {}
    if reference_wpe and position_tables:
        reference = load_reference(reference_wpe, out_dir, device)
    try:
        os.makedirs(report_dir, exist_ok=True)
        remove_orphans(report_dir)  # the temporary files of a killed writer
        with tempfile.TemporaryFile(dir=report_dir):
            pass
    except OSError as e:
        sys.exit(f"error: cannot write to report_dir {report_dir!r} ({e.strerror}); pass a --report_dir you can write to")

    if compare:
        report, md = compare_report(names, loaded, evals_by_model, counts, val, data_dir, probe_ids, enc, top_n,
                                    report_dir, notes)
    else:
        source = wpe_file or wte_file or (out_dir if init_from == 'resume' else init_from)
        report, md = model_report(source, config.get('objective'), model, W_pos, W_E, counts, data_dir, batch, log,
                                  snapshots, position_tables, reference, other, probe_ids, enc, top_n, report_dir, notes)
    md += ['## Notes\n', *(f'- {n}\n' for n in notes)] if notes else []
    figures = figures_shown(md)
    report.update(figures=figures, notes=notes, seconds=round(time.time() - t0, 1))
    write_atomic({os.path.join(report_dir, 'report.json'): (json.dumps(plain(report), indent=1) + '\n').encode(),
                  os.path.join(report_dir, 'report.md'): '\n'.join(md).encode()})
    print(f"wrote {report_dir}/report.md, report.json and {len(figures)} figures in {time.time() - t0:.1f} s")
