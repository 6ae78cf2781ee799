"""Claims of runs in progress: a run is trained once, and a dead worker's claim is taken over by one."""
import hashlib
import json
import os
import re
import secrets
import time

from store.files import (CLAIM_TIMEOUT, NotRegular, StoreError, TempRemoved, _mtime, _read_bytes, _remove, _tag,
                         _why, _write_advice, identity, note, owner_alive, publish)

CLAIM_REFRESH = 60.0   # seconds between a worker's touches of its claim
CLOCK_REFRESH = 30.0   # seconds between reads of the store's clock
CLOCK_SLACK = 60.0     # seconds a heartbeat may lie ahead of the store's clock (its rounding, a probe's age)

CLAIM_NAME = re.compile(r'([a-z]+)-(\d{6})')  # arm-run
TAKEOVER = re.compile(r'[a-z]+-\d{6}\.takeover-[0-9a-f]{16}-\d+')  # a claim's takeover marker


class Claims:
    """The claims part of Store (claims/ of the store at self.path)."""

    def _claim_path(self, arm, run):
        return os.path.join(self.path, 'claims', f'{arm}-{run:06d}')

    def claim(self, arm, run):
        """Take (arm, run) for this process; False if a live worker has it."""
        path = self._claim_path(arm, run)
        mine = json.dumps(dict(identity(), token=secrets.token_hex(8), time=time.time())).encode()
        for _ in range(3):
            try:
                self._link_new(path, mine)
                self._mine[path] = mine
                return True
            except FileExistsError:
                pass
            except TempRemoved:
                note(f'{arm} run {run}: this worker was stopped or slow while claiming it and was taken for '
                     'dead; the run is left to the other workers')
                return False
            try:
                held = _read_bytes(path)
            except NotRegular as e:
                raise StoreError(f'{e}: not a claim. Remove it; until then run {run} of {arm} cannot be '
                                 'trained.') from None
            if held is None:
                continue  # released meanwhile: try again
            if self._claim_alive(held, path):
                return False
            if self._swap(path, held, mine):  # a dead worker's claim: take the run over
                self._mine[path] = mine
                return True
            return False
        return False

    def release(self, arm, run):
        """Give up this process's claim of (arm, run); another's claim is left alone."""
        path = self._claim_path(arm, run)
        mine = self._mine.pop(path, None)
        if mine is not None and self._read_claim(path) == mine:
            try:
                self._swap(path, mine, None)
            except StoreError:  # no space or no inode for the marker: the claim is this process's own
                if self._read_claim(path) == mine:
                    _remove(path)

    def holds(self, arm, run):
        """Whether this process claimed (arm, run) and the claim is still its own (not taken over while
        this process was stopped or slow)."""
        path = self._claim_path(arm, run)
        return path in self._mine and self._read_claim(path) == self._mine[path]

    def _read_claim(self, path):
        """The bytes of a claim; None if absent or not a claim file."""
        try:
            return _read_bytes(path)
        except (OSError, StoreError):
            return None

    def touch_claims(self, claims):
        """The heartbeat: refresh the mtime of this process's claims."""
        for arm, run in list(claims):
            path = self._claim_path(arm, run)
            mine = self._mine.get(path)
            if mine is not None and self._read_claim(path) == mine:
                try:
                    os.utime(path)
                except OSError:
                    pass

    def in_progress(self):
        """Runs being trained now by live workers."""
        count = 0
        for name in self._names('claims'):
            path = os.path.join(self._folder('claims'), name)
            if CLAIM_NAME.fullmatch(name):
                held = self._read_claim(path)
                count += held is not None and self._claim_alive(held, path)
        return count

    def _claim_alive(self, held, path):
        """Whether the claim `held` at `path` belongs to a live worker. Its heartbeat is compared with the
        store's own clock (a probe file's mtime: on NFS the server's), never with this host's. A heartbeat
        that does not advance is trusted for CLAIM_TIMEOUT of observing it, then no more: a heartbeat in
        the future (another clock) can neither keep a dead worker's claim for ever nor lose a live one."""
        try:
            owner = json.loads(held)
        except (ValueError, RecursionError):
            owner = None
        mtime, now = _mtime(path), self._store_now()
        if mtime > now + CLOCK_SLACK:
            try:  # suspect: brought back to now, so that a dead worker's claim goes stale like any other
                os.utime(path, (now, now))  # a live worker's next touch (the store's clock) moves it on
                mtime = now
            except OSError:
                pass  # another user's claim: observed below until it has not changed for CLAIM_TIMEOUT
        if not owner_alive(owner if isinstance(owner, dict) else {}, mtime, now):
            return False
        seen = self.__dict__.setdefault('_heartbeats', {})
        first = seen.get(path)
        if first is None or first[0] != (held, mtime):
            seen[path] = ((held, mtime), now)
            return True
        return now - first[1] < CLAIM_TIMEOUT

    def _store_now(self):
        """The store's file system clock, seconds: the mtime of a probe file just written in claims/
        (read again at most every CLOCK_REFRESH seconds of this host's clock, kept as an offset)."""
        offset, when = self.__dict__.get('_clock', (None, None))
        if offset is None or abs(time.monotonic() - when) > CLOCK_REFRESH:
            probe = os.path.join(self.path, 'claims', f'clock.tmp-{_tag()}')
            try:
                with open(probe, 'x'):
                    pass
                offset = os.stat(probe).st_mtime - time.time()
            except OSError:
                offset = 0.0  # no space or a read-only store: this host's clock is all there is
            finally:
                _remove(probe)
            self._clock = (offset, time.monotonic())
        return time.time() + offset

    def _link_new(self, path, data):
        """Make `path` hold `data`, atomically and only if it does not exist (FileExistsError)."""
        try:
            publish(path, data, exclusive=True, durable=False)
        except TempRemoved:
            raise
        except StoreError as e:
            raise StoreError(f'could not claim a run: {e}') from e.__cause__

    def _swap(self, path, held, replacement):
        """Replace the claim at `path` by `replacement` (None: remove it), provided it still holds `held`.
        Only the process that creates the marker `path.takeover-HASH-G` may move the claim off `held`;
        generation G+1 is tried only when the marker of generation G belongs to a dead process. The
        winner checks that the claim still holds `held`, then renames its marker over the claim (or
        removes the claim): there is no moment without a claim, and no two winners."""
        key = hashlib.sha256(held).hexdigest()[:16]
        me = json.dumps(dict(identity(), token=secrets.token_hex(8), time=time.time())).encode()
        marker_content = replacement if replacement is not None else me
        for gen in range(8):
            marker = f'{path}.takeover-{key}-{gen}'
            try:
                self._link_new(marker, marker_content)
            except TempRemoved:
                return False  # this process was taken for dead meanwhile: it moves nothing
            except FileExistsError:
                other = _read_bytes(marker)
                if other is None or self._claim_alive(other, marker):
                    return False  # a live process is moving this claim, or has moved it
                continue  # that process died: the next generation
            try:
                if _read_bytes(path) != held:
                    _remove(marker)
                    return False  # the claim moved on meanwhile
                if replacement is None:
                    os.remove(path)
                    _remove(marker)
                else:
                    os.replace(marker, path)
            except OSError as e:
                _remove(marker)
                raise StoreError(f'could not update the claim {path} ({_why(e)}). {_write_advice(e)}') from e
            for lower in range(gen):
                _remove(f'{path}.takeover-{key}-{lower}')
            return True
        return False
