"""
A training run's checkpoints in its out_dir, written and read here only.

    ckpt.pt   the latest state, for resuming: the model, train.py's settings, each optimizer's
              state, the fp16 scaler, the iteration, every rank's RNG and sampler state, the
              coverage of the training tokens and the sha256 of the data it was trained on
    best.pt   the model at the evaluation with the lowest val loss so far: the model, its
              settings, the iteration and that val loss ('best_iter', 'best_val_loss')

Resuming reads ckpt.pt (resuming from best.pt would rewind the run's RNG and clock);
sample.py and analyze.py read best.pt where train.py kept one. Both are written to temporary
files and renamed together (atomic.py), so a crash never leaves half of either.
"""
import os
import warnings

import torch

from atomic import write_atomic

BEST_KEYS = ('model', 'model_args', 'config', 'iter_num', 'best_iter', 'best_val_loss', 'data')


def read_checkpoint(path, device='cpu'):
    """The dict saved at path. Any failure to unpickle it is one ValueError naming the file: the
    bytes of a damaged file make torch.load fail in many ways (EOFError, RuntimeError, an
    IndexError or struct.error from the weights-only unpickler, MemoryError, ...)."""
    damaged = "the file is damaged: delete it, or train again"
    with warnings.catch_warnings(record=True) as caught:  # what the unpickler says of bad bytes, kept until it succeeds
        warnings.simplefilter('always')
        try:
            checkpoint = torch.load(path, map_location=device, weights_only=True)
        except OSError as e:
            raise ValueError(f"cannot read {path} ({e.strerror or e}); check the path and its permissions") from None
        except Exception as e:
            raise ValueError(f"cannot load {path} ({type(e).__name__}); {damaged}") from None
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get('model_args'), dict):
        raise ValueError(f"cannot load {path} (no model_args dict); {damaged}")
    return checkpoint


def write_checkpoint(out_dir, state, best):
    """Write out_dir/ckpt.pt, and when best is true out_dir/best.pt (the BEST_KEYS of state),
    both atomically and together."""
    files = {os.path.join(out_dir, 'ckpt.pt'): lambda tmp: torch.save(state, tmp)}
    if best:
        files[os.path.join(out_dir, 'best.pt')] = lambda tmp: torch.save({k: state[k] for k in BEST_KEYS}, tmp)
    write_atomic(files)


def checkpoint_to_read(out_dir, which='best'):
    """out_dir/best.pt when which is 'best' and the run kept one, else out_dir/ckpt.pt (the
    latest: what a run written before best.pt existed has)."""
    best = os.path.join(out_dir, 'best.pt')
    return best if which == 'best' and os.path.exists(best) else os.path.join(out_dir, 'ckpt.pt')
