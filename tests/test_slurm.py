"""slurm.sbatch on a real one-node Slurm: job arrays of trainer_digits.py fill one store through
cancellations, time limits and resubmissions, and a store made with other settings is refused.

The cluster is the test's own: Debian's slurmctld, slurmd and munged with a slurm.conf of one node of
2 CPUs, every file under a temporary folder, the daemons stopped by their pids at the end. Needs root
(slurmd runs jobs as their user) and the packages slurmctld slurmd slurm-client munge; .ci/run
installs them. Without them the tests are skipped, except under CI (the CI variable set), where they
fail. About 5 minutes on 2 idle cores (the time-limit test trains the full-size MLP, 4 of them).
"""
import collections
import glob
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from store import Store, StoreError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = 'slurmctld slurmd slurm-client munge'
DAEMONS = ('munged', 'slurmctld', 'slurmd', 'sbatch', 'scontrol', 'scancel', 'sinfo')
SBIN = '/usr/local/sbin:/usr/sbin:/sbin'
# every task on the CPU: no GPU asked for (the script asks for one), one CPU (it asks for 4)
CPU = ['--gres=none', '--cpus-per-task=1']
DIGITS = ['trainer_digits.py', '--smoke', '--device', 'cpu']  # 100 models a block: seconds each
ENDED = {'COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT', 'OUT_OF_MEMORY', 'NODE_FAIL', 'PREEMPTED', 'BOOT_FAIL',
         'DEADLINE'}
RUN_LINE = re.compile(r'^(with|without) +run +(\d+) +seed', re.M)


class Cluster:
    """A one-node Slurm under `root`: munged as the munge user with its own key and socket, slurmctld
    and slurmd as root, on free ports."""

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix='slurm-test-')  # not under pytest's 0700 folder: munged must reach it
        os.chmod(self.root, 0o755)
        self.conf = os.path.join(self.root, 'slurm.conf')
        self.env = {**os.environ, 'SLURM_CONF': self.conf, 'EXPERIMENT_PROGRESS_S': '5',  # not every minute
                    'PATH': f'{os.path.dirname(sys.executable)}:{os.environ["PATH"]}:{SBIN}'}
        self.pid_files = []

    def start(self):
        socket_path = self._start_munged()
        for sub in ('state', 'spool', 'log'):
            os.mkdir(os.path.join(self.root, sub))
        host = socket.gethostname().split('.')[0]
        with open(self.conf, 'w') as f:
            f.write(slurm_conf(self.root, host, socket_path))
        for daemon in ('slurmctld', 'slurmd'):
            self.pid_files.append(os.path.join(self.root, f'{daemon}.pid'))
            self._run([daemon] + (['-i'] if daemon == 'slurmctld' else []))
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(['sinfo', '-h', '-o', '%T'], env=self.env, capture_output=True, text=True)
            if state.stdout.strip() == 'idle':
                return
            time.sleep(0.5)
        said = state.stdout.strip() or state.stderr.strip()
        raise RuntimeError(f'the test Slurm did not come up in 60 s (sinfo: {said}); logs:\n{self.logs()}')

    def _start_munged(self):
        munge = pwd.getpwnam('munge')
        folder = os.path.join(self.root, 'munge')
        os.mkdir(folder)
        os.chmod(folder, 0o711)  # munged wants its socket's folder searchable by all, writable by it alone
        os.chown(folder, munge.pw_uid, munge.pw_gid)
        key = os.path.join(folder, 'munge.key')
        with open(key, 'wb') as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        os.chown(key, munge.pw_uid, munge.pw_gid)
        self.pid_files.append(os.path.join(folder, 'munged.pid'))
        self._run(['runuser', '-u', 'munge', '--', 'munged', f'--socket={folder}/socket', f'--key-file={key}',
                   f'--pid-file={folder}/munged.pid', f'--log-file={folder}/munged.log',
                   f'--seed-file={folder}/munged.seed'])
        return f'{folder}/socket'

    def _run(self, command):
        done = subprocess.run(command, env=self.env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f'{" ".join(command[:1])} did not start: {done.stderr.strip()}\n{self.logs()}')

    def logs(self):
        tails = []
        for path in glob.glob(f'{self.root}/log/*.log') + glob.glob(f'{self.root}/munge/*.log'):
            with open(path) as f:
                tails.append(f'--- {path}\n' + ''.join(f.readlines()[-15:]))
        return '\n'.join(tails)

    def stop(self):
        subprocess.run(['scancel', '--user', 'root'], env=self.env, capture_output=True)
        self.wait_idle(30)
        pids = []
        for path in reversed(self.pid_files):  # slurmd, slurmctld, then munged
            try:
                with open(path) as f:
                    pids.append(int(f.read()))
                os.kill(pids[-1], signal.SIGTERM)
            except (OSError, ValueError):
                pass
        deadline = time.time() + 15
        while pids and time.time() < deadline:
            pids = [p for p in pids if _alive(p)]
            time.sleep(0.2)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    def wait_idle(self, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            queue = subprocess.run(['squeue', '-h'], env=self.env, capture_output=True, text=True)
            if queue.returncode == 0 and not queue.stdout.strip():
                return
            time.sleep(0.5)

    def sbatch(self, *args):
        """Submit from the project folder, as a user would; -> the job id."""
        done = subprocess.run(['sbatch', '--parsable', *args], cwd=ROOT, env=self.env, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().split(';')[0]

    def tasks(self, job):
        """{task id: (state, exit code)} of an array job."""
        out = subprocess.run(['scontrol', '-o', 'show', 'job', job], env=self.env, capture_output=True,
                             text=True).stdout
        tasks = {}
        for line in out.splitlines():
            fields = dict(re.findall(r'(\w+)=(\S*)', line))
            tasks[fields.get('ArrayTaskId', '0')] = (fields['JobState'], fields['ExitCode'])
        return tasks

    def wait(self, job, timeout=240, logs=None):
        """-> {task: (state, exit code)} once every task has ended; a timeout names the tasks still running
        and shows the logs matching the glob `logs`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            tasks = self.tasks(job)
            if tasks and all(state in ENDED for state, _ in tasks.values()):
                return tasks
            time.sleep(0.5)
        said = ''.join(f'--- {path}\n{text[-3000:]}' for path, text in read_logs(logs or '').items())
        raise AssertionError(f'job {job} still running after {timeout} s: {self.tasks(job)}\n{said}')


def slurm_conf(root, host, munge_socket):
    return f"""# a one-node test cluster; everything under {root}
ClusterName=selftest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
GresTypes=gpu
# seconds from SIGTERM to SIGKILL; finished jobs stay visible to scontrol for 10 min
KillWait=10
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
# up to 4 tasks share the 2 CPUs, as 4 workers on 4 GPUs would run side by side
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope='module')
def slurm():
    missing = [name for name in DAEMONS if not shutil.which(name, path=f'{os.environ["PATH"]}:{SBIN}')]
    why = (f'Slurm is not installed ({", ".join(missing)} missing): apt-get install -y {PACKAGES}' if missing else
           'the test Slurm runs its daemons as root' if os.geteuid() != 0 else None)
    if why:
        if os.environ.get('CI'):
            pytest.fail(why)
        pytest.skip(why)
    cluster = Cluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def out(slurm):
    """A folder for a store and its logs, under the cluster's (the job logs must be writable by root)."""
    return tempfile.mkdtemp(dir=slurm.root)


def read_logs(pattern):
    texts = {}
    for path in sorted(glob.glob(pattern)):
        with open(path) as f:
            texts[path] = f.read()
    return texts


HELD_OUT_LINE = "held out: 40 examples from the trainer's default: random 20, easy 20\n"


def leftovers(store):
    """Claims, and files the store writes under a temporary name, left anywhere in the store."""
    found = os.listdir(os.path.join(store, 'claims')) if os.path.isdir(os.path.join(store, 'claims')) else []
    return found + [n for _, _, names in os.walk(store) for n in names if '.tmp-' in n]


def test_an_array_of_four_tasks_trains_every_run_once_and_the_report_follows(slurm, out):
    store = os.path.join(out, 'digits')
    job = slurm.sbatch(*CPU, '--array=0-3', f'--output={out}/task-%a.out', 'slurm.sbatch', *DIGITS,
                       '--runs', '200', '--out', store)  # 400 runs: four blocks of 100
    report = slurm.sbatch(f'--dependency=afterany:{job}', *CPU, f'--output={store}-report.txt',
                          '--wrap', f'python viz.py {store} --json {store}-report.json')
    tasks = slurm.wait(job)
    logs = read_logs(f'{out}/task-*.out')
    assert all(state == 'COMPLETED' for state, _ in tasks.values()), (tasks, logs)
    trained = collections.Counter(m for text in logs.values() for m in RUN_LINE.findall(text))
    assert set(trained.values()) == {1} and len(trained) == 400  # every run once, by whichever task
    assert not any('\r' in text for text in logs.values())  # lines, no progress-bar frames
    assert sum(bool(RUN_LINE.search(t)) for t in logs.values()) >= 2  # the tasks shared the work
    assert Store(store).stored('with') == Store(store).stored('without') == list(range(200))
    assert leftovers(store) == []
    assert slurm.wait(report)['0'][0] == 'COMPLETED'
    with open(f'{store}-report.txt') as f:
        table = f.read()
    assert 'Example index      margin               self-influence' in table and '200 runs with' in table
    assert os.path.getsize(f'{store}-report.json') > 0


def test_a_cancelled_task_gives_its_runs_back_and_the_others_finish(slurm, out):
    store = os.path.join(out, 'digits')
    job = slurm.sbatch(*CPU, '--array=0-2', f'--output={out}/task-%a.out', 'slurm.sbatch', *DIGITS,
                       '--runs', '150', '--out', store)  # three blocks of 100 for three tasks
    deadline, claimed = time.time() + 180, 0
    while time.time() < deadline and claimed < 300:  # 300 claims: each task holds its block, task 1 too
        time.sleep(0.2)
        claimed = held(store)
    assert claimed == 300, 'the three tasks never held a block each at once: nothing was tested'
    subprocess.run(['scancel', f'{job}_1'], env=slurm.env, check=True)
    tasks = slurm.wait(job)
    assert tasks['1'][0] == 'CANCELLED' and tasks['0'][0] == tasks['2'][0] == 'COMPLETED', tasks
    with open(f'{out}/task-1.out') as f:
        said = f.read()
    assert re.search(r'stopped by SIGTERM: gave back \d+ run\(s\) in progress', said), said
    assert Store(store).stored('with') == Store(store).stored('without') == list(range(150))
    assert leftovers(store) == []


def test_a_task_stopped_by_its_time_limit_is_continued_by_resubmitting(slurm, out):
    store = os.path.join(out, 'digits')
    # the full-size MLP, not --smoke: a block of 100 models takes about 20 s per task on an idle core, so the
    # six blocks cannot all be stored before the signal however fast the machine (with --smoke they could)
    full = [a for a in DIGITS if a != '--smoke']
    command = [*CPU, '--array=0-1', 'slurm.sbatch', *full, '--runs', '300', '--out', store]  # six blocks
    # a limit of one minute and the script's --signal=B:TERM@60: SIGTERM at the controller's first look at
    # the time limits, about 30 s after the start, when a block or two are stored
    first = slurm.sbatch('--time=1', f'--output={out}/first-%a.out', *command)
    tasks = slurm.wait(first)
    for task, (_, code) in tasks.items():  # 0:15: the signal came while Python was still importing torch
        with open(f'{out}/first-{task}.out') as f:
            said = f.read()
        assert code in ('143:0', '0:15') and 'Traceback' not in said, (code, said)
        assert code == '0:15' or 'stopped by SIGTERM' in said, said
    made = os.path.exists(os.path.join(store, 'settings.json'))  # not when both were stopped before the store
    done = len(Store(store).stored('with')) + len(Store(store).stored('without')) if made else 0
    assert done < 600 and leftovers(store) == []

    again = slurm.sbatch(f'--output={out}/again-%a.out', *command)
    tasks = slurm.wait(again, timeout=480, logs=f'{out}/again-*.out')  # 4-5 blocks of 20 s, on a slower CI machine
    assert all(state == 'COMPLETED' for state, _ in tasks.values()), read_logs(f'{out}/again-*.out')
    assert Store(store).stored('with') == Store(store).stored('without') == list(range(300))
    assert leftovers(store) == []


def test_a_second_array_with_other_settings_is_refused_and_the_first_runs_are_untouched(slurm, out):
    store = os.path.join(out, 'digits')
    first = slurm.sbatch(*CPU, '--array=0-1', f'--output={out}/first-%a.out', 'slurm.sbatch', *DIGITS,
                         '--runs', '20', '--out', store)
    assert all(state == 'COMPLETED' for state, _ in slurm.wait(first).values())
    before = fingerprint(store)
    second = slurm.sbatch(*CPU, '--array=0-1', f'--output={out}/second-%a.out', 'slurm.sbatch', *DIGITS,
                          '--runs', '20', '--hyp', 'epochs=3', '--out', store)
    tasks = slurm.wait(second)
    assert all(code == '2:0' for _, code in tasks.values()), tasks
    for text in read_logs(f'{out}/second-*.out').values():  # one message, naming what differs, no traceback
        text = text.removeprefix(HELD_OUT_LINE)  # the trainer's first line: which held-out set it uses
        assert text.startswith('error: ') and text.count('error') == 1 and 'epochs' in text, text
        assert 'Traceback' not in text and not RUN_LINE.search(text)
    assert fingerprint(store) == before


def held(store):
    """Runs claimed by live workers now (0 before the store exists)."""
    try:
        return Store(store).in_progress()
    except StoreError:
        return 0


def fingerprint(store):
    """{path: sha256} of every file in the store."""
    hashes = {}
    for folder, _, names in os.walk(store):
        for name in names:
            with open(os.path.join(folder, name), 'rb') as f:
                hashes[os.path.join(folder, name)] = hashlib.sha256(f.read()).hexdigest()
    return hashes
