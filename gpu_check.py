"""
The GPU path in one command, for a machine with a GPU and no network: `make gpu-check`, an
estimated 5 minutes on one H100 or H200 (docs/running.md has each part's estimate). It runs
the project's own scripts, prints what they measured and writes it to one file, out_file
(markdown):

1. speed (bench.py): the matmul peak and the size n that reached it, the memory bandwidth,
   GPT-2 small training at 16 x 1,024 tokens and at the largest of the larger micro-batches
   that fits (found with eager steps, compiled once; tokens/s, MFU), and decoding on the static
   KV cache, eager and compiled (a CUDA graph), at batch 1 and 8, beside the limit that reading
   the weights sets and beside transformers' eager generate on a randomly initialised GPT-2 small;
2. train.py's own step at GPT-2 small's 16 x 1,024 tokens (config/gulliver.py's model, dropout 0, no
   evaluation between its first and last step, no snapshot): its steady tokens/s and MFU, the mean of
   its log windows after the first (which holds the compilation), beside bench.py's rows, whose step
   has no padded head, no skip of a non-finite step and no gradient scaler;
3. the flagship run, train.py config/gulliver.py, with sync_debug on: a host read of a device
   tensor inside any training step after the first is an error that stops it (on CUDA);
   its evaluations, its best.pt and its wall time;
4. numerics: numerics_steps steps of a small model from one seed on the same batches, in fp32
   on the CPU and under bf16 autocast on the device: every train loss within bf16_tolerance
   (relative) of the fp32 one (these runs and the first half of the next go at once, their
   output in work_dir/fp32.txt, bf16.txt and resumed.txt);
5. resume: the same bf16 run stopped halfway and resumed: every loss after the resume within
   resume_tolerance (relative) of the straight run's. CUDA's backward kernels are not
   bit-deterministic, so a GPU resume is close, not equal; on the CPU it is bit-exact
   (tests/test_train.py).

It needs data_dir prepared (make data, or a copy of data/gulliver/) and installs nothing. It
runs on the CPU too, at whatever sizes its settings give: tests/test_gpu_check.py runs it tiny.
Exit status 1 when a check fails.
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from gulliver.atomic import write_atomic
from gulliver.configurator import at_least, check, configure, resolve_device
from gulliver.runlog import read_events

# -----------------------------------------------------------------------------
device = 'auto'
data_dir = 'data/gulliver'
work_dir = 'out-gpu-check'     # the runs' out_dirs, emptied by each check
out_file = 'gpu_check.md'
flagship_args = ''             # more overrides for the flagship run (the test makes it tiny)
bench_args = ''                # overrides for bench.py
step_args = '--batch_size=16 --block_size=1024 --max_iters=40 --log_interval=10'  # train.py's step, timed
small_args = '--n_layer=4 --n_head=4 --n_embd=256 --block_size=128 --batch_size=8'  # the numerics model
numerics_steps = 20
bf16_tolerance = 0.02          # bf16 keeps 8 bits of mantissa: 2^-8 = 0.4% per rounding,
                               # compounded over steps
resume_tolerance = 1e-3
# -----------------------------------------------------------------------------
configure(globals())
check(globals(), {'numerics_steps': at_least(2), 'bf16_tolerance': at_least(0),
                  'resume_tolerance': at_least(0)})
device = resolve_device(device)
if not os.path.exists(os.path.join(data_dir, 'train.bin')):
    sys.exit(f"error: no {data_dir}/train.bin; run make data (or copy a prepared data/gulliver/ here) first")
lines, failed = [], []


def say(text=''):
    print(text, flush=True)
    lines.append(text)


def run(script, *args):
    """Run a project script; its output goes to the terminal. Exit on failure, with its stderr."""
    result = subprocess.run([sys.executable, script, *args], stderr=subprocess.PIPE, text=True)
    if result.returncode:
        sys.exit(f"error: {script} {' '.join(args)} failed:\n{result.stderr[-3000:]}")


def out_dir(name, *args):
    """work_dir/name, emptied first unless the run resumes."""
    out = os.path.join(work_dir, name)
    if '--init_from=resume' not in args:
        shutil.rmtree(out, ignore_errors=True)
    return out


def train(name, *args):
    """A train.py run in work_dir/name, its output on the terminal; returns its log events."""
    out = out_dir(name, *args)
    run('train.py', *args, f'--data_dir={data_dir}', f'--out_dir={out}')  # a config file in args comes first
    return read_events(os.path.join(out, 'log.jsonl'))


def start(name, *args):
    """Start a train.py run in work_dir/name, its output into work_dir/name.txt; finish() waits for it."""
    out = out_dir(name, *args)
    with open(f'{out}.txt', 'a' if '--init_from=resume' in args else 'w') as output:
        process = subprocess.Popen([sys.executable, 'train.py', *args, f'--data_dir={data_dir}',
                                    f'--out_dir={out}'], stdout=output, stderr=subprocess.STDOUT)
    return process, out


def finish(started):
    """Wait for a run of start(); return its log events, or exit with the end of its output."""
    process, out = started
    if process.wait():
        with open(f'{out}.txt') as output:
            sys.exit(f"error: the {os.path.basename(out)} run failed ({out}.txt):\n{output.read()[-3000:]}")
    return read_events(os.path.join(out, 'log.jsonl'))


def losses(events):
    return {e['iter']: e['loss'] for e in events if e['event'] == 'train'}


def compare(name, reference, other, tolerance):
    """The largest relative difference of other's losses from reference's, at the iterations of other."""
    worst = max(abs(other[i] - reference[i]) / abs(reference[i]) for i in other)
    passed = worst <= tolerance
    say(f"- {name}: largest relative difference {worst:.2e} over {len(other)} losses, "
        f"tolerance {tolerance:g}: {'pass' if passed else 'FAIL'}")
    if not passed:
        failed.append(name)


say(f"# GPU check on {device}")
say(f"{time.strftime('%Y-%m-%d %H:%M')}, python {sys.version.split()[0]}")

# 1. speed
bench_file = os.path.join(work_dir, 'bench.jsonl')
os.makedirs(work_dir, exist_ok=True)
if os.path.exists(bench_file):
    os.remove(bench_file)
run('bench.py', f'--device={device}', f'--out_file={bench_file}', f'--data_dir={data_dir}',
    *shlex.split(bench_args))
say("\n## Speed (bench.py)\n")
for row in map(json.loads, open(bench_file)):
    say(f"- {row.pop('name')}: " + ', '.join(f"{k} {v:,.4g}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in row.items() if k != 'device'))

# 2. train.py's own step
events = train('step', 'config/gulliver.py', '--dropout=0.0', '--eval_interval=100000', '--eval_iters=1',
               '--snapshot_interval=None', '--sample_tokens=0', *shlex.split(step_args))
windows = [e for e in events if e['event'] == 'train']
steady = windows[1:] or windows  # the first window holds the compilation
[start_event] = [e for e in events if e['event'] == 'start']
batch, block = start_event['config']['batch_size'], start_event['config']['block_size']
say(f"\n## train.py's step at {batch} x {block:,} tokens\n")
say(f"- {sum(e['tokens_per_s'] for e in steady) / len(steady):,.0f} tokens/s, MFU "
    f"{sum(e['mfu'] for e in steady) / len(steady):.1%}, the mean of {len(steady)} log windows of "
    f"{start_event['config']['log_interval']} steps, {start_event['dtype']} on {start_event['device']}")

# 3. the flagship run
t0 = time.time()
events = train('flagship', 'config/gulliver.py', '--sync_debug=True', *shlex.split(flagship_args))
wall = time.time() - t0
say("\n## python train.py config/gulliver.py (sync_debug on)\n")
say("| iteration | train loss | val loss | elapsed (s) |\n| --- | --- | --- | --- |")
for e in (e for e in events if e['event'] == 'eval'):
    say(f"| {e['iter']} | {e['train_loss']:.4f} | {e['val_loss']:.4f} | {e['elapsed']:.0f} |")
[end] = [e for e in events if e['event'] == 'end']
speeds = [e['tokens_per_s'] for e in events if e['event'] == 'train']
say(f"\nbest.pt: iteration {end['best_iter']}, val loss {end['best_val_loss']:.4f}; "
    f"{wall:.0f} s wall in all, {end['elapsed']:.0f} s of training"
    + (f", {speeds[-1]:,.0f} tokens/s at the last log" if speeds else ""))

# 4. numerics and 5. resume, on the same batches from the same seed: small runs, three at once
say("\n## Numerics\n")
common = [*shlex.split(small_args), '--log_interval=1', f'--eval_interval={numerics_steps}', '--eval_iters=1',
          '--sample_tokens=0', '--decay_lr=False', '--dropout=0.0', '--compile=False', '--peak_flops=1e12']
on_device = [*common, f'--device={device}', '--dtype=bfloat16']
half = numerics_steps // 2
runs = [start('fp32', *common, f'--max_iters={numerics_steps}', '--device=cpu', '--dtype=float32'),
        start('bf16', *on_device, f'--max_iters={numerics_steps}'),
        start('resumed', *on_device, f'--max_iters={half}')]
fp32, bf16, _ = (losses(finish(started)) for started in runs)
compare(f"bf16 on {device} against fp32 on the CPU", fp32, bf16, bf16_tolerance)
resumed = losses(finish(start('resumed', *on_device, f'--max_iters={numerics_steps}', '--init_from=resume')))
compare(f"resumed after {half} steps against the straight run", bf16,
        {i: resumed[i] for i in resumed if i > half}, resume_tolerance)

say(f"\n{'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)}")
write_atomic({out_file: ('\n'.join(lines) + '\n').encode()})
print(f"wrote {out_file}")
sys.exit(1 if failed else 0)
