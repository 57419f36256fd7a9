"""
Download Gulliver's Travels (Project Gutenberg eBook #829), strip the Gutenberg header and
licence, tokenize it with the GPT-2 BPE and write train.bin / val.bin (uint16 token ids)
and meta.json into data_dir.

    $ python prepare.py                                    # download from gutenberg.org
    $ python prepare.py --source=path/to/pg829.txt         # offline, from a local copy
    $ python prepare.py --split=interleaved                # val = one chunk in every k
"""
import hashlib
import json
import os
import re
import sys
from urllib.parse import urlparse

import numpy as np

from gulliver.atomic import write_atomic
from gulliver.configurator import a_seed, at_least, check, configure, number, one_of
from gulliver.download import DownloadError, download
from gulliver.tokenizer import EOT_TOKEN, RANKS_SHA256, VOCAB_SIZE, get_tokenizer

# -----------------------------------------------------------------------------
source = 'https://www.gutenberg.org/cache/epub/829/pg829.txt'  # URL or local path
data_dir = 'data/gulliver'
val_fraction = 0.1
split = 'tail'        # 'tail': the last val_fraction of the book; 'interleaved': one chunk in every k
chunk_tokens = 1024   # chunk size for split='interleaved'
force = False         # download again even if data_dir/raw/ holds the file
timeout = 30          # seconds per HTTP request
seed = 1337           # which chunk of each group becomes val, for split='interleaved'
# -----------------------------------------------------------------------------

MIN_DOWNLOAD_BYTES = 100_000
START_MARKER = re.compile(r'^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG EBOOK.*\*\*\*[ \t]*$',
                          re.MULTILINE | re.IGNORECASE)
END_MARKER = re.compile(r'^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG EBOOK.*\*\*\*[ \t]*$',
                        re.MULTILINE | re.IGNORECASE)


def is_url(path):
    return urlparse(path).scheme in ('http', 'https')


def fetch_raw(source, data_dir, force, timeout):
    """Return the raw bytes of the book, from a local file or a (cached) download."""
    if not is_url(source):
        if not os.path.isfile(source):
            raise ValueError(f"no such file: {source}; pass --source=path/to/pg829.txt or a URL")
        try:
            with open(source, 'rb') as f:
                return f.read()
        except OSError as e:
            raise ValueError(f"cannot read {source} ({e.strerror}); pass a --source you can read")
    # the cache is keyed by the whole URL: another URL with the same file name is another download
    name = os.path.basename(urlparse(source).path) or 'book.txt'
    raw_path = os.path.join(data_dir, 'raw', f"{hashlib.sha256(source.encode()).hexdigest()[:12]}-{name}")
    if os.path.exists(raw_path) and not force:
        print(f"using the cached download {raw_path} (--force=True downloads again)")
    else:
        print(f"downloading {source} ...")
        try:
            download(source, raw_path + '.new', timeout=timeout)
        except DownloadError as e:
            raise ValueError(f"{e}; to run offline, pass --source=path/to/pg829.txt")
        with open(raw_path + '.new', 'rb') as f:
            body = f.read()
        try:
            check_text(body, source)
            if len(body) < MIN_DOWNLOAD_BYTES:
                raise ValueError(f"{source} sent only {len(body)} bytes, too short to be the book; "
                                 f"check the URL or pass --source=path/to/pg829.txt")
        except ValueError:
            os.remove(raw_path + '.new')
            raise
        os.replace(raw_path + '.new', raw_path)
    with open(raw_path, 'rb') as f:
        return f.read()


def check_text(raw, name):
    """Reject what is not a plain-text book: empty, binary, or an HTML page."""
    if not raw.strip():
        raise ValueError(f"{name} is empty; pass the plain-text book (pg829.txt)")
    try:
        text = raw.decode('utf-8-sig')
    except UnicodeDecodeError:
        raise ValueError(f"{name} is not UTF-8 text (binary?); pass the plain-text book (pg829.txt)")
    if '\x00' in text:
        raise ValueError(f"{name} contains NUL bytes (binary?); pass the plain-text book (pg829.txt)")
    if re.match(r'\s*(<!doctype html|<html)', text[:1000], re.IGNORECASE):
        raise ValueError(f"{name} is an HTML page, not plain text; use the .txt URL or a local .txt file")
    return text


def strip_gutenberg(text):
    """Drop a BOM, normalise line ends, keep only the text between the Gutenberg markers."""
    text = text.lstrip('\ufeff').replace('\r\n', '\n').replace('\r', '\n')
    start, end = START_MARKER.search(text), END_MARKER.search(text)
    if start is None or end is None or end.start() < start.end():
        print("note: no Project Gutenberg START/END markers found; using the whole text")
        return text
    return text[start.end():end.start()].strip('\n') + '\n'


def split_tokens(ids, split, val_fraction, chunk_tokens, seed):
    """Return (train_ids, val_ids) as described by the `split` setting."""
    if split == 'tail':
        n_val = round(len(ids) * val_fraction)
        return ids[:len(ids) - n_val], ids[len(ids) - n_val:]
    # interleaved: in every group of k consecutive chunks, one (drawn with the seed) is val
    k = round(1 / val_fraction)
    n_chunks = -(-len(ids) // chunk_tokens)
    rng = np.random.default_rng(seed)
    is_val = np.zeros(n_chunks, dtype=bool)
    for group_start in range(0, n_chunks, k):
        is_val[group_start + rng.integers(min(k, n_chunks - group_start))] = True
    chunks = [ids[i * chunk_tokens:(i + 1) * chunk_tokens] for i in range(n_chunks)]
    train = np.concatenate([c for c, v in zip(chunks, is_val) if not v])
    val = np.concatenate([c for c, v in zip(chunks, is_val) if v])
    return train, val


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def main():
    raw = fetch_raw(source, data_dir, force, timeout)
    whole = check_text(raw, source)
    text = strip_gutenberg(whole)
    ids = np.array(get_tokenizer().encode_ordinary(text), dtype=np.uint16)
    if split == 'interleaved' and len(ids) < 2 * chunk_tokens * round(1 / val_fraction):
        raise ValueError(f"the text has {len(ids):,} tokens: too few for chunks of {chunk_tokens} with one "
                         f"in every {round(1 / val_fraction)} val; lower --chunk_tokens")
    train_ids, val_ids = split_tokens(ids, split, val_fraction, chunk_tokens, seed)
    if len(val_ids) < 2 or len(train_ids) < 2:
        raise ValueError(f"{source} has only {len(ids)} tokens, too few to split; pass a longer text")
    train_bytes, val_bytes = train_ids.tobytes(), val_ids.tobytes()
    encoding = get_tokenizer()
    meta = {
        'vocab_size': VOCAB_SIZE, 'eot_token': EOT_TOKEN, 'dtype': 'uint16',
        'train_tokens': len(train_ids), 'val_tokens': len(val_ids), 'total_tokens': len(ids),
        # the file as given, Gutenberg header and licence too
        'raw_tokens': len(encoding.encode_ordinary(whole)),
        # UTF-8 bytes of text per split, for losses in bits per byte (data.bits_per_byte)
        'train_bytes': len(encoding.decode_bytes(train_ids.tolist())),
        'val_bytes': len(encoding.decode_bytes(val_ids.tolist())),
        'split': split, 'val_fraction': val_fraction,
        'chunk_tokens': chunk_tokens if split == 'interleaved' else None,
        'seed': seed if split == 'interleaved' else None, 'source': source,
        'sha256': {'raw': sha256(raw), 'cleaned_text': sha256(text.encode()),
                   'train.bin': sha256(train_bytes), 'val.bin': sha256(val_bytes), 'tokenizer': RANKS_SHA256},
    }
    os.makedirs(data_dir, exist_ok=True)
    write_atomic({os.path.join(data_dir, 'train.bin'): train_bytes,
                  os.path.join(data_dir, 'val.bin'): val_bytes,
                  os.path.join(data_dir, 'meta.json'): (json.dumps(meta, indent=2) + '\n').encode()})
    print(f"{len(whole):,} characters, {meta['raw_tokens']:,} tokens as given; without the Gutenberg "
          f"header and licence {len(text):,} characters -> {len(ids):,} tokens: train {len(train_ids):,}, "
          f"val {len(val_ids):,} ({len(val_ids) / len(ids):.1%}, split={split})")
    print(f"wrote {data_dir}/train.bin, val.bin, meta.json")


if __name__ == '__main__':
    configure(globals())
    check(globals(), {
        'split': one_of('tail', 'interleaved'),
        'val_fraction': lambda f: None if number(f) and 0 < f < 0.5 else "in (0, 0.5)",
        'seed': a_seed,
        # split='interleaved' makes one chunk in every k val
        ('val_fraction', 'split'): lambda f, s: None if s == 'tail' or abs(1 / round(1 / f) - f) <= 1e-3
        else "1/k with split='interleaved' (0.1, 0.125, 0.2, 0.25, 0.333)",
        'chunk_tokens': at_least(1), 'timeout': at_least(1), 'force': one_of(True, False),
    })
    new_dirs = [d for d in (os.path.join(data_dir, 'raw'), data_dir) if not os.path.exists(d)]
    try:
        main()
    except (ValueError, OSError, KeyboardInterrupt) as e:
        for d in new_dirs:  # leave no empty folders behind a failed run
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
        if isinstance(e, KeyboardInterrupt):
            sys.exit("interrupted; nothing was written")
        sys.exit(f"error: {e}" if isinstance(e, ValueError) else
                 f"error: cannot write to data_dir {data_dir!r} ({e.strerror}); "
                 f"pass a --data_dir you can write to")
