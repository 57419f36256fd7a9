"""
Train GPT-2 on the book, on a GPU or the CPU, in one process or several (DDP):

    $ python train.py config/gulliver.py          # GPU: GPT-2 small, 500 iterations
    $ python train.py config/gulliver_cpu.py      # CPU: a small model in 5 minutes, on any CPU
    $ torchrun --standalone --nproc_per_node=4 train.py config/gulliver.py

Resume with --init_from=resume; fine-tune GPT-2 with --init_from=gpt2. Ctrl-C or SIGTERM finishes
the step, saves and stops (under DDP the ranks agree on the step). The file reads top to bottom:
settings, start-up (processes, data, model, optimizers), then one loop. A step sees batch_size *
gradient_accumulation_steps sequences of block_size tokens whatever the number of processes
(gulliver/data.py); a run ends at max_iters or max_seconds, and the learning rate decays on that
progress (gulliver/schedule.py). Losses are in nats per token, val_bpb in bits per byte.

A step reads no device tensor on the host, so a GPU never waits for the CPU. A non-finite loss or
gradient leaves the weights and optimizer state as they were (gulliver/optim.py's step_unless
decides on the device); the skipped steps are read at log, eval and stop iterations, where a run
non-finite for max_skipped_steps steps in a row stops.
"""
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from gulliver.checkpoint import (check_resume, gather_rank_states, load_checkpoint, restore_training,
                                 training_state, write_checkpoint)
from gulliver.configurator import check, check_model, configure, resolve_device, resolve_dtype, train_rules
from gulliver.data import Sampler, bits_per_byte, eval_batches, open_data, split_batch
from gulliver.download import DownloadError
from gulliver.machine import autocast, choose_cpu_dtype, keep_freed_memory, measure_matmul_flops, to_device
from gulliver.optim import SkippedSteps, step_unless
from gulliver.pretrained import PRETRAINED
from gulliver.processes import StopSignals, agree, end_processes, start_processes
from gulliver.runlog import plot_losses, start_log, write_event, write_snapshot
from gulliver.schedule import learning_rate_at, training_progress
from gulliver.tokenizer import get_tokenizer
from model import GPT, GPTConfig, POS_EMBS, TEMPERATURE, TOP_K

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'
eval_interval = 250
log_interval = 10
eval_iters = 50         # the train loss is the mean over this many random batches
whole_val = True        # val loss over every window of the val split once; False: eval_iters random batches
eval_only = False       # evaluate the run in out_dir (its ckpt.pt) once: only its log changes, by the eval
always_save_checkpoint = True
overwrite = False       # let init_from='scratch' or a pretrained model replace the run in out_dir
init_from = 'scratch'   # 'scratch', 'resume' (out_dir/ckpt.pt), 'gpt2', 'gpt2-medium', 'gpt2-large', ...
snapshot_interval = None  # save W_E and W_pos every this many iterations (None: never)
sample_tokens = 48      # a sample of this many tokens at iteration 0 and at the end
# data
data_dir = 'data/gulliver'
sampler = 'random'      # 'random': random offsets; 'epoch': every non-overlapping window once per epoch
objective = 'clm'       # 'clm': next-token prediction (GPT); 'mlm': masked tokens, bidirectional (BERT-style)
gradient_accumulation_steps = 1  # the global batch is batch_size * gradient_accumulation_steps sequences
batch_size = 12                  # sequences per forward pass (at most)
block_size = 1024
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = True
pos_emb = 'learned'     # 'learned', 'sinusoidal', 'rope', 'alibi', 'none'
pad_vocab_to = 64       # pad the embedding rows to a multiple of this (logits are sliced back)
wpe_init_std = 0.02     # a learned W_pos starts ~ N(0, wpe_init_std^2); 0: all zeros
wpe_init = 'normal'     # 'normal', or 'sinusoidal': a smooth start, the sinusoidal table at RMS wpe_init_std
# optimizer
optimizer = 'adamw'     # 'adamw' or 'muon'
learning_rate = 6e-4
max_iters = 5000        # the run ends at max_iters or max_seconds, whichever comes first
max_seconds = None      # wall-clock budget of the training loop in seconds (None: none)
weight_decay = 1e-1
wpe_weight_decay = None # W_pos's own weight decay; None: weight_decay
embedding_lr = None     # W_E's and W_pos's own peak learning rate, on the same schedule; None: learning_rate
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0         # None: no clipping
max_skipped_steps = 10  # stop after this many steps in a row with a non-finite loss or gradient
# learning-rate schedule (gulliver/schedule.py): a linear warm-up, then a decay to min_lr at the end
decay_lr = True
warmup_iters = 100
min_lr = 6e-5
cooldown = None         # None: a cosine decay; a fraction f: the peak, then linear to min_lr over the last f
# system
backend = 'nccl'        # DDP backend on CUDA; the CPU uses gloo
device = 'auto'         # 'auto', 'cpu', 'cuda', 'cuda:1', ...
dtype = 'auto'          # 'auto' (CUDA: bf16, else fp16; CPU: the faster, measured), 'float32', 'bfloat16'...
compile = None          # None: on for CUDA, off for the CPU
peak_flops = 'auto'     # FLOP/s that MFU is measured against; 'auto': measure this machine's matmul peak
sync_debug = False      # CUDA: a host read of a device tensor in a training step (but the first) is an error
seed = 1337
# -----------------------------------------------------------------------------
chosen = configure(globals())  # the settings a config file or the command line set
check(globals(), train_rules(PRETRAINED, POS_EMBS))
config = {k: v for k, v in globals().items() if k.islower() and not k.startswith('_')
          and isinstance(v, (int, float, bool, str, type(None)))}


def fail(message):
    sys.exit(f"error: {message}")


def eval_splits(data, whole_val, n_windows, batch_size, block_size, objective, seed, vocab_size):
    """Each split's evaluation batches, the same at every evaluation (a generator seeded alike draws
    train's offsets and the masked LM's masks); with whole_val, val's every window once
    (gulliver/data.py's every_window: every run of this block_size is measured on the same targets)."""
    return {split: eval_batches(tokens, split == 'val' and whole_val, n_windows, batch_size, block_size,
                                objective, np.random.default_rng(seed + 1_000_003), vocab_size)
            for split, tokens in data.items()}


@torch.no_grad()
def estimate_loss(model, batches_by_split, ctx, device):
    """The mean loss of each split over its batches (x, y), every target (y >= 0) weighing the same."""
    losses = {}
    model.eval()
    for split, batches in batches_by_split.items():
        total, targets = 0.0, 0
        for x, y in batches:
            count = int((y >= 0).sum())
            if count:
                X, Y = to_device(x, y, device)
                with ctx:
                    total += model(X, Y)[1].item() * count  # the batch's mean loss, times its targets
                targets += count
        losses[split] = total / targets
    model.train()
    return losses


def report_evaluation(losses, rank_states, covered, meta, objective, iter_num, elapsed, lr, log):
    """Print and log an evaluation: the losses, the val loss in bits per byte (none for the masked LM,
    whose loss is over its masked tokens only), and the share of the training tokens drawn as targets
    so far beside what random offsets give after drawing D targets from n tokens, 1 - exp(-D / n)."""
    drawn = sum(state['targets_drawn'] for state in rank_states)  # all ranks' targets
    clm = objective == 'clm'
    val_bpb = bits_per_byte(losses['val'], meta['val_tokens'], meta['val_bytes']) if clm else None
    coverage, predicted = float(covered.mean()), 1 - math.exp(-drawn / meta['train_tokens'])
    print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
          + (f", val bpb {val_bpb:.4f}" if val_bpb is not None else "")
          + f", coverage {coverage:.1%} (random offsets: {predicted:.1%}), {elapsed:.0f} s")
    log('eval', iter=iter_num, train_loss=losses['train'], val_loss=losses['val'], val_bpb=val_bpb,
        elapsed=elapsed, lr=lr, coverage=coverage, coverage_predicted=predicted)


@torch.no_grad()
def sample_text(model, n_tokens, seed, ctx, device, iter_num, log):
    """n_tokens tokens from the model after a newline, drawn with a fixed seed: printed and logged."""
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    start = torch.tensor([get_tokenizer().encode_ordinary('\n')], device=device)
    with ctx:
        out = model.generate(start, n_tokens, temperature=TEMPERATURE, top_k=TOP_K, generator=generator)
    model.train()
    text = get_tokenizer().decode(out[0, 1:].tolist())
    print(f"sample at iteration {iter_num}: {text!r}")
    log('sample', iter=iter_num, text=text)


def save_checkpoint(out_dir, state, best):
    """ckpt.pt, and best.pt too when best (gulliver/checkpoint.py). A write that fails leaves the previous
    checkpoint as it was, and stops the run with one line."""
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    try:
        write_checkpoint(out_dir, state, best)
    except (OSError, RuntimeError) as e:  # a full disk: torch.save says RuntimeError
        reason = getattr(e, 'strerror', None) or 'the write failed: a full disk, or a limit on file size?'
        fail(f"cannot write {ckpt_path} ({reason}); the previous checkpoint is intact: make room and resume")
    print(f"saved {ckpt_path}" + (f" and {out_dir}/best.pt" if best else ""))


def check_skipped(counts, iter_num, loss, micro_steps, max_in_a_row, ckpt_path, log):
    """Report the steps skipped since the last read (SkippedSteps.read's counts) and stop a run that
    stayed non-finite for max_in_a_row steps: every rank reads the same counts (the gradient norm is
    all-reduced), so all stop together. loss: the last micro-batch's, read only to report a skip."""
    skipped, longest, steps = counts
    if skipped:
        print(f"iter {iter_num}: {skipped} of the last {steps} updates skipped (non-finite loss or gradient)")
        log('skipped', iter=iter_num, steps=skipped, in_a_row=longest, loss=loss.item() * micro_steps)
    if longest >= max_in_a_row:
        fail(f"the loss or gradient was not finite for {longest} steps in a row: the run diverged. "
             f"{ckpt_path} keeps the last good state; lower --learning_rate")


# -----------------------------------------------------------------------------
# start-up: processes and device, data, model, optimizers
signal.signal(signal.SIGINT, lambda signum, frame: fail("interrupted during start-up; nothing was saved"))
if eval_only:  # the run's checkpoint, read as a resume reads it: no new run, nothing set aside
    init_from = 'resume'
world_size = int(os.environ.get('WORLD_SIZE', 1))  # torchrun's processes
try:
    micro_batch, micro_steps = split_batch(batch_size, gradient_accumulation_steps, world_size)
except ValueError as e:
    fail(str(e))
ddp, rank, world_size, device, host_group = start_processes(resolve_device(device), backend)
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
if dtype != 'auto' or device_type == 'cuda':  # the CPU's 'auto' is measured below, on the model
    dtype = resolve_dtype(dtype, device)
compile = device_type == 'cuda' if compile is None else compile
torch.manual_seed(seed + rank)
random.seed(seed + rank)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
if device_type == 'cpu':
    keep_freed_memory()
tokens_per_iter = batch_size * gradient_accumulation_steps * block_size  # the global batch

# each split is memory-mapped once; batches are windows at offsets that the sampler draws
try:
    meta, data = open_data(data_dir)  # checked against meta.json: counts, sha256, ids below vocab_size
    shortest = min(len(d) for d in data.values())
    if block_size + 1 > shortest:
        raise ValueError(f"block_size {block_size} needs at least {block_size + 1} tokens per split, but "
                         f"{data_dir} has {shortest} in its smaller split; lower --block_size")
    train_sampler = Sampler(data['train'], block_size, micro_batch, sampler, objective, meta['vocab_size'],
                            seed, rank, world_size)
except ValueError as e:
    fail(str(e))
data_fingerprint = {name: meta['sha256'][name] for name in ('train.bin', 'val.bin')}  # kept in the checkpoint

model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                  vocab_size=meta['vocab_size'], dropout=dropout, pos_emb=pos_emb, causal=objective == 'clm',
                  pad_vocab_to=pad_vocab_to, wpe_init_std=wpe_init_std, wpe_init=wpe_init)
# out_dir holds one run: a new run never replaces another's checkpoint unless told to, and then
# sets the earlier run's checkpoints, log and snapshots aside under a dated name (start_log, below)
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if init_from != 'resume' and os.path.exists(ckpt_path) and not overwrite:
    fail(f"{out_dir} holds another run's checkpoint; continue it with --init_from=resume, or pass another "
         f"--out_dir, or --overwrite=True to replace it")
iter_num, best_iter, best_val_loss, checkpoint = 0, None, 1e9, None
elapsed_before = 0.0  # seconds of training loop spent by the run this one resumes
if init_from == 'scratch':
    model = GPT(GPTConfig(**model_args))
elif init_from == 'resume':
    if not os.path.exists(ckpt_path):
        fail(f"no checkpoint at {ckpt_path} to {'evaluate' if eval_only else 'resume from'}; train with "
             f"--init_from=scratch first")
    try:
        model, checkpoint = load_checkpoint(ckpt_path, dropout=dropout)
    except ValueError as e:
        fail(str(e))
    check_resume(globals(), checkpoint, ckpt_path, world_size, data_fingerprint)
    model_args = {**checkpoint['model_args'], 'dropout': dropout}
    iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
    elapsed_before = checkpoint['elapsed']
    best_iter = checkpoint.get('best_iter')  # None in a checkpoint written before best.pt was kept
else:
    try:
        model = GPT.from_pretrained(init_from, dropout=dropout, pad_vocab_to=pad_vocab_to)
    except (DownloadError, ValueError) as e:
        fail(str(e))
    model_args = asdict(model.config)
check_model(globals(), chosen, model.config, ckpt_path if init_from == 'resume' else init_from)
if model.config.vocab_size != meta['vocab_size']:
    fail(f"the model's vocab_size {model.config.vocab_size} differs from {data_dir}/meta.json "
         f"({meta['vocab_size']}); prepare this data with the model's tokenizer, or train from scratch on it")
if block_size > model.config.block_size:
    fail(f"block_size {block_size} is larger than the model's context ({model.config.block_size})")
if block_size < model.config.block_size:
    model.crop_block_size(block_size)
    model_args['block_size'] = block_size
log = lambda event, **fields: None  # log.jsonl, written by rank 0 alone
if master:
    try:
        log_file = start_log(out_dir, new_run=init_from != 'resume')
    except OSError as e:
        fail(f"cannot write to out_dir {out_dir!r} ({e.strerror}); pass an --out_dir you can write to")
    log = lambda event, **fields: write_event(log_file, event, **fields)
model.to(device)
if dtype == 'auto':  # the CPU: bf16 autocast only where this CPU runs it faster than fp32
    dtype, head_seconds, probe_tokens = choose_cpu_dtype(model.config.n_embd, model.config.padded_vocab_size,
                                                         batch_size * block_size)
    if master:
        print(f"dtype auto: {dtype} (vocabulary head forward + backward on {probe_tokens} tokens: "
              f"{head_seconds['float32'] * 1000:.1f} ms in float32, {head_seconds['bfloat16'] * 1000:.1f} ms "
              f"under bfloat16 autocast)")
ctx = autocast(device, dtype)
optimizers = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type, optimizer,
                                        wpe_weight_decay, embedding_lr,
                                        ns_dtype=torch.bfloat16 if dtype == 'bfloat16' else torch.float32)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
skips = SkippedSteps(device, iter_num)  # counted on the device, read at log, eval and stop iterations
if checkpoint is not None:
    restore_training(checkpoint, optimizers, scaler, skips, train_sampler, rank, device_type == 'cuda')
    checkpoint = None  # free the memory
raw_model = model  # the plain GPT: what checkpoints save, never a compiled or DDP wrapper
if compile:  # static shapes: evaluation's batches have one shape too (eval_batches), so no graph is symbolic
    print("compiling the model ...")
    model = torch.compile(model, dynamic=False)
eval_model = model  # rank 0 evaluates alone: never through the DDP wrapper, whose forward may communicate
if ddp:  # buffers are constants (the padding's -inf bias, position tables): never broadcast again;
    # each .grad is a view of its all-reduce bucket, not a copy
    model = DDP(model, device_ids=[int(os.environ['LOCAL_RANK'])] if device_type == 'cuda' else None,
                broadcast_buffers=False, gradient_as_bucket_view=True)
# sync_debug from the step after the first, which compiles; under DDP from the third: the first forward
# after the first synced backward rebuilds DDP's buckets, and reads their sizes on the host to do it
sync_debug_from = iter_num + (2 if ddp else 1) if sync_debug and device_type == 'cuda' else math.inf
if peak_flops == 'auto':
    peak_flops, _ = measure_matmul_flops(device, getattr(torch, dtype))
# what ckpt.pt holds, less what changes from one save to the next
run_state = lambda *changing: training_state(raw_model, model_args, config, optimizers, scaler, skips,
                                             *changing, train_sampler.covered, data_fingerprint)
stop_signals = StopSignals()
stop_signals.install()
if master:
    n_params = raw_model.num_params()
    print(f"{n_params / 1e6:.2f}M parameters, {tokens_per_iter:,} tokens per iteration ({world_size} "
          f"processes x {micro_steps} micro-batches x {micro_batch} sequences x {block_size} tokens), device "
          f"{device}, dtype {dtype}, compile {compile}, MFU peak {peak_flops / 1e12:.2f} TFLOP/s"
          + (f", budget {max_seconds:.0f} s" if max_seconds else ""))
    if not eval_only:
        log('start', iter=iter_num, params=n_params, tokens_per_iter=tokens_per_iter, device=device,
            dtype=dtype, peak_flops=peak_flops, world_size=world_size, micro_batch=micro_batch,
            micro_steps=micro_steps, config=config)
if master and iter_num == 0 and objective == 'clm' and sample_tokens:
    sample_text(raw_model, sample_tokens, seed, ctx, device, iter_num, log)

# -----------------------------------------------------------------------------
# the loop: each iteration sets the learning rate, evaluates and saves when it is time, then takes one step
start_iter, t_start = iter_num, time.time()
t0, window_start = t_start, iter_num  # the log's timing window: its start, and the iteration it starts at
clock = lambda: elapsed_before + time.time() - t_start  # seconds of training loop, with the runs' before
while True:
    elapsed, stop = clock(), stop_signals.name is not None
    if ddp:
        elapsed, stop = agree(elapsed, stop, master, host_group)
    progress = training_progress(iter_num, max_iters, elapsed, max_seconds)
    lr = (learning_rate_at(iter_num, progress, learning_rate, min_lr, warmup_iters, cooldown) if decay_lr
          else learning_rate)
    for opt in optimizers:
        for group in opt.param_groups:
            group['lr'] = lr * group.get('lr_scale', 1.0)  # embedding_lr's group: its ratio to learning_rate

    last = progress >= 1 or stop or eval_only
    trained = iter_num > start_iter  # a step taken since this process started: something new to save
    if trained and (iter_num % log_interval == 0 or iter_num % eval_interval == 0 or last):
        check_skipped(skips.read(iter_num), iter_num, loss, micro_steps, max_skipped_steps, ckpt_path, log)
    if stop:
        print(f"{f'rank {rank}: ' if ddp else ''}stopping after iteration {iter_num} "
              f"({stop_signals.name or 'another process was signalled'})", flush=True)
    snapshot = master and snapshot_interval and (iter_num % snapshot_interval == 0 or last) and not eval_only
    if snapshot:
        write_snapshot(out_dir, iter_num, raw_model)
    # evaluate, and save ckpt.pt after a finite evaluation, with best.pt when its val loss is the lowest of
    # the run's; a resumed run starts after the evaluation its checkpoint followed. A stop saves before it
    # evaluates (torchrun kills 30 s after its signal), and after the evaluation only a best. Every rank
    # gathers its state for the checkpoint.
    evaluating = last or (iter_num % eval_interval == 0 and (trained or init_from != 'resume'))
    rank_states = gather_rank_states(train_sampler, device_type == 'cuda') if evaluating else None
    if master and stop and trained:
        save_checkpoint(out_dir, run_state(iter_num, best_iter, best_val_loss, clock(), rank_states), False)
    val_loss = math.nan
    if master and evaluating:
        batches = eval_splits(data, whole_val, eval_iters * batch_size, batch_size, block_size, objective,
                              seed, meta['vocab_size'])
        losses = estimate_loss(eval_model, batches, ctx, device)
        report_evaluation(losses, rank_states, train_sampler.covered, meta, objective, iter_num, elapsed, lr,
                          log)
        val_loss = losses['val']
    improved = trained and val_loss < best_val_loss  # never a NaN, nor the starting point
    if improved:
        best_iter, best_val_loss = iter_num, val_loss
    if master and trained and (improved or (always_save_checkpoint and math.isfinite(val_loss) and not stop)):
        save_checkpoint(out_dir, run_state(iter_num, best_iter, best_val_loss, clock(), rank_states),
                        improved)
    if last:
        break
    if evaluating or snapshot:  # the log times the steps alone: the window restarts after this work
        t0, window_start = time.time(), iter_num

    # one optimizer step: micro_steps forward/backward passes on each rank, then clip and update.
    # Nothing here reads a device tensor on the host, so the CPU queues the next step while the
    # GPU still runs this one (sync_debug makes such a read an error on CUDA).
    if iter_num >= sync_debug_from:
        torch.cuda.set_sync_debug_mode('error')
    for micro_step in range(micro_steps):
        X, Y = to_device(*train_sampler.next_batch(), device)
        sync = not ddp or micro_step == micro_steps - 1  # all-reduce the gradients only on the last
        with ctx, (nullcontext() if sync else model.no_sync()):
            loss = model(X, Y)[1] / micro_steps  # DDP averages over the ranks: the mean over the global batch
        scaler.scale(loss).backward()
    for opt in optimizers:
        scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip or math.inf)
    skip = (~torch.isfinite(grad_norm)).float()  # a non-finite loss or gradient (or fp16 overflow) skips
    step_unless(optimizers, skip)
    scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    skips.update(skip)
    if iter_num >= sync_debug_from:
        torch.cuda.set_sync_debug_mode('default')

    iter_num += 1
    if master and iter_num % log_interval == 0:
        dt, t0, window_start = (time.time() - t0) / (iter_num - window_start), time.time(), iter_num
        tokens_per_s, elapsed = tokens_per_iter / dt, clock()
        mfu = raw_model.estimate_mfu(tokens_per_s, peak_flops * world_size, block_size)
        progress = training_progress(iter_num, max_iters, elapsed, max_seconds)
        loss_value = loss.item() * micro_steps  # rank 0's last micro-batch
        eta = max(elapsed * (1 - progress) / progress, 0)  # at the pace so far
        print(f"iter {iter_num}: loss {loss_value:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
              f"{tokens_per_s:,.0f} tokens/s, MFU {mfu:.1%}, progress {progress:.2f}, ETA {eta:.0f} s",
              flush=True)
        log('train', iter=iter_num, loss=loss_value, lr=lr, ms_per_iter=dt * 1000, tokens_per_s=tokens_per_s,
            mfu=mfu, grad_norm=grad_norm.item())

if master and eval_only:
    log_file.close()
    print(f"evaluated {ckpt_path} (iteration {iter_num}); nothing saved, the eval appended to "
          f"{out_dir}/log.jsonl")
elif master:
    if objective == 'clm' and sample_tokens:
        sample_text(raw_model, sample_tokens, seed, ctx, device, iter_num, log)
    elapsed = clock()
    log('end', iter=iter_num, best_iter=best_iter, best_val_loss=best_val_loss, elapsed=elapsed)
    log_file.close()
    plot_losses(out_dir)
    best = (f"best val loss {best_val_loss:.4f} at iteration {best_iter} in {out_dir}/best.pt"
            if best_iter is not None else "no evaluation saved")
    print(f"done in {elapsed:.0f} s of training; {best}; latest checkpoint {ckpt_path} (iteration "
          f"{iter_num}), log {out_dir}/log.jsonl, plot {out_dir}/loss.png")
if ddp:
    end_processes(model)
