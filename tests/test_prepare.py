import hashlib
import json
import os
import time

import numpy as np
import pytest

from conftest import run_script, send
from prepare import split_tokens, strip_gutenberg
from gulliver.tokenizer import get_tokenizer


def sha(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_exact_gpt2_token_ids():
    enc = get_tokenizer()
    assert enc.encode_ordinary('Hello world') == [15496, 995]
    assert enc.encode_ordinary(' the') == [262]
    assert enc.encode_ordinary("I'm here, isn't it?") == [40, 1101, 994, 11, 2125, 470, 340, 30]
    assert enc.encode('<|endoftext|>', allowed_special='all') == [50256]
    assert enc.n_vocab == 50257
    assert enc.decode([15496, 995]) == 'Hello world'


BODY = 'Chapter 1.\nIt was a dark night.\n'


@pytest.mark.parametrize('raw', [
    f'header\n*** START OF THE PROJECT GUTENBERG EBOOK 829 ***\n\n{BODY}\n*** END OF THE PROJECT GUTENBERG EBOOK 829 ***\nlicence\n',
    f'\ufeffheader\r\n*** START OF THIS PROJECT GUTENBERG EBOOK GULLIVER ***\r\n{BODY.replace(chr(10), chr(13) + chr(10))}*** END OF THIS PROJECT GUTENBERG EBOOK GULLIVER ***\r\nlicence',
])
def test_strip_gutenberg_markers_bom_crlf(raw):
    assert strip_gutenberg(raw) == BODY


def test_strip_gutenberg_without_markers_keeps_whole_text(capsys):
    assert strip_gutenberg('\ufeffplain\r\ntext\n') == 'plain\ntext\n'
    assert 'no Project Gutenberg' in capsys.readouterr().out


def test_interleaved_split_is_deterministic_and_stratified():
    ids = np.arange(10_000, dtype=np.uint16)
    train, val = split_tokens(ids, 'interleaved', 0.1, 100, seed=1)
    train2, val2 = split_tokens(ids, 'interleaved', 0.1, 100, seed=1)
    assert np.array_equal(val, val2) and np.array_equal(train, train2)
    assert len(val) == 1000 and len(train) == 9000
    assert sorted(np.concatenate([train, val]).tolist()) == ids.tolist()
    val_chunks = np.unique(val // 100)
    assert np.array_equal(val_chunks // 10, np.arange(10))  # one val chunk in each group of 10


def test_prepare_on_the_book(book_path, tmp_path):
    result = run_script('prepare.py', f'--source={book_path}', f'--data_dir={tmp_path}')
    assert result.returncode == 0, result.stderr
    meta = json.load(open(tmp_path / 'meta.json'))
    total = meta['train_tokens'] + meta['val_tokens']
    assert abs(total - 143_711) / 143_711 < 0.01
    assert 0.095 <= meta['val_tokens'] / total <= 0.105
    assert f"{meta['train_tokens']:,}" in result.stdout
    # the file as given (this copy holds the marker lines around the book) against the book alone
    whole = open(book_path, 'rb').read().decode('utf-8-sig')
    assert meta['raw_tokens'] == len(get_tokenizer().encode_ordinary(whole)) > total
    assert f"{meta['raw_tokens']:,} tokens as given" in result.stdout
    train = np.fromfile(tmp_path / 'train.bin', dtype=np.uint16)
    assert len(train) == meta['train_tokens']
    assert get_tokenizer().decode(train[:20].tolist()).startswith('GULLIVER’S TRAVELS')
    assert meta['sha256']['train.bin'] == sha(tmp_path / 'train.bin')
    before = {name: sha(tmp_path / name) for name in ('train.bin', 'val.bin', 'meta.json')}
    again = run_script('prepare.py', f'--source={book_path}', f'--data_dir={tmp_path}')
    assert again.returncode == 0
    assert before == {name: sha(tmp_path / name) for name in ('train.bin', 'val.bin', 'meta.json')}


def book_page(text):
    header = 'The Project Gutenberg eBook of Gulliver\'s Travels\r\n' * 50
    return ('\ufeff' + header + text.replace('\n', '\r\n') + 'End of licence\r\n').encode()


def test_download_retries_5xx_then_succeeds(book_path, http_server, tmp_path):
    url, routes, hits = http_server
    page = book_page(open(book_path, encoding='utf-8').read())
    answers = iter([500, 500, 200])

    def flaky(request):
        status = next(answers)
        send(request, status, page if status == 200 else b'busy')

    routes['/pg829.txt'] = flaky
    result = run_script('prepare.py', f'--source={url}/pg829.txt', f'--data_dir={tmp_path}')
    assert result.returncode == 0, result.stderr
    assert hits == ['/pg829.txt'] * 3
    [cached] = os.listdir(tmp_path / 'raw')
    assert cached.endswith('-pg829.txt') and (tmp_path / 'raw' / cached).read_bytes() == page
    meta = json.load(open(tmp_path / 'meta.json'))
    assert abs(meta['total_tokens'] - 143_711) / 143_711 < 0.01
    # the download's header, licence line and CRLF line ends count in raw_tokens, not in the book
    raw_tokens = len(get_tokenizer().encode_ordinary(page.decode('utf-8-sig')))
    assert meta['raw_tokens'] == raw_tokens > meta['total_tokens'] + 500
    # a second run reuses the cached download without touching the network
    again = run_script('prepare.py', f'--source={url}/pg829.txt', f'--data_dir={tmp_path}')
    assert again.returncode == 0 and 'cached' in again.stdout and len(hits) == 3
    # another URL with the same file name is another download, not the cache of the first
    shorter = book_page(open(book_path, encoding='utf-8').read()[:-20_000])
    routes['/mirror/pg829.txt'] = lambda request: send(request, 200, shorter)
    other = run_script('prepare.py', f'--source={url}/mirror/pg829.txt', f'--data_dir={tmp_path}')
    assert other.returncode == 0 and 'cached' not in other.stdout and hits[-1] == '/mirror/pg829.txt'
    assert json.load(open(tmp_path / 'meta.json'))['total_tokens'] < meta['total_tokens']


def slow(request):
    time.sleep(3)
    send(request, 200, b'x' * 200_000)


@pytest.mark.parametrize('route, handler, message', [
    ('/missing.txt', lambda r: send(r, 404, b'not found'), 'HTTP 404'),
    ('/truncated.txt', lambda r: send(r, 200, b'a' * 150_000, length=300_000), 'truncated'),
    ('/page.html', lambda r: send(r, 200, b'<!DOCTYPE html><html>' + b'x' * 200_000, 'text/html'), 'HTML'),
    ('/short.txt', lambda r: send(r, 200, b'too short'), 'too short'),
    ('/slow.txt', slow, 'did not answer'),
])
def test_bad_downloads_leave_good_data_untouched(book_data, http_server, tmp_path, route, handler, message):
    url, routes, _ = http_server
    routes[route] = handler
    data_dir = tmp_path / 'data'
    data_dir.mkdir()
    for name in ('train.bin', 'val.bin', 'meta.json'):
        (data_dir / name).write_bytes(open(os.path.join(book_data, name), 'rb').read())
    before = {name: sha(data_dir / name) for name in ('train.bin', 'val.bin', 'meta.json')}
    result = run_script('prepare.py', f'--source={url}{route}', f'--data_dir={data_dir}', '--timeout=1')
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and 'Traceback' not in result.stderr
    assert before == {name: sha(data_dir / name) for name in ('train.bin', 'val.bin', 'meta.json')}
    assert not (data_dir / 'raw').exists()  # no partial download kept, no empty folder made


def test_no_network_message_says_how_to_run_offline(tmp_path):
    result = run_script('prepare.py', '--source=http://127.0.0.1:9/pg829.txt', f'--data_dir={tmp_path / "d"}')
    assert result.returncode != 0
    assert result.stderr.count('\n') == 1 and '--source=path/to/pg829.txt' in result.stderr
    assert not (tmp_path / 'd').exists()


def test_missing_local_file(tmp_path):
    result = run_script('prepare.py', '--source=/nonexistent/file.txt', f'--data_dir={tmp_path}')
    assert result.returncode != 0 and result.stderr.startswith('error: no such file')
    assert os.listdir(tmp_path) == []
