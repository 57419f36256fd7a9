"""
Writing files so that a crash, a kill or Ctrl-C never leaves a half-written file where a good
one was: each file is written to a temporary name in the same folder, and only when all of
them are complete does os.replace (atomic on POSIX) move them into place.
"""
import os
import tempfile


def write_atomic(files):
    """files: {path: bytes, or a function that writes the file at the path it is given}."""
    temps = {}
    try:
        for path, content in files.items():
            fd, temps[path] = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix='.tmp-',
                                               suffix=os.path.splitext(path)[1])  # savez, savefig read it
            with os.fdopen(fd, 'wb') as f:
                if isinstance(content, bytes):
                    f.write(content)
            if not isinstance(content, bytes):
                content(temps[path])
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
