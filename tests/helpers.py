"""What several test files share: running a script's main() as the command line does, one torch thread for
tiny models, a stand-in for common.StopSignal that 'receives' SIGTERM mid-epoch, and a kill -9 of a script
right after it writes a checkpoint."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import common


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: a second thread buys nothing, and on a busy 2-core machine it makes runs many times slower.
    Imported by a test module, it applies to that module's tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(main, argv):
    """Run a script's main() the way `python script.py ...` does; returns the exit status."""
    try:
        common.run_main(lambda: main(argv))
    except SystemExit as exit_:
        return exit_.code
    return 0


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kill_9_when_written(script, argv, path, timeout=300):
    """Run `python script argv...` from the repository root and SIGKILL it (no handler runs) as soon as `path`
    exists, i.e. right after its first checkpoint write; asserts it died of the signal, not of an error."""
    kill_9_when(script, argv, lambda: os.path.exists(path), timeout)


def kill_9_when(script, argv, condition, timeout=300):
    """kill_9_when_written, with the moment of the kill the first poll at which condition() is true."""
    child = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *argv], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while not condition() and child.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, child.stderr.read().decode()[-2000:]


class StopAfter:
    """Stand-in for common.StopSignal that 'receives' SIGTERM after `polls_left` polls (mid-epoch); subclass
    it to change the count."""
    polls_left = 5

    def __init__(self):
        self.polls = 0

    @property
    def received(self):
        self.polls += 1
        return "SIGTERM" if self.polls > self.polls_left else None

    def close(self):
        pass
