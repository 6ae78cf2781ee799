"""Publishing files atomically, who owns a file (a process another process can check), and small
file helpers shared by the rest of the store."""
import errno
import json
import os
import re
import secrets
import socket
import stat
import sys
import time
from concurrent.futures import ThreadPoolExecutor

CLAIM_TIMEOUT = 600.0  # seconds without a touch after which a claim (or temporary file) of a process
                       # this machine cannot check counts as dead
READER_TIMEOUT = 86400.0  # seconds after which another machine's private link to a pack counts as left over


class StoreError(Exception):
    """A store that cannot be used as asked; the message says why and what to do."""


class Unreadable(StoreError):
    """A file that exists but cannot be read (permissions, I/O error): not corrupt, never moved."""


class NotRegular(StoreError):
    """Something other than a regular file where the store keeps a file: a folder, a FIFO, a device or a
    symbolic link. Never followed, never waited on."""


class _Vanished(Exception):
    """A run file removed while it was being read (moved aside by another process)."""


class TempRemoved(StoreError):
    """publish's own temporary file was removed before it was put in place: this process was stopped so
    long that another judged it dead and cleaned up after it."""


def note(message):
    """Notes about the store go to stderr: stdout is the report."""
    print(f'store: {message}', file=sys.stderr, flush=True)


_ME = {}


def identity():
    """Who this process is, in terms another process can check: host (for people), boot id (this
    kernel), pid namespace, pid, and the process start time in clock ticks since boot."""
    pid = os.getpid()
    if _ME.get('pid') != pid:  # after a fork, the child is another process
        _ME.clear()
        _ME.update(host=socket.gethostname(), boot=_boot_id(), pidns=_pid_namespace(), pid=pid,
                   start=_start_time(pid))
    return dict(_ME)


def _boot_id():
    try:
        with open('/proc/sys/kernel/random/boot_id') as f:
            return f.read().strip().replace('-', '')
    except OSError:
        return ''  # not Linux: liveness falls back to the heartbeat


def _pid_namespace():
    """The pid namespace's number, then the time namespace's: a process start time read from /proc is
    shifted by the reader's time namespace (unshare --time --boottime), so it is compared only within one."""
    ids = ''
    for kind in ('pid', 'time'):
        try:
            ids += re.sub(r'\D', '', os.readlink(f'/proc/self/ns/{kind}'))
        except OSError:
            if kind == 'pid':
                return ''
    return ids


def _start_time(pid):
    """Start time of process `pid` (clock ticks since boot), None if there is no such process here."""
    try:
        with open(f'/proc/{int(pid)}/stat') as f:
            fields = f.read().rpartition(')')[2].split()  # the name in (...) may hold spaces
        return int(fields[19])  # field 22 of proc(5); fields[0] is field 3
    except (OSError, ValueError, IndexError):
        return None


def owner_alive(owner, mtime, now=None):
    """Whether the process described by `owner` (a dict from identity()) still runs. It can be checked
    exactly only from the same kernel, pid and time namespace, and only where /proc shows the process
    (not under hidepid=2 for another user's); otherwise the file's heartbeat (mtime) decides, against
    `now` (seconds; the store's own file system clock where the caller has it)."""
    me = identity()
    if me['boot'] and me['pidns'] and owner.get('boot') == me['boot'] and owner.get('pidns') == me['pidns'] \
            and _is_int(owner.get('pid')) and _is_int(owner.get('start')):
        start = _start_time(owner['pid'])
        if start is not None:
            return start == owner['start']
        if not _pid_exists(owner['pid']):
            return False
    return (time.time() if now is None else now) - mtime < CLAIM_TIMEOUT


def _pid_exists(pid):
    """Whether some process has this pid here (True where that cannot be told)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError, OverflowError):
        return True
    return True


def _tag():
    """A name part unique to this process and call, from which owner_alive can be checked."""
    me = identity()
    return f'{me["boot"] or "x"}.{me["pidns"] or "x"}.{me["pid"]}.{me["start"] or "x"}.{secrets.token_hex(4)}'


TAG = r'[0-9a-fx]+\.[0-9x]+\.\d+\.[0-9x]+\.[0-9a-f]{8}'  # what _tag writes, as a regular expression

# The names of the store's own temporary files and private links: NAME.tmp-TAG, NAME.reader-TAG. Only these
# (and run files, claims, markers, records) are ever removed or moved.
OWN_TEMP = re.compile(r'.+\.(tmp|reader)-' + TAG)


def check_folder(path):
    """Raise StoreError if `path` (a folder of the store) is a symbolic link or not a folder: a store
    follows nothing out of itself. A missing folder is fine (it is made)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise StoreError(f'{path} is a symbolic link (to {os.readlink(path)}), expected a folder: a store follows no '
                         'link out of itself, so that it never moves or removes anything elsewhere. Replace the link '
                         'by a folder holding its files, or use another --out.')
    if not stat.S_ISDIR(mode):
        raise StoreError(f'{path} is {_kind(mode)} where the '
                         'store keeps a folder: move it away and rerun.')


def _tag_owner(tag):
    parts = tag.split('.')
    if len(parts) != 5 or not parts[2].isdigit():
        return {}  # another format (an earlier version's): judged by age
    return dict(boot=parts[0], pidns=parts[1], pid=int(parts[2]), start=int(parts[3]) if parts[3].isdigit() else None)


class SyncBehind:
    """A file written sequentially and synced behind the writing: every EVERY bytes written, the disk is
    given what is written so far in another thread (fdatasync releases the GIL), so that the final sync
    finds little left to write. An error of a sync behind is raised by finish()."""
    EVERY = 64 << 20

    def __init__(self, f):
        self.f, self.since, self.job = f, 0, None
        self.pool = ThreadPoolExecutor(1)

    def write(self, data):
        self.f.write(data)
        self.since += memoryview(data).nbytes
        if self.since >= self.EVERY and (self.job is None or self.job.done()):
            self.f.flush()
            self.job, self.since = self.pool.submit(os.fdatasync, self.f.fileno()), 0

    def finish(self):
        """Everything written made durable (fsync), the thread ended."""
        try:
            if self.job is not None:
                self.job.result()
            self.f.flush()
            os.fsync(self.f.fileno())
        finally:
            self.close()

    def close(self):
        self.pool.shutdown(wait=True)  # no sync outlives the file

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def fsync_dir(folder):
    """Make a rename or link in `folder` durable."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder (EINVAL); the rename itself stands
    finally:
        os.close(fd)


def publish(path, data, exclusive=False, durable=True, check=None, new_store=False):
    """Write `data` (bytes, or a function writing to a binary file) through a temporary file in the same
    folder, then rename it into place: readers see all or nothing. exclusive: hard-link instead, which
    fails with FileExistsError if `path` exists. durable: sync the file and the folder, so that the
    file survives a crash of the machine (claims need not: after a crash they are stale anyway).
    check: called once the file is written, right before it is put in place; if False, nothing is
    published and publish returns False (else True). new_store: the file is part of a store being created,
    which holds no run yet (an error's advice then says nothing of stored runs)."""
    tmp = f'{path}.tmp-{_tag()}'
    try:
        with open(tmp, 'xb') as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                data(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if check is not None and not check():
            return False
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
        if durable:
            fsync_dir(os.path.dirname(path) or '.')
        return True
    except FileExistsError:
        raise  # exclusive, and `path` exists
    except FileNotFoundError as e:
        if not os.path.lexists(tmp) and os.path.isdir(os.path.dirname(path) or '.'):
            raise TempRemoved(f'{tmp} was removed before it was put in place') from e
        raise StoreError(f'could not write {path} ({_why(e)}). {_write_advice(e, new_store=new_store)}') from e
    except OSError as e:
        raise StoreError(f'could not write {path} ({_why(e)}). {_write_advice(e, path, new_store)}') from e
    finally:
        _remove(tmp)


def _why(e):
    return e.strerror or str(e)


def _disk_full(path):
    """True if the file system of `path` has no block left for this user (numpy's short write has no errno)."""
    try:
        return os.statvfs(os.path.dirname(path) or '.').f_bavail == 0
    except OSError:
        return False


def _write_advice(e, path=None, new_store=False):
    """What to do about a failed write. new_store: the store is being created and holds no run, so the
    advice does not say that its runs are intact."""
    intact = '' if new_store else '; stored runs are intact'
    if e.errno == errno.ENOSPC and _out_of_inodes(e.filename):
        return ('No inode is left on that file system (`df -i` shows 100%), whatever space is free: remove '
                f'files there and rerun the same command{intact}.')
    if e.errno == errno.ENOSPC or (e.errno is None and path is not None and _disk_full(path)):
        return f'The disk is full: free space and rerun the same command{intact}.'
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return 'The store is not writable here: a trainer needs write access to its folder (viz.py does not).'
    if new_store:
        return 'Fix the folder and rerun the same command.'
    return 'Stored runs are intact; fix the folder and rerun the same command to continue.'


def _out_of_inodes(path):
    """Whether the file system holding `path` (a file that could not be made) has no inode left."""
    try:
        fs = os.statvfs(os.path.dirname(os.fsdecode(path)) or '.')
    except (OSError, TypeError, ValueError):
        return False
    return fs.f_files > 0 and fs.f_favail == 0


def open_file(path):
    """Open a file of the store for binary reading. Never follows a symbolic link (nothing outside the
    store is read) and never waits on a FIFO; raises NotRegular naming what is there instead of a file."""
    try:
        f = open(path, 'rb', opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW | os.O_NONBLOCK))
    except IsADirectoryError:
        raise NotRegular(f'{path} is a folder, expected a file') from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotRegular(f'{path} is a symbolic link, expected a file (a store follows no link)') from None
        raise
    mode = os.fstat(f.fileno()).st_mode
    if not stat.S_ISREG(mode):
        f.close()
        raise NotRegular(f'{path} is {_kind(mode)}, expected a file')
    return f


def _kind(mode):
    return 'a file' if stat.S_ISREG(mode) else 'a folder' if stat.S_ISDIR(mode) else \
        'a FIFO' if stat.S_ISFIFO(mode) else \
        'a socket' if stat.S_ISSOCK(mode) else 'a device' if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else \
        'a symbolic link' if stat.S_ISLNK(mode) else 'not a regular file'


def _read_bytes(path, limit=1 << 20):
    """The bytes of a small file (at most `limit`), None if it does not exist."""
    try:
        with open_file(path) as f:
            return f.read(limit)
    except FileNotFoundError:
        return None


def _mtime(path):
    try:
        return os.stat(path).st_mtime
    except OSError:
        return time.time()


def parse_json(text):
    """(value, None) for valid JSON text, else (None, why it is not), deep nesting included."""
    try:
        return json.loads(text), None
    except RecursionError:
        return None, 'nested too deep'
    except ValueError as e:
        return None, str(e)


def _read_json(path, limit=-1):
    """A JSON file written by the store, None if absent, unreadable or not JSON (nested too deep included)."""
    try:
        return json.loads(_read_bytes(path, limit) or b'')
    except (OSError, ValueError, RecursionError, StoreError):
        return None


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass  # a read-only folder: nothing can be cleaned, and nothing needs to be for reading


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _short(value, width=120):
    text = json.dumps(value)
    return text if len(text) <= width else text[:width] + '...'
