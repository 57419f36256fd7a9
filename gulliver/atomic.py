"""
Writing files so that a crash, a kill, a full disk or Ctrl-C never leaves a half-written file
where a good one was: each file is written to a temporary name in the same folder and flushed
to the disk (fsync), and only when all of them are complete does os.replace (atomic on POSIX)
move them into place; the folder is synced after the rename, so that the new name survives a
power cut too. A writer killed mid-write leaves a .tmp- file: remove_orphans clears them.
"""
import os
import tempfile

PREFIX = '.tmp-'


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_orphans(folder):
    """Delete the temporary files that a killed writer left in folder."""
    orphans = ([name for name in os.listdir(folder) if name.startswith(PREFIX)]
               if os.path.isdir(folder) else [])
    for name in orphans:
        os.remove(os.path.join(folder, name))


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
            fd, temps[path] = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=PREFIX,
                                               suffix=os.path.splitext(path)[1])  # savez, savefig read it
            with os.fdopen(fd, 'wb') as f:
                if isinstance(content, bytes):
                    f.write(content)
            if not isinstance(content, bytes):
                content(temps[path])
            fsync_path(temps[path])
        for path, tmp in temps.items():
            move_into_place(tmp, path)
        for folder in {os.path.dirname(os.path.abspath(path)) for path in temps}:
            fsync_path(folder)
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
