"""
A training run's record in its out_dir: log.jsonl, one JSON event per line, and loss.png drawn
from it. The log is strict JSON (a non-finite number is written as null). A new run starts a
fresh log and snapshots/ folder, and the files of the run before are kept under a dated name, so
that a plot, an analysis or a resume never mixes two runs; a resumed run appends to its own log.
"""
import itertools
import json
import math
import os
import time

from gulliver.atomic import remove_orphans, write_atomic


def start_log(out_dir, new_run):
    """Create out_dir, clear the temporary files of a killed writer, set an earlier run's log,
    snapshots, ckpt.pt and best.pt aside if this is a new run (so that a new run stopped before its
    first save leaves no other run's checkpoint to resume), and return log.jsonl open for appending
    (without the last line of a killed writer, if it left one cut short). OSError if out_dir
    cannot be written."""
    os.makedirs(out_dir, exist_ok=True)
    for folder in (out_dir, os.path.join(out_dir, 'snapshots')):
        remove_orphans(folder)
    if new_run:
        set_aside(out_dir, [name for name in ('log.jsonl', 'snapshots', 'ckpt.pt', 'best.pt')
                            if os.path.exists(os.path.join(out_dir, name))])
    path = os.path.join(out_dir, 'log.jsonl')
    # a killed writer's last line, cut short: dropped, or the next event would join it
    if os.path.exists(path):
        with open(path, 'rb+') as f:
            text = f.read()
            if not text.endswith(b'\n'):
                f.truncate(text.rfind(b'\n') + 1)
    return open(path, 'a')


def set_aside(out_dir, names):
    """Rename the files (or folders) names in out_dir to NAME-STAMP.EXT, all with one STAMP: the
    time to the second, with a count added where a run was set aside in that second already."""
    dated = lambda name, stamp: os.path.join(out_dir, f'{os.path.splitext(name)[0]}-{stamp}'
                                                      f'{os.path.splitext(name)[1]}')
    now = time.strftime('%Y%m%d-%H%M%S')
    stamps = itertools.chain([now], (f'{now}-{n}' for n in itertools.count(1)))
    stamp = next(stamp for stamp in stamps if not any(os.path.exists(dated(name, stamp)) for name in names))
    for name in names:
        os.replace(os.path.join(out_dir, name), dated(name, stamp))


def write_event(log_file, event, **fields):
    """Append one event as a line of JSON, and flush it."""
    fields = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in fields.items()}
    log_file.write(json.dumps({'event': event, **fields}, allow_nan=False) + '\n')
    log_file.flush()


def read_events(path):
    """The events of a log.jsonl (a last line still being written, with no newline yet, is left
    out); ValueError if a line is not JSON."""
    with open(path) as f:
        try:
            return [json.loads(line) for line in f if line.endswith('\n')]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} has a line that is not JSON ({e.msg}); "
                             f"is it a log.jsonl written by train.py?")


def tokens_seen(starts, iteration):
    """Training tokens seen by the end of an iteration, from the run's start events (one per start
    or resume, each with the iteration it started at and its tokens_per_iter); None without them."""
    starts = sorted((e['iter'], e['tokens_per_iter']) for e in starts if 'tokens_per_iter' in e)
    if not starts or starts[0][0] > 0:
        return None
    seen = 0
    for (begin, per_iter), (end, _) in zip(starts, starts[1:] + [(math.inf, None)]):
        seen += per_iter * max(0, min(iteration, end) - begin)
    return seen


def write_snapshot(out_dir, iter_num, model):
    """out_dir/snapshots/iter_NNNNNN.npz: the model's W_E and W_pos (where it learns one) in fp16,
    for the embedding-dynamics studies of analyze.py."""
    import numpy as np
    arrays = {'W_E': model.W_E.detach().cpu().half().numpy()}
    if model.W_pos is not None:
        arrays['W_pos'] = model.W_pos.detach().cpu().half().numpy()
    os.makedirs(os.path.join(out_dir, 'snapshots'), exist_ok=True)
    path = os.path.join(out_dir, 'snapshots', f'iter_{iter_num:06d}.npz')
    write_atomic({path: lambda tmp: np.savez(tmp, **arrays)})


def plot_losses(out_dir, path=None):
    """The batch losses and the evaluations of the run in out_dir/log.jsonl, drawn into path
    (out_dir/loss.png unless given: analyze.py puts a copy in its report)."""
    from matplotlib.figure import Figure  # a figure of its own, drawn by Agg: no pyplot, no display
    events = read_events(os.path.join(out_dir, 'log.jsonl'))
    number = lambda value: math.nan if value is None else value  # null: a non-finite loss
    train = [(e['iter'], number(e['loss'])) for e in events if e['event'] == 'train']
    evals = [e for e in events if e['event'] == 'eval']
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.6, label='train (batch)')
    for split in ('train', 'val'):
        ax.plot([e['iter'] for e in evals], [number(e[f'{split}_loss']) for e in evals], 'o-',
                label=f'{split} (eval)')
    ax.set(xlabel='iteration', ylabel='cross-entropy (nats)', title=f'{out_dir}: loss')
    ax.legend()
    fig.tight_layout()
    write_atomic({path or os.path.join(out_dir, 'loss.png'):
                      lambda tmp: fig.savefig(tmp, format='png', dpi=120)})
