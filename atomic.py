"""
Writing files so that a crash, a kill or Ctrl-C never leaves a half-written file where a good
one was: each file is written to a temporary name in the same folder, and only when all of
them are complete does os.replace (atomic on POSIX) move them into place.
"""
import os
import tempfile


def move_into_place(tmp, path):
    """Give a mkstemp file (mode 0600) the usual mode for new files, then rename it to path."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


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
            move_into_place(tmp, path)
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
