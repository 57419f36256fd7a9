import http.server
import os
import subprocess
import sys
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOOK = os.path.join(ROOT, '..', 'shared', 'data', 'gulliver-829-0.txt')
sys.path.insert(0, ROOT)


def run_script(*args, cwd=ROOT, timeout=300, env=None):
    """Run a project script in a subprocess; return the CompletedProcess (text mode)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED='1', **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


@pytest.fixture(scope='session')
def book_path():
    if not os.path.exists(BOOK):
        pytest.skip(f'the local copy of the book is absent ({BOOK})')
    return os.path.abspath(BOOK)


@pytest.fixture(scope='session')
def book_data(book_path, tmp_path_factory):
    """data_dir with train.bin/val.bin/meta.json prepared from the local book (tail split)."""
    data_dir = tmp_path_factory.mktemp('gulliver')
    result = run_script('prepare.py', f'--source={book_path}', f'--data_dir={data_dir}')
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
    thread = threading.Thread(target=server.serve_forever, daemon=True)
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
