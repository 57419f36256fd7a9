"""
One careful HTTP download, shared by prepare.py (the book) and gulliver/pretrained.py (GPT-2 weights).

A timeout on every request; retries with exponential backoff on connection errors and on
5xx answers, done by urllib3's Retry on the session's adapter; the body is streamed to a
temporary file beside the destination and moved into place with os.replace only once it
is complete, so a failed or interrupted download never leaves a partial file behind.
"""
import os
import tempfile

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from gulliver.atomic import move_into_place


class DownloadError(Exception):
    """A download that failed; the message is one line, fit to show a user."""


def http_session(retries=3, backoff=0.5):
    # waits backoff * 2**(n-1) seconds before the n-th retry
    retry = Retry(total=retries, connect=retries, read=0, status=retries, backoff_factor=backoff,
                  status_forcelist=(500, 502, 503, 504), allowed_methods=('GET', 'HEAD'),
                  raise_on_status=False)
    session = requests.Session()
    session.mount('http://', HTTPAdapter(max_retries=retry))
    session.mount('https://', HTTPAdapter(max_retries=retry))
    return session


def download(url, path, timeout=30, retries=3, backoff=0.5, chunk_bytes=1 << 20, check=None):
    """Fetch url into path atomically. check(tmp_path), if given,
    reads the complete file before it is moved into place and raises ValueError if it is not
    what was asked for. Raises DownloadError."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix='.download-', suffix='.part')
    try:
        with os.fdopen(fd, 'wb') as f, http_session(retries, backoff) as session:
            try:
                response = session.get(url, stream=True, timeout=timeout)
                if response.status_code != 200:
                    raise DownloadError(f"{url} answered HTTP {response.status_code} {response.reason}")
                received = 0
                for chunk in response.iter_content(chunk_bytes):
                    f.write(chunk)
                    received += len(chunk)
            except requests.exceptions.ChunkedEncodingError:
                raise DownloadError(f"{url}: the connection closed before the whole body arrived (truncated)")
            except requests.exceptions.RequestException as e:
                # urllib3 reports a read timeout as the reason of a ConnectionError
                if isinstance(e, requests.exceptions.Timeout) or 'timed out' in str(e):
                    raise DownloadError(f"{url} did not answer within {timeout} s")
                raise DownloadError(f"cannot reach {url} ({type(e).__name__})")
            expected = response.headers.get('Content-Length')
            if (expected is not None and 'Content-Encoding' not in response.headers
                    and received < int(expected)):
                raise DownloadError(f"{url}: got {received} of {expected} bytes (truncated)")
        if check is not None:
            try:
                check(tmp_path)
            except ValueError as e:
                raise DownloadError(f"{url} sent a file that cannot be read ({e})")
        move_into_place(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
