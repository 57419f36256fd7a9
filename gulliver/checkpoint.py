"""
A training run's checkpoints in its out_dir, written and read here only.

    ckpt.pt   the latest state, for resuming: the model, train.py's settings, each optimizer's
              state, the fp16 scaler, the iteration, every rank's RNG and sampler state, the
              coverage of the training tokens and the sha256 of the data it was trained on
    best.pt   the model at the evaluation with the lowest val loss so far: the model, its
              settings, the iteration and that val loss ('best_iter', 'best_val_loss')

train.py builds ckpt.pt's dict with training_state; resuming reads ckpt.pt (resuming from best.pt
would rewind the run's RNG and clock), holds it to the rules of check_resume and puts the
optimizers, each rank's streams (restore_rank_state, the inverse of rank_state) and the coverage
back with restore_training; sample.py and analyze.py read best.pt where train.py kept one. Both
files are written to temporary files and renamed together (gulliver/atomic.py), so a crash never
leaves half of either. load_checkpoint builds the model a checkpoint holds; load_model, what
sample.py and analyze.py are pointed at: a run, an untrained model, or GPT-2's weights.
"""
import os
import random
import warnings

import numpy as np
import torch

from gulliver.atomic import write_atomic
from gulliver.configurator import fail
from model import GPT, GPTConfig
from gulliver.pretrained import PRETRAINED

# ckpt.pt's keys; and 'best_iter', absent from a checkpoint older than best.pt
CHECKPOINT_KEYS = ('model', 'model_args', 'config', 'optimizers', 'scaler', 'iter_num', 'best_val_loss',
                   'elapsed', 'ranks', 'coverage', 'data')
RANK_STATE_KEYS = ('python', 'torch', 'cuda', 'sampler', 'epoch_rng', 'epoch_order', 'epoch_pos',
                   'targets_drawn')
BEST_KEYS = ('model', 'model_args', 'config', 'iter_num', 'best_iter', 'best_val_loss', 'data')


def read_checkpoint(path, device='cpu'):
    """The dict saved at path. Any failure to unpickle it is one ValueError naming the file: the
    bytes of a damaged file make torch.load fail in many ways (EOFError, RuntimeError, an
    IndexError or struct.error from the weights-only unpickler, MemoryError, ...)."""
    damaged = "the file is damaged: delete it, or train again"
    # what the unpickler says of bad bytes, kept until it succeeds
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        try:
            checkpoint = torch.load(path, map_location=device, weights_only=True)
        except OSError as e:
            raise ValueError(f"cannot read {path} ({e.strerror or e}); "
                             f"check the path and its permissions") from None
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
        files[os.path.join(out_dir, 'best.pt')] = (
            lambda tmp: torch.save({k: state[k] for k in BEST_KEYS}, tmp))
    write_atomic(files)


def training_state(model, model_args, config, optimizers, scaler, skips, iter_num, best_iter, best_val_loss,
                   elapsed, rank_states, covered, data_fingerprint):
    """What ckpt.pt holds (CHECKPOINT_KEYS, best_iter and skipped_in_a_row, the non-finite steps
    that ended the run so far: a resumed run goes on counting them): restore_training reads it back."""
    return {'model': model.state_dict(), 'model_args': model_args, 'config': config,
            'optimizers': [opt.state_dict() for opt in optimizers], 'scaler': scaler.state_dict(),
            'iter_num': iter_num, 'best_iter': best_iter, 'best_val_loss': best_val_loss, 'elapsed': elapsed,
            'ranks': rank_states, 'coverage': {'covered': torch.from_numpy(covered)},
            'data': data_fingerprint, 'skipped_in_a_row': int(skips.in_a_row.item())}


def restore_training(checkpoint, optimizers, scaler, skips, sampler, rank, cuda):
    """Continue where a checkpoint of training_state left off: the optimizers and the fp16 scaler,
    the count of skipped steps in a row (0 in a checkpoint older than it), this rank's RNGs and
    sampler, and the coverage of every rank's targets. (The model, the iteration and the clock are
    read where the model is built.)"""
    for opt, state in zip(optimizers, checkpoint['optimizers']):
        opt.load_state_dict(state)
    scaler.load_state_dict(checkpoint['scaler'])
    skips.in_a_row.fill_(checkpoint.get('skipped_in_a_row', 0))
    restore_rank_state(checkpoint['ranks'][rank], sampler, cuda)
    sampler.covered = checkpoint['coverage']['covered'].numpy().copy()


def checkpoint_to_read(out_dir, which='best'):
    """out_dir/best.pt when which is 'best' and the run kept one, else out_dir/ckpt.pt (the
    latest: what a run written before best.pt existed has)."""
    best = os.path.join(out_dir, 'best.pt')
    return best if which == 'best' and os.path.exists(best) else os.path.join(out_dir, 'ckpt.pt')


def load_model(init_from, out_dir, device='cpu', which='best'):
    """(model, checkpoint dict or {}) for sample.py and analyze.py: init_from is 'resume' (the
    run in out_dir: its best.pt where train.py kept one and which is 'best', else its ckpt.pt),
    'scratch' (untrained, with the checkpoint's shape if there is one, else GPT-2 small), a GPT-2
    name or a Hugging Face directory. Raises ValueError (one line)."""
    path = checkpoint_to_read(out_dir, which)
    if init_from in PRETRAINED or (init_from not in ('resume', 'scratch') and os.path.isdir(init_from)):
        return GPT.from_pretrained(init_from).to(device), {}
    if init_from not in ('resume', 'scratch'):
        raise ValueError(f"unknown model {init_from!r}; use resume, scratch, {', '.join(PRETRAINED)} "
                         f"or a directory")
    if init_from == 'resume' and not os.path.exists(path):
        raise ValueError(f"no checkpoint at {path}; run python train.py first, "
                         f"or pass --out_dir or --init_from=gpt2")
    if init_from == 'resume':
        return load_checkpoint(path, device)
    model_args = read_checkpoint(path)['model_args'] if os.path.exists(path) else {}
    return GPT(GPTConfig(**model_args)).to(device), {}


def load_checkpoint(path, device='cpu', **overrides):
    """Return (model, checkpoint) from a ckpt.pt or best.pt written by train.py (the module's
    docstring lists what each holds), the model built from the checkpoint's 'model_args' with any GPTConfig
    field in overrides (train.py passes dropout). ValueError (one line) for a damaged file, or for
    weights that are not all finite."""
    checkpoint = read_checkpoint(path, device)
    try:
        model = GPT(GPTConfig(**{**checkpoint['model_args'], **overrides}))
        model.load_state_dict(checkpoint['model'])
    except (TypeError, KeyError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0]
        raise ValueError(f"{path} holds no model that its model_args describe "
                         f"({reason}); train again") from None
    bad = sum(int((~torch.isfinite(p)).sum()) for p in model.parameters())
    if bad:  # what a diverged run saved: sampling or analysing it would give noise
        raise ValueError(f"{path}: the model holds {bad} NaN or infinite weights (a diverged run?); read a "
                         f"checkpoint whose weights are finite (--checkpoint=best or last), or train again")
    return model.to(device), checkpoint


def rank_state(sampler, cuda):
    """What one process needs to continue its own streams of batches, masks and dropout: its
    Python, torch (and CUDA) RNG states and its data.Sampler's state (generators, place in the
    epoch, target tokens drawn)."""
    own = sampler.state()
    return {'python': random.getstate(), 'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state() if cuda else None,
            **own, 'epoch_order': torch.from_numpy(own['epoch_order'])}


def restore_rank_state(own, sampler, cuda):
    """The inverse of rank_state: set this process's RNGs and its sampler from own."""
    random.setstate((own['python'][0], tuple(own['python'][1]), own['python'][2]))
    torch.set_rng_state(own['torch'])
    if cuda and own['cuda'] is not None:
        torch.cuda.set_rng_state(own['cuda'])
    sampler.restore({**own, 'epoch_order': own['epoch_order'].numpy()})


def gather_rank_states(sampler, cuda):
    """Called by all ranks together: every rank's rank_state, on rank 0 (None on the others);
    and the sampler's covered flags made those of all ranks, on every rank (a max all-reduce)."""
    own = rank_state(sampler, cuda)
    if not torch.distributed.is_initialized():
        return [own]
    flags = torch.from_numpy(sampler.covered.view(np.uint8))  # covered's own memory
    reduced = flags.cuda() if cuda else flags  # NCCL reduces on the GPU
    torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MAX)
    flags.copy_(reduced)
    states = [None] * torch.distributed.get_world_size() if torch.distributed.get_rank() == 0 else None
    torch.distributed.gather_object(own, states, dst=0)
    return states


def check_resume(settings, checkpoint, path, world_size, data_fingerprint):
    """A checkpoint resumes only as it was trained: with all its keys, by as many processes, on
    the same data, with the same optimizer and the settings its state holds (parameter groups,
    betas, the context W_pos's moments have) and fp16 scaler. A schedule, batch or evaluation
    setting that changed is printed. Anything else is one line and exit status 2."""
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if 'ranks' in checkpoint:
        missing += [f'ranks[0].{key}' for key in RANK_STATE_KEYS if key not in checkpoint['ranks'][0]]
    if missing:
        fail(f"{path} lacks {', '.join(missing)} (an older train.py wrote it, or it is damaged); "
             f"train from scratch")
    saved = checkpoint['config']
    if len(checkpoint['ranks']) != world_size:
        fail(f"{path} holds the sampler states of {len(checkpoint['ranks'])} processes; resume it with as "
             f"many (torchrun --nproc_per_node={len(checkpoint['ranks'])}, or python train.py for 1)")
    if checkpoint['data'] != data_fingerprint:
        fail(f"{path} was trained on other data than {settings['data_dir']} holds now (its train.bin or "
             f"val.bin differ); resume with the data_dir it was trained on ({saved['data_dir']}), "
             f"or train from scratch")
    # the optimizer's state holds these: its parameter groups, their decay and betas, and a learned
    # W_pos's moments, a row per position (block_size; an evaluation alone may crop the context)
    held = ['wpe_weight_decay', 'embedding_lr', 'weight_decay', 'beta1', 'beta2']
    held += (['block_size'] if saved.get('pos_emb', 'learned') == 'learned' and not settings['eval_only']
             else [])
    for name in held:
        if settings[name] != saved.get(name):
            fail(f"{path} was trained with {name}={saved.get(name)!r}; "
                 f"resume with --{name}={saved.get(name)}")
    if settings['optimizer'] != saved['optimizer']:
        fail(f"{path} holds the state of optimizer={saved['optimizer']!r}; "
             f"resume with --optimizer={saved['optimizer']}")
    scaler = bool(checkpoint['scaler'])  # the fp16 gradient scaler's state; empty without one
    if (settings['dtype'] == 'float16') != scaler:
        fail(f"{path} was trained {'with' if scaler else 'without'} the float16 gradient scaler; resume with "
             + ("--dtype=float16" if scaler else "another dtype than float16"))
    for name in ('max_iters', 'max_seconds', 'warmup_iters', 'learning_rate', 'min_lr', 'decay_lr',
                 'cooldown', 'grad_clip', 'batch_size', 'gradient_accumulation_steps', 'sampler',
                 'eval_iters', 'whole_val'):
        if settings[name] != saved.get(name):
            print(f"note: {name} changed on resume: {saved.get(name)} -> {settings[name]}")
