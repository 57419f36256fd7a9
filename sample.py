"""
Generate text from a trained checkpoint, from GPT-2 weights, or from an untrained model.

    $ python sample.py --out_dir=out-gulliver-cpu --start="I walked"       # the model train.py saved
    $ python sample.py --init_from=scratch --max_new_tokens=30             # what an untrained model says
    $ python sample.py --init_from=gpt2 --start=FILE:prompt.txt --top_p=0.9

With init_from='resume' the model is the run's best.pt (the evaluation with the lowest val
loss) where train.py kept one, else its ckpt.pt; --checkpoint=last reads ckpt.pt.

One sample streams to stdout token by token. num_samples > 1 decode together, as one batch,
and each is printed whole when all are done, separated by a line of dashes. The prompt runs
once (prefill) into a static KV cache; then each token is one decode step, which
--compile=True compiles (on CUDA as a CUDA graph; the first call compiles, for tens of seconds
on a CPU) in a warm-up on the same cache as the sample, so the graph captured is the one that
replays. dtype 'auto' on CUDA is bf16 (fp16 on a GPU without bf16) for the weights and the cache,
not measured: the compiled step reads every weight and the whole cache once per token, half the
bytes of fp32, while an eager step there is bound by kernel launches and would time fp32 and bf16
alike. On the CPU 'auto' keeps them in the dtypes that decode fastest here, measured; two timings
that come out close may choose differently from one run to the next, so for the same text from
the same --seed, pin --dtype as well. The checkpoint is read into host memory (a ckpt.pt holds
the optimizer's moments too) and only the model goes to the device. The speed goes to stderr at
the end, in two parts: the time to the first token (prefill, which also pays for a cold start: a
fresh CUDA context, a first kernel launch, a compilation) and the steady rate of the tokens after it.
"""
import codecs
import os
import sys
import time

import torch

from gulliver.checkpoint import checkpoint_to_read, load_model
from gulliver.configurator import a_seed, at_least, check, configure, number, one_of, optional, resolve_device
from gulliver.download import DownloadError
from gulliver.machine import choose_decode_dtype
from model import TEMPERATURE, TOP_K, compile_decode
from gulliver.tokenizer import get_tokenizer

# -----------------------------------------------------------------------------
init_from = 'resume'   # 'resume' (the run in out_dir), 'scratch' (untrained), 'gpt2'..'gpt2-xl',
                       # or a HF directory
out_dir = 'out-gulliver'
checkpoint = 'best'    # 'best': out_dir/best.pt where train.py kept one, else ckpt.pt; 'last': ckpt.pt
start = '\n'           # the prompt, or FILE:path to read it from a file
num_samples = 1
max_new_tokens = 200
temperature = TEMPERATURE  # 0.8; 0 is greedy
top_k = TOP_K          # 200; None: no top-k filtering
top_p = 1.0            # nucleus sampling; 1.0: off
kv_cache = True
seed = 1337
device = 'auto'        # 'auto', 'cpu', 'cuda', 'cuda:1', ...
dtype = 'auto'         # weights and KV cache: 'auto' (CUDA: bf16; CPU: the fastest, measured), 'float32',
                       # 'bfloat16', 'float16'
compile = False        # compile the decode step (model.compile_decode)
# -----------------------------------------------------------------------------
configure(globals())
check(globals(), {
    'checkpoint': one_of('best', 'last'), 'dtype': one_of('auto', 'float32', 'bfloat16', 'float16'),
    'temperature': lambda t: None if number(t) and t >= 0 else ">= 0 (0 is greedy)",
    'top_k': optional(at_least(1)),
    'top_p': lambda p: None if number(p) and 0 < p <= 1 else "in (0, 1] (1: off)",
    'max_new_tokens': at_least(1), 'num_samples': at_least(1), 'seed': a_seed,
    'kv_cache': one_of(True, False), 'compile': one_of(True, False),
})
device = resolve_device(device)
torch.manual_seed(seed)

try:  # into host memory (a ckpt.pt holds the optimizer's moments too); the model alone goes to device
    model, saved = load_model(init_from, out_dir, 'cpu', checkpoint)
except (DownloadError, ValueError) as e:
    sys.exit(f"error: {e}")
path = checkpoint_to_read(out_dir, checkpoint)
source = f"{path}, iteration {saved['iter_num']}: " if init_from == 'resume' else ''
del saved  # the optimizer's moments, in host memory until here
if not model.config.causal:
    sys.exit(f"error: {path} is a masked LM (objective='mlm'): it fills in masked tokens and cannot "
             f"generate text left to right; sample from a GPT checkpoint")

enc = get_tokenizer()
vocab_size = model.config.vocab_size  # GPT-2's ids, or the first of them (a model of data with fewer kinds)
if vocab_size > enc.n_vocab:
    sys.exit(f"error: the model has a vocabulary of {vocab_size} tokens, more than the GPT-2 tokenizer's "
             f"{enc.n_vocab}: sample.py reads and writes GPT-2 tokens")
if start.startswith('FILE:'):
    try:
        with open(start[5:], encoding='utf-8') as f:
            start = f.read()
    except OSError as e:
        sys.exit(f"error: cannot read the prompt file {start[5:]!r} ({e.strerror})")
    except UnicodeDecodeError:
        sys.exit(f"error: the prompt file {start[5:]!r} is not UTF-8 text; save it as UTF-8")
start_ids = enc.encode_ordinary(start) or [enc.eot_token]
if max(start_ids) >= vocab_size:
    sys.exit(f"error: the prompt has GPT-2 tokens (ids up to {max(start_ids)}) past the model's "
             f"vocabulary of {vocab_size}; give a prompt of the tokens it was trained on")
block_size = model.config.block_size
if len(start_ids) > block_size:
    print(f"note: the prompt has {len(start_ids)} tokens; keeping the last {block_size} (block_size)",
          file=sys.stderr)
    start_ids = start_ids[-block_size:]

model.eval().to(device)
cache_dtype = dtype
if dtype == 'auto':
    (dtype, cache_dtype), step_seconds = choose_decode_dtype(model, device, num_samples)
    timings = ", ".join(f"{seconds * 1000:.1f} ms with {weights}/{cache}"
                        for (weights, cache), seconds in step_seconds.items())
    print(f"dtype auto: {dtype} weights, {cache_dtype} KV cache ("
          + (f"a decode step: {timings}" if step_seconds else "CUDA: half the bytes of fp32, untimed") + ")",
          file=sys.stderr)
model.to(getattr(torch, dtype))
x = torch.tensor([start_ids] * num_samples, dtype=torch.long, device=device)
# one cache for the warm-up and the sample: a CUDA graph captured on a cache replays on that cache alone
cache = (model.new_cache(num_samples, getattr(torch, cache_dtype), device, static=compile) if kv_cache
         else None)
decode = None
if compile and kv_cache:
    # a prefill and two decode steps: the first compiles (and runs eagerly on CUDA), the second
    # captures the CUDA graph, which the sample's steps replay
    t0 = time.time()
    decode = compile_decode(model)
    model.generate(x, 3, temperature=0, decode=decode, cache=cache)
    print(f"compiled the decode step in {time.time() - t0:.1f} s", file=sys.stderr)

generator = torch.Generator(device=device).manual_seed(seed)
utf8 = codecs.getincrementaldecoder('utf-8')(errors='replace')  # a character may span two tokens
made, first_token_seconds, t0 = [], 0.0, time.time()
try:
    if num_samples == 1:
        sys.stdout.write(start)
    for i, token in enumerate(model.stream(x, max_new_tokens, temperature, top_k,
                                           top_p if top_p < 1 else None, kv_cache, generator,
                                           decode, cache=cache)):
        made.append(token)
        if num_samples == 1:
            # item() waits for the token
            sys.stdout.write(utf8.decode(enc.decode_single_token_bytes(token.item())))
            sys.stdout.flush()
        if i == 0:
            token.cpu()  # wait for the first token
            first_token_seconds = time.time() - t0
    samples = torch.cat(made, dim=1).tolist()  # waits for the last token
    if num_samples == 1:
        sys.stdout.write(utf8.decode(b'', final=True) + '\n')
    for k, sample in enumerate(samples if num_samples > 1 else []):
        sys.stdout.write(start + enc.decode(sample) + '\n'
                         + ('---------------\n' if k < num_samples - 1 else ''))
except BrokenPipeError:  # the reader has gone (python sample.py | head): stop quietly, as other tools do
    # no second error when Python flushes at exit
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)
except KeyboardInterrupt:
    sys.exit("\ninterrupted")
elapsed = time.time() - t0
steady = (len(made) - 1) * num_samples  # the tokens after each sample's first
print(f"{source}{len(made) * num_samples} tokens ({num_samples} x {len(made)}) in {elapsed:.2f} s: "
      f"prefill of {len(start_ids)} prompt tokens and the first token {first_token_seconds * 1000:.1f} ms"
      + (f", then {steady / (elapsed - first_token_seconds):.1f} tokens/s" if steady else ""),
      file=sys.stderr)
