"""
The GPT-2 byte-level BPE, built with tiktoken from a vendored ranks file, so that
tokenizing never touches the network.

assets/gpt2.tiktoken holds the 50,256 merge ranks (one `base64(token) rank` per line).
It comes from the openai-whisper==20250625 source distribution on PyPI (MIT licence),
whisper/assets/gpt2.tiktoken; its sha256 is the hash tiktoken itself expects for
r50k_base, whose ranks, split pattern and <|endoftext|> = 50256 are GPT-2's.
"""
import base64
import hashlib
import os
from functools import lru_cache

import tiktoken

from gulliver.configurator import fail

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, beside this package
RANKS_FILE = os.path.join(ROOT, 'assets', 'gpt2.tiktoken')
RANKS_SHA256 = '306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930'
# The pre-tokenizer regex of the original GPT-2 release: contractions, letters, digits,
# other symbols (each optionally led by one space), then runs of whitespace.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT_TOKEN = 50256  # <|endoftext|>
VOCAB_SIZE = 50257


@lru_cache(maxsize=1)
def get_tokenizer():
    """The GPT-2 encoding: get_tokenizer().encode_ordinary('Hello world') == [15496, 995]."""
    restore = "restore it: git checkout -- assets/gpt2.tiktoken"
    try:
        with open(RANKS_FILE, 'rb') as f:
            data = f.read()
    except OSError as e:
        fail(f"cannot read the GPT-2 BPE ranks {RANKS_FILE} ({e.strerror}); {restore}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        fail(f"{RANKS_FILE} is damaged (sha256 {digest[:16]}..., not {RANKS_SHA256[:16]}...); {restore}")
    ranks = {}
    for line in data.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(name='gpt2', pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens={'<|endoftext|>': EOT_TOKEN}, explicit_n_vocab=VOCAB_SIZE)
