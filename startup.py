"""What a script does before its heavy imports (torch, scipy: most of a second or more)."""
import os
import signal


def ctrl_c_is_one_line(name=''):
    """Until the script sets its own handler, Ctrl-C ends the process with one line (exit 130), not the
    traceback of an interrupted import; name: the line's prefix (e.g. 'viz')."""
    line = f'\n{name + ": " if name else ""}interrupted while starting; nothing was written.\n'.encode()

    def interrupted(signum, frame):
        os.write(2, line)
        os._exit(130)
    signal.signal(signal.SIGINT, interrupted)
