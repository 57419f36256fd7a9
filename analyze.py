"""
What a trained GPT-2 put in its embeddings: the geometry of the position table W_pos and the
token table W_E, how layer-0 attention uses them, how they formed during training and how
stable they are across seeds. Writes report.md (tables, figures inline), report.json and PNGs.

    $ python analyze.py --out_dir=out-gulliver      # a run of train.py: its best.pt, else ckpt.pt
    $ python analyze.py --init_from=gpt2            # the pretrained GPT-2 weights
    $ python analyze.py --wpe_file=W_pos.npy        # any position table (T, d), T >= 8
    $ python analyze.py --out_dir=out-gulliver --compare_out_dir=out-gulliver-seed2
    $ python analyze.py --compare out-gulliver out-mlm out-sgns out-glove

The studies are plain functions of arrays in geometry.py, and of the model in gulliver/circuits.py;
gulliver/sections.py (one model) and gulliver/comparison.py (several tables side by side, --compare)
give each section of the report a study that computes its numbers and a writer that turns them into
markdown and figures, with gulliver/report.py's tables and figures. This script
loads and checks everything first, into one Inputs, so that bad input leaves no partial report
behind; then model_report (or compare_report, for --compare) runs the sections in the order of the
report, each study's numbers under its key in report.json and its markdown in report.md.
"""
import glob
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from geometry import positional_geometry
from gulliver.atomic import remove_orphans, write_atomic
from gulliver.checkpoint import load_model
from gulliver.circuits import position_table, qk_decomposition
from gulliver.comparison import (compare_markdown, compare_study, contextual_markdown, contextual_study,
                                 training_markdown, training_study)
from gulliver.configurator import a_path, at_least, check, configure, one_of, optional, resolve_device
from gulliver.data import read_split
from gulliver.download import DownloadError
from gulliver.pretrained import PRETRAINED
from gulliver.report import figures_shown, plain
from gulliver.runlog import read_events
from gulliver.onset import gradient_noise_markdown, gradient_noise_study, onset_markdown, onset_study
from gulliver.sections import (MIN_COUNT, MIN_POSITIONS, PROBE_WORDS, attention_markdown, dynamics_markdown,
                               dynamics_study, frequent_tokens, logit_lens_markdown, logit_lens_study,
                               loss_markdown, loss_study, positional_markdown, stability_markdown,
                               stability_study, token_markdown, token_study)
from gulliver.tokenizer import VOCAB_SIZE, get_tokenizer

# -----------------------------------------------------------------------------
init_from = 'resume'      # 'resume' (the run in out_dir), 'gpt2'..'gpt2-xl', or a Hugging Face directory
out_dir = 'out-gulliver'  # with init_from='resume': best.pt or ckpt.pt, log.jsonl and snapshots/
checkpoint = 'best'       # 'best': a run's best.pt where train.py kept one, else its ckpt.pt; 'last': ckpt.pt
wpe_file = None           # a .npy position table (T, d) to analyse instead of a model (None: the model's)
wte_file = None           # a .npy token table (50257, d) to analyse instead of a model (None: the model's)
data_dir = None           # train.bin and val.bin; None: the checkpoint's data_dir, else data/gulliver
report_dir = 'report'     # where report.md, report.json and the figures go
reference_wpe = None      # the onset study's reference: a .npy position table, or 'gpt2' (its rows 0..T-1)
compare_out_dir = None    # the same model trained with another seed: how stable is the geometry? (None: none)
compare = []              # `--compare DIR DIR ...`: directories with ckpt.pt or W_E.npy, W_E side by side
probes = []               # `--probes Lilliput hat`: more probe words, each looked up as ' word' (as in text)
eval_tokens = 2048        # val tokens for the logit lens and the layer-0 attention decomposition
top_n = 3000              # at most this many of the most frequent tokens in RSA, CKA and neighbour overlap
noise_batches = 16        # batches of the run's shape whose W_pos gradients are split into signal and noise
device = 'auto'           # 'auto', 'cpu', 'cuda', ...
# -----------------------------------------------------------------------------


@dataclass
class Inputs:
    """What a report is made from, loaded and checked; None (or empty) where there is none."""
    source: str = None            # what the report is on: a run's out_dir, a model's name, a .npy file
    settings: dict = field(default_factory=dict)  # train.py's settings of the model ({} for none), or
                                                  # for --compare the data_dir the tables were trained on
    data_dir: str = None          # where train.bin and val.bin are
    model: torch.nn.Module = None  # the GPT, in eval mode
    W_E: np.ndarray = None        # (V, d) token table
    W_pos: np.ndarray = None      # (T, d) position table, T >= MIN_POSITIONS
    counts: np.ndarray = None     # (V,) each token's count in train.bin
    val: np.ndarray = None        # the val token ids
    train: np.ndarray = None      # the train token ids, for the gradient-noise study of a run
    noise_batches: int = 0        # how many batches that study draws
    batch: tuple = None           # (x, y): consecutive val chunks (B, T) for the model, and their next tokens
    log: tuple = None             # (train, eval, start) events of the run's log.jsonl
    dynamics: dict = None         # sections.dynamics_study of the run's snapshots
    position_tables: dict = field(default_factory=dict)  # {iteration: W_pos} of the snapshots
    reference: np.ndarray = None  # the onset study's reference position table
    other: tuple = None           # (compare_out_dir, its W_E, its W_pos or None)
    compared: list = None         # --compare: (name, W_E, settings, model or None, eval events) of each
    enc: object = None            # the GPT-2 tokenizer
    probe_ids: dict = None        # {probe word: its token id}


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
        sys.exit(f"error: --{name}: {path} has {int((~np.isfinite(M)).sum())} NaN or infinite entries; "
                 f"save a matrix of finite numbers")
    return M.astype(np.float32)


def load_eval_model(init_from, out_dir, device, checkpoint):
    """(model in eval mode, train.py's settings or {}), or exit with one line; checkpoint: 'best' or
    'last'."""
    try:
        model, saved = load_model(init_from, out_dir, device, checkpoint)
    except (DownloadError, ValueError) as e:
        sys.exit(f"error: {e}")
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
    sys.exit(f"error: --{name}: {path} holds neither ckpt.pt nor W_E.npy; pass directories written by "
             f"train.py or embeddings.py")


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


def read_log(path):
    """The train, eval and start events of log.jsonl (a last line still being written, with no newline
    yet, is left out), or exit with one line."""
    try:
        events = read_events(path)
    except ValueError as e:
        sys.exit(f"error: {e}")
    return tuple([e for e in events if e.get('event') == kind] for kind in ('train', 'eval', 'start'))


def snapshot_iteration(path):
    """The iteration of a snapshot, from its file name iter_<iteration>.npz."""
    return int(os.path.basename(path)[5:-4])


def read_snapshot(path, name):
    """A snapshot's table as float32: 'W_E' (its first VOCAB_SIZE rows) or 'W_pos' (None where the
    model learns none); or exit with one line where path is not a snapshot written by train.py."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if name == 'W_E':
                return z['W_E'][:VOCAB_SIZE].astype(np.float32)
            return z['W_pos'].astype(np.float32) if 'W_pos' in z else None
    except (OSError, ValueError, KeyError, EOFError):
        sys.exit(f"error: {path} is not a snapshot written by train.py (np.savez with W_E)")


def read_token_tables(paths):
    """(iteration, W_E) of each snapshot in turn, each read when its turn comes (one W_E in memory at a
    time); exits with one line at a W_E of another shape than the first's."""
    shape = None
    for path in paths:
        W = read_snapshot(path, 'W_E')
        shape = shape or W.shape
        if W.shape != shape:
            sys.exit(f"error: {path} holds W_E of shape {W.shape}, {paths[0]} {shape}: snapshots of two runs "
                     f"in {os.path.dirname(path)}; keep one run's")
        yield snapshot_iteration(path), W


def load_snapshots(folder, counts):
    """sections.dynamics_study of the snapshots in folder (np.savez files iter_*.npz with W_E and, for
    a learned table, W_pos) and their W_pos, {iteration: W_pos} (empty without a learned table);
    (None, {}) for fewer than two snapshots."""
    paths = sorted((path for path in glob.glob(os.path.join(folder, 'iter_*.npz'))
                    if re.fullmatch(r'iter_\d+\.npz', os.path.basename(path))),
                   key=snapshot_iteration)  # by number: 999999 < 1000000
    if len(paths) < 2:
        return None, {}
    position_tables = {snapshot_iteration(path): read_snapshot(path, 'W_pos') for path in paths}
    position_tables = {i: P for i, P in position_tables.items() if P is not None}
    return dynamics_study(read_token_tables(paths), position_tables, counts), position_tables


def load_compare(dirs, checkpoint, data_dir):
    """--compare: each directory's (name, W_E, settings, model or None, eval events), and as settings
    the data_dir they were trained on; data_dir: --data_dir, needed where they name different ones."""
    if len(dirs) < 2:
        sys.exit("error: --compare needs at least two directories, e.g. --compare out-gulliver out-sgns")
    loaded = [load_tables(d, 'compare', checkpoint) for d in dirs]
    trained_on = sorted({c['data_dir'] for _, _, c, _ in loaded if 'data_dir' in c})
    if len(trained_on) > 1 and not data_dir:
        sys.exit(f"error: the directories were trained on different data ({', '.join(trained_on)}); "
                 f"pass the --data_dir whose token counts the comparison should use")
    logs = [os.path.join(d, 'log.jsonl') for d in dirs]
    evals = [read_log(path)[1] if m is not None and os.path.exists(path) else []
             for path, (*_, m) in zip(logs, loaded)]
    return Inputs(settings={'data_dir': trained_on[0]} if trained_on else {},
                  compared=[(os.path.normpath(d), W_E, settings, model, e)
                            for d, (W_E, _, settings, model), e in zip(dirs, loaded, evals)])


def load_files(wpe_file, wte_file):
    """The tables of --wpe_file and --wte_file, either of them None."""
    return Inputs(source=wpe_file or wte_file,
                  W_pos=load_matrix(wpe_file, 'wpe_file', min_rows=MIN_POSITIONS) if wpe_file else None,
                  W_E=load_matrix(wte_file, 'wte_file', rows=VOCAB_SIZE) if wte_file else None)


def load_run(init_from, out_dir, device, checkpoint, notes):
    """A model, a run's or a pretrained one, with its tables; W_pos None, and a note why, where the
    model adds no position table to its token embeddings, or one of fewer than MIN_POSITIONS rows."""
    model, settings = load_eval_model(init_from, out_dir, device, checkpoint)
    W_E, P = model.W_E.detach().cpu().numpy(), position_table(model)
    W_pos = None if P is None else P.detach().cpu().numpy()
    if P is None:
        notes.append('no position table is added to the embeddings (pos_emb rope, alibi or none): '
                     'positional studies skipped')
    elif len(W_pos) < MIN_POSITIONS:
        notes.append(f'the position table has {len(W_pos)} rows (block_size): positional studies skipped, '
                     f'they need {MIN_POSITIONS}')
        W_pos = None
    return Inputs(source=out_dir if init_from == 'resume' else init_from, settings=settings, model=model,
                  W_E=W_E, W_pos=W_pos)


def val_batch(val, block_size, eval_tokens, device):
    """(x, y): consecutive chunks of the val tokens, as many as eval_tokens fill (at least one), and
    their next tokens."""
    T = min(block_size, len(val) - 1)
    n = max(1, min(eval_tokens, len(val) - 1) // T) * T  # whole chunks of T
    ids = torch.from_numpy(val[:n + 1].astype(np.int64)).to(device)
    return ids[:-1].view(-1, T), ids[1:].view(-1, T)


def make_report_dir(report_dir):
    """Create report_dir, clear the temporary files of a killed writer from it and check that files can
    be written there; or exit with one line."""
    try:
        os.makedirs(report_dir, exist_ok=True)
        remove_orphans(report_dir)
        with tempfile.TemporaryFile(dir=report_dir):
            pass
    except OSError as e:
        sys.exit(f"error: cannot write to report_dir {report_dir!r} ({e.strerror}); pass a --report_dir you "
                 f"can write to")


# ---- the two reports: each section's study under its key in report.json, its markdown in report.md --

def model_report(inputs, top_n, report_dir, notes):
    """The report on one model, or on the tables of --wpe_file and --wte_file: (report, markdown)."""
    source, model, W_E, W_pos, counts, log = (inputs.source, inputs.model, inputs.W_E, inputs.W_pos,
                                              inputs.counts, inputs.log)
    report = {'source': {'source': source, 'data_dir': None if counts is None else inputs.data_dir,
                         'model_args': None if model is None else vars(model.config),
                         'objective': inputs.settings.get('objective')}}
    md = [f'# Embedding geometry of {source}\n']
    if log is not None and log[0]:
        report['loss'] = loss_study(*log[:2])
        md += loss_markdown(report['loss'], source, report_dir)  # source: the run's out_dir, with log.jsonl
    if W_pos is not None:
        report['positional'] = positional_geometry(W_pos)
        md += positional_markdown(report['positional'], W_pos, report_dir)
        if model is not None:
            report['attention_layer0'] = qk_decomposition(model, inputs.batch[0])
            md += attention_markdown(report['attention_layer0'], report_dir)
    if W_E is not None:
        report['tokens'] = token_study(W_E, counts, inputs.probe_ids, inputs.enc)
        md += token_markdown(report['tokens'], W_E, counts, report_dir)
    if model is not None and model.config.causal:
        report['logit_lens'] = logit_lens_study(model, *inputs.batch)
        md += logit_lens_markdown(report['logit_lens'], report_dir)
    elif model is not None:
        notes.append('logit lens skipped: it measures next-token loss, and this model is a masked LM')
    if inputs.dynamics is not None:
        report['dynamics'] = inputs.dynamics  # studied as the snapshots were read, one W_E at a time
        md += dynamics_markdown(inputs.dynamics, report_dir)
    if inputs.position_tables:
        _, evals, starts = log or ([], [], [])
        train_tokens = int(counts.sum())
        report['onset'] = onset_study(inputs.position_tables, starts, train_tokens, evals, inputs.reference)
        md += onset_markdown(report['onset'], train_tokens, report_dir)
    if inputs.train is not None:
        B = inputs.settings['batch_size'] * inputs.settings.get('gradient_accumulation_steps', 1)
        report['gradient_noise'] = gradient_noise_study(model, inputs.train, inputs.noise_batches, B,
                                                        inputs.settings.get('objective', 'clm'))
        md += gradient_noise_markdown(report['gradient_noise'])
    if inputs.other is not None:
        report['stability'] = stability_study(W_E, W_pos, *inputs.other, counts, top_n)
        md += stability_markdown(report['stability'])
    return report, md


def compare_report(inputs, top_n, report_dir, notes):
    """The token tables of several directories side by side, how the checkpoints among them trained
    and what their layers make of the tokens: (report, markdown)."""
    names, tables, settings, models, evals_by_model = zip(*inputs.compared)
    report = {'compare': {**compare_study(names, tables, inputs.counts, inputs.probe_ids, inputs.enc, top_n),
                          'data_dir': inputs.data_dir}}
    md = compare_markdown(report['compare'], report_dir)
    report['training'] = training_study(names, settings, models, evals_by_model)
    md += training_markdown(report['training'])
    if any(models):
        checkpoints = {name: m for name, m in zip(names, models) if m is not None}
        checkpoint_settings = {name: s for name, s, m in zip(names, settings, models) if m is not None}
        contextual = contextual_study(names, tables, checkpoints, checkpoint_settings, inputs.counts,
                                      inputs.val, inputs.enc)
        if contextual is None:
            notes.append(f'static vs contextual skipped: no token occurs {MIN_COUNT}+ times in the val text')
        else:
            report['contextual'] = contextual
            md += contextual_markdown(contextual, names, report_dir)
    return report, md


if __name__ == '__main__':
    configure(globals())
    check(globals(), {'checkpoint': one_of('best', 'last'), 'eval_tokens': at_least(1), 'top_n': at_least(12),
                      'noise_batches': lambda k: None if k == 0 or (type(k) is int and k >= 2)
                      else "0 (no gradient-noise study) or an integer >= 2",
                      **{name: optional(a_path) for name in ('wpe_file', 'wte_file', 'data_dir',
                                                             'compare_out_dir', 'reference_wpe')}})
    t0, enc, notes = time.time(), get_tokenizer(), []
    device = resolve_device(device)
    probe_words = PROBE_WORDS + [' ' + w.strip() for w in probes if w.strip()]
    probe_ids = {w: enc.encode_ordinary(w)[0] for w in probe_words if len(enc.encode_ordinary(w)) == 1}
    notes += [f'probe {w!r} is not a single GPT-2 token; skipped' for w in probe_words if w not in probe_ids]
    # load and check everything first, so that bad input leaves no partial report behind
    if compare:
        inputs = load_compare(compare, checkpoint, data_dir)
    elif wpe_file or wte_file:
        inputs = load_files(wpe_file, wte_file)
    else:
        inputs = load_run(init_from, out_dir, device, checkpoint, notes)
    inputs.enc, inputs.probe_ids = enc, probe_ids
    inputs.data_dir = data_dir or inputs.settings.get('data_dir') or 'data/gulliver'
    if inputs.W_E is not None or compare:
        inputs.counts = np.bincount(load_tokens(inputs.data_dir, 'train'), minlength=VOCAB_SIZE)
    run = init_from == 'resume' and 'batch_size' in inputs.settings  # a run of train.py, with its settings
    if run and inputs.W_pos is not None and noise_batches:
        # a run with a learned W_pos: the noise in its gradient
        inputs.train, inputs.noise_batches = load_tokens(inputs.data_dir, 'train'), noise_batches
    if inputs.model is not None or compare:
        inputs.val = load_tokens(inputs.data_dir, 'val')
    if inputs.model is not None:
        inputs.batch = val_batch(inputs.val, inputs.model.config.block_size, eval_tokens, device)
    if compare_out_dir:
        if inputs.W_E is None:
            sys.exit("error: --compare_out_dir compares token tables; give a checkpoint or --wte_file "
                     "as well")
        inputs.other = (compare_out_dir, *load_tables(compare_out_dir, 'compare_out_dir', checkpoint)[:2])
    if (compare or inputs.other) and len(frequent_tokens(inputs.counts, top_n)) < 12:  # overlap @10 needs 12
        sys.exit(f"error: fewer than 12 tokens occur {MIN_COUNT}+ times in {inputs.data_dir}/train.bin; "
                 f"too few to compare")
    if inputs.model is not None and init_from == 'resume':
        log_path = os.path.join(out_dir, 'log.jsonl')
        inputs.log = read_log(log_path) if os.path.exists(log_path) else None
        inputs.dynamics, position_tables = load_snapshots(os.path.join(out_dir, 'snapshots'), inputs.counts)
        inputs.position_tables = position_tables if inputs.W_pos is not None else {}
    if reference_wpe and inputs.position_tables:
        inputs.reference = load_reference(reference_wpe, out_dir, device)
    make_report_dir(report_dir)

    report, md = (compare_report if compare else model_report)(inputs, top_n, report_dir, notes)
    md += ['## Notes\n', *(f'- {n}\n' for n in notes)] if notes else []
    figures = figures_shown(md)
    report.update(figures=figures, notes=notes, seconds=round(time.time() - t0, 1))
    report_json = json.dumps(plain(report), indent=1) + '\n'
    write_atomic({os.path.join(report_dir, 'report.json'): report_json.encode(),
                  os.path.join(report_dir, 'report.md'): '\n'.join(md).encode()})
    print(f"wrote {report_dir}/report.md, report.json and {len(figures)} figures in {time.time() - t0:.1f} s")
