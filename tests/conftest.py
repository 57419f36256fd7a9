import gc
import http.server
import io
import os
import runpy
import signal
import subprocess
import sys
import threading
import traceback
import warnings
from contextlib import redirect_stderr, redirect_stdout

import pytest

# The tests' models are tiny and `make test` runs one worker per core (pytest -n auto): one
# thread per process, so that the workers and the scripts they start don't fight over cores.
os.environ.setdefault('OMP_NUM_THREADS', '1')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOOK = os.path.join(ROOT, '..', 'shared', 'data', 'gulliver-829-0.txt')
sys.path.insert(0, ROOT)


def run_script(*args, cwd=ROOT, timeout=120, env=None):
    """Run a project script in a subprocess; return the CompletedProcess (text mode). Every script
    the tests run is tiny: seconds of work, so the default timeout is a generous multiple of it."""
    full_env = dict(os.environ, PYTHONUNBUFFERED='1', **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def run_in_process(*args, cwd=ROOT):
    """Run a project script in this process, as `python script args` would, and return a
    CompletedProcess: for the error paths, which end long before a subprocess would have
    finished importing torch. Python's own rules give the exit status and stderr: SystemExit(str)
    prints the string and exits 1, any other exception prints a traceback, a warning prints its
    line. Signal handlers and the working directory are restored afterwards."""
    script, *argv = args
    stdout, stderr = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    saved_signals = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    sys.argv = [script, *argv]
    os.chdir(cwd)
    gc.freeze()  # what exists now is not the run's: the collection below walks the run's objects alone
    code = 0
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('default')
            try:
                runpy.run_path(os.path.join(cwd, script), run_name='__main__')
            except SystemExit as e:
                code = e.code
            except BaseException:
                traceback.print_exc()
                code = 1
            for w in caught:
                stderr.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno))
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        for signum, handler in saved_signals.items():
            signal.signal(signum, handler)
        # a script that exited early leaves its open files to the collector: close them now, quietly,
        # as the exit of a process would, not in the middle of another run's captured stderr
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', ResourceWarning)
            gc.collect()
        gc.unfreeze()
    if code is None:
        code = 0
    elif not isinstance(code, int):
        stderr.write(f'{code}\n')
        code = 1
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def write_token_data(folder, train, val, vocab_size=50257):
    """A data_dir as prepare.py writes it, from two arrays of token ids: train.bin, val.bin and a
    meta.json with their counts, UTF-8 byte counts and sha256."""
    import hashlib
    import json

    import numpy as np

    from gulliver.tokenizer import get_tokenizer
    os.makedirs(folder, exist_ok=True)
    meta = {'vocab_size': vocab_size, 'sha256': {}}
    for split, tokens in (('train', train), ('val', val)):
        data = np.asarray(tokens, dtype=np.uint16).tobytes()
        with open(os.path.join(folder, f'{split}.bin'), 'wb') as f:
            f.write(data)
        meta[f'{split}_tokens'] = len(tokens)
        meta[f'{split}_bytes'] = len(get_tokenizer().decode_bytes([int(t) for t in tokens]))
        meta['sha256'][f'{split}.bin'] = hashlib.sha256(data).hexdigest()
    with open(os.path.join(folder, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return meta


def absent(what):
    """Skip a test whose input is absent here; under CI (CI=true), where everything must be present, fail it."""
    if os.environ.get('CI') == 'true':
        pytest.fail(f'{what} is absent, and CI must run every test')
    pytest.skip(f'{what} is absent')


def require(module):
    """The module, or absent(): transformers, the reference implementation, is a test requirement."""
    try:
        return __import__(module)
    except ImportError:
        absent(f'the package {module}')


@pytest.fixture(scope='session')
def book_path():
    if not os.path.exists(BOOK):
        absent(f'the local copy of the book ({BOOK})')
    return os.path.abspath(BOOK)


@pytest.fixture(scope='session')
def book_data(book_path, tmp_path_factory):
    """data_dir with train.bin/val.bin/meta.json prepared from the local book (tail split)."""
    data_dir = tmp_path_factory.mktemp('gulliver')
    result = run_in_process('prepare.py', f'--source={book_path}', f'--data_dir={data_dir}')
    assert result.returncode == 0, result.stderr
    return str(data_dir)


@pytest.fixture
def http_server():
    """A server on 127.0.0.1 answering from `routes`: path -> handler(request). Yields (url, routes, hits)."""
    routes, hits = {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            routes[self.path](self)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{server.server_address[1]}', routes, hits
    server.shutdown()
    server.server_close()


def send(request, status, body, content_type='text/plain; charset=utf-8', length=None):
    request.send_response(status)
    request.send_header('Content-Type', content_type)
    request.send_header('Content-Length', str(len(body) if length is None else length))
    request.end_headers()
    request.wfile.write(body)


def pytest_collection_modifyitems(items):
    """The slowest tests (the GPU check, the README's commands, the training runs) first on both
    workers: pytest -n gives each worker a contiguous half of the list, so the slow tests are dealt
    out alternately to the heads of the two halves, and the rest keep their modules together (a
    module's fixtures are built once per worker that runs its tests); a worker that runs out takes
    tests from the end of the other's queue."""
    slow_modules = ('test_gpu_check.py', 'test_readme.py', 'test_train.py')
    slow = [item for name in slow_modules for item in items if item.path.name == name]
    rest = [item for item in items if item.path.name not in slow_modules]
    first_half = slow[0::2] + rest[:max(0, len(items) // 2 - len(slow[0::2]))]
    items[:] = first_half + slow[1::2] + rest[len(first_half) - len(slow[0::2]):]
