"""
Generate text from a trained checkpoint, from GPT-2 weights, or from an untrained model.

    $ python sample.py --out_dir=out-gulliver-cpu --start="I walked"       # the model train.py saved
    $ python sample.py --init_from=scratch --max_new_tokens=30             # what an untrained model says
    $ python sample.py --init_from=gpt2 --start=FILE:prompt.txt --top_p=0.9

With init_from='resume' the model is the run's best.pt (the evaluation with the lowest val
loss) where train.py kept one, else its ckpt.pt; --checkpoint=last reads ckpt.pt. Tokens stream
to stdout as they are generated. The speed goes to stderr at the end, in two parts: the time to
the first token (the prompt's forward pass, prefill, which also pays for a cold start: a fresh
CUDA context, a first kernel launch) and the steady rate of the tokens after it.
"""
import codecs
import os
import sys
import time

import torch

from checkpoint import checkpoint_to_read
from configurator import at_least, check, configure, one_of, optional, resolve_device, resolve_dtype
from download import DownloadError
from machine import autocast
from model import TEMPERATURE, TOP_K, load_model
from tokenizer import get_tokenizer

# -----------------------------------------------------------------------------
init_from = 'resume'   # 'resume' (the run in out_dir), 'scratch' (untrained), 'gpt2'..'gpt2-xl', or a HF directory
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
dtype = 'auto'         # 'auto', 'float32', 'bfloat16', 'float16'
compile = False
# -----------------------------------------------------------------------------
configure(globals())
check(globals(), {
    'checkpoint': one_of('best', 'last'), 'dtype': one_of('auto', 'float32', 'bfloat16', 'float16'),
    'temperature': lambda t: None if t >= 0 else ">= 0 (0 is greedy)", 'top_k': optional(at_least(1)),
    'top_p': lambda p: None if 0 < p <= 1 else "in (0, 1]", 'max_new_tokens': at_least(1), 'num_samples': at_least(1),
    'kv_cache': one_of(True, False), 'compile': one_of(True, False),
})
device = resolve_device(device)
dtype = resolve_dtype(dtype, device)
torch.manual_seed(seed)

try:
    model, saved = load_model(init_from, out_dir, device, checkpoint)
except (DownloadError, ValueError) as e:
    sys.exit(f"error: {e}")
path = checkpoint_to_read(out_dir, checkpoint)
source = f"{path}, iteration {saved['iter_num']}: " if init_from == 'resume' else ''
if not model.config.causal:
    sys.exit(f"error: {path} is a masked LM (objective='mlm'): it fills in masked tokens and cannot generate text "
             f"left to right; sample from a GPT checkpoint")

model.eval().to(device)
if compile:
    model = torch.compile(model)
ctx = autocast(device, dtype)

enc = get_tokenizer()
if start.startswith('FILE:'):
    try:
        with open(start[5:], encoding='utf-8') as f:
            start = f.read()
    except OSError as e:
        sys.exit(f"error: cannot read the prompt file {start[5:]!r} ({e.strerror})")
    except UnicodeDecodeError:
        sys.exit(f"error: the prompt file {start[5:]!r} is not UTF-8 text; save it as UTF-8")
start_ids = enc.encode_ordinary(start) or [enc.eot_token]
block_size = model.config.block_size
if len(start_ids) > block_size:
    print(f"note: the prompt has {len(start_ids)} tokens; keeping the last {block_size} (block_size)", file=sys.stderr)
    start_ids = start_ids[-block_size:]
x = torch.tensor([start_ids], dtype=torch.long, device=device)

generator = torch.Generator(device=device).manual_seed(seed)
tokens_made, first_token_seconds, t0 = 0, 0.0, time.time()
try:
    with ctx:
        for k in range(num_samples):
            utf8 = codecs.getincrementaldecoder('utf-8')(errors='replace')  # a character may span two tokens
            sys.stdout.write(start)
            t_sample = time.time()
            for i, token in enumerate(model.stream(x, max_new_tokens, temperature, top_k, top_p if top_p < 1 else None,
                                                   kv_cache, generator)):
                sys.stdout.write(utf8.decode(enc.decode_single_token_bytes(token.item())))  # item() waits for the token
                sys.stdout.flush()
                if i == 0:
                    first_token_seconds += time.time() - t_sample
                tokens_made += 1
            sys.stdout.write(utf8.decode(b'', final=True) + '\n' + ('---------------\n' if k < num_samples - 1 else ''))
except BrokenPipeError:  # the reader has gone (python sample.py | head): stop quietly, as other tools do
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
    sys.exit(0)
except KeyboardInterrupt:
    sys.exit("\ninterrupted")
elapsed = time.time() - t0
steady = tokens_made - num_samples  # the tokens after each sample's first
print(f"{source}{tokens_made} tokens in {elapsed:.2f} s: prefill of {len(start_ids)} prompt tokens and the first token "
      f"{first_token_seconds / num_samples * 1000:.1f} ms"
      + (f", then {steady / (elapsed - first_token_seconds):.1f} tokens/s" if steady else ""), file=sys.stderr)
