#!/usr/bin/env python3
"""The units in contrib/ under a real systemd (252, Debian 12) as PID 1 of a container.

    python3 bench/systemd_test.py            # or: make systemd   (root; about 2 min, 4 at the
                                             #  first run, which builds the container tree)

On the host: a Debian bookworm tree made once with `debootstrap --variant=minbase` (mirror
read from this machine's apt sources) and kept in /var/cache/agent-systemd-test (--tree; rebuilt
when missing); each run boots it with systemd-nspawn on an overlay (so the tree stays clean),
with --private-network (0.0.0.0:9085 is only the container's loopback) and pure cgroup v2.  The
project's files are installed as README's production section says, then this same script runs
inside (--inside) and checks, with systemctl and journalctl:

    notify start (ready before active), StatusText, MainPID = pidfile, user agent, a
    byte-identical download; reload under requests (none failing, workers replaced); stop
    draining a download in flight (Result=success, no SIGKILL); upgrade then stop, and upgrade
    then reload, with the same guarantees (same MainPID, no "not our child"); socket activation
    on the first connection over IPv4 and IPv6 (one listening socket: systemd's); crash restart;
    logrotate and USR1; the LSB init script through systemd's sysv generator; the
    `systemd-analyze security` score; no warning from the agent in the journal; a watchdog
    restart; a dead worker filed as a warning (priority 4) in the journal; over HTTPS, a
    reload with a certificate that does not parse fails `systemctl reload` (an error in the
    journal, the old workers serving on), and succeeds once the file is fixed.  Then what
    systemd itself does to the agent: restart under requests (with agent.socket none fails;
    without it, how many fail and for how long is printed); `systemctl kill` with USR1 (logs
    reopened) and with TERM to every process (a clean stop, no worker respawned); a reload and
    a stop while the unit is still activating; a stop that cuts a download at --stop-timeout
    (Result=success, no SIGKILL); LimitNOFILE=64 under more connections than descriptors (a
    warning or two per worker, served meanwhile, no crash).  Not here: MemoryMax= and an OOM
    kill, which a container on this project's hosts (cgroup v1 or hybrid) cannot enforce or
    show.

The container is powered off, the overlay unmounted and the run's directory removed, also on
failure.  Exit status: 0 all passed, 1 a check failed, 77 this machine cannot run the test
(not root, no systemd-nspawn/debootstrap, no overlayfs...: the reason is printed).
"""

import argparse
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import harness      # beside this file, here and in the container (copied with it)

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)
CANNOT_RUN = 77
PACKAGES = ['systemd', 'systemd-sysv', 'python3', 'curl', 'logrotate', 'adduser', 'procps',
            'iproute2']
TREE = '/var/cache/agent-systemd-test/bookworm'


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------

class CannotRun(Exception):
    pass


def say(message):
    print('systemd-test: %s' % message, flush=True)


def debian_mirror():
    """The first URI of this machine's apt sources that serves bookworm (not -security)."""
    for path in sorted(glob.glob('/etc/apt/sources.list.d/*.sources')):
        with open(path) as f:
            for stanza in f.read().split('\n\n'):
                fields = dict(re.findall(r'(?m)^(\w[\w-]*):\s*(.+)$', stanza))
                if 'bookworm' in fields.get('Suites', '').split() and fields.get('URIs'):
                    return fields['URIs'].split()[0]
    for path in ['/etc/apt/sources.list'] + sorted(glob.glob('/etc/apt/sources.list.d/*.list')):
        try:
            with open(path) as f:
                for line in f:
                    words = line.split('#', 1)[0].split()
                    words = [w for w in words if not w.startswith('[')]
                    if len(words) >= 3 and words[0] == 'deb' and words[2] == 'bookworm':
                        return words[1]
        except OSError:
            pass
    raise CannotRun('no apt source for bookworm in /etc/apt: cannot pick a mirror for debootstrap')


def preflight():
    if os.geteuid() != 0:
        raise CannotRun('needs root (debootstrap, mount, systemd-nspawn)')
    for tool in ('systemd-nspawn', 'debootstrap', 'nsenter', 'mount', 'openssl'):
        if not shutil.which(tool, path=os.environ.get('PATH', '') + ':/usr/sbin:/sbin'):
            raise CannotRun('%s is not installed (Debian: systemd-container, debootstrap, '
                            'util-linux, openssl)' % tool)
    with open('/proc/filesystems') as f:
        if 'overlay' not in f.read():
            raise CannotRun('the kernel has no overlayfs (modprobe overlay)')


def build_tree(tree):
    """debootstrap the tree once; a marker with the package list says it is complete."""
    marker = os.path.join(tree, '.agent-systemd-test')
    wanted = ' '.join(PACKAGES)
    try:
        with open(marker) as f:
            if f.read().strip() == wanted:
                return
    except OSError:
        pass
    mirror = debian_mirror()
    say('building %s with debootstrap from %s (once; cached afterwards)' % (tree, mirror))
    partial = tree + '.partial'
    subprocess.run(['rm', '-rf', partial, tree], check=True)
    os.makedirs(os.path.dirname(tree), exist_ok=True)
    result = subprocess.run(['debootstrap', '--variant=minbase', '--include=' + ','.join(PACKAGES),
                             'bookworm', partial, mirror], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        subprocess.run(['rm', '-rf', partial])
        raise CannotRun('debootstrap failed (%d): %s' % (result.returncode, result.stdout.strip()[-800:]))
    with open(os.path.join(partial, '.agent-systemd-test'), 'w') as f:
        f.write(wanted + '\n')
    os.rename(partial, tree)


def install_project(root):
    """The files where README's production section puts them, plus this script."""
    os.makedirs(os.path.join(root, 'opt/agent'), exist_ok=True)
    for name in ('agent.py', 'daemon.py'):
        shutil.copy(os.path.join(PROJECT, name), os.path.join(root, 'opt/agent', name))
    for name in ('agent.service', 'agent.socket'):
        shutil.copy(os.path.join(PROJECT, 'contrib', name), os.path.join(root, 'etc/systemd/system', name))
    shutil.copy(os.path.join(PROJECT, 'contrib/agent.logrotate'), os.path.join(root, 'etc/logrotate.d/agent'))
    # The LSB script under another name, so agent.service does not shadow it in the generator.
    shutil.copy(os.path.join(PROJECT, 'contrib/agent.init'), os.path.join(root, 'etc/init.d/agentlsb'))
    os.chmod(os.path.join(root, 'etc/init.d/agentlsb'), 0o755)
    with open(os.path.join(root, 'etc/default/agent'), 'w') as f:
        f.write('PORT=9086\nPIDFILE=/run/agentlsb/agent.pid\nLOGDIR=/var/log/agentlsb\n')
    # A certificate for the HTTPS checks (the container has no openssl): self-signed, for
    # localhost; installed for the user agent inside, as README says.
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2',
                    '-subj', '/CN=localhost', '-keyout', os.path.join(root, 'root/tls.key'),
                    '-out', os.path.join(root, 'root/tls.crt')],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.copy(os.path.abspath(__file__), os.path.join(root, 'root/systemd_test.py'))
    shutil.copy(os.path.join(HERE, 'harness.py'), os.path.join(root, 'root/harness.py'))
    # No getty on the console: nothing in the container waits for a login.
    os.makedirs(os.path.join(root, 'etc/systemd/system/console-getty.service.d'), exist_ok=True)
    os.symlink('/dev/null', os.path.join(root, 'etc/systemd/system/console-getty.service'))


def cgroup_dirs():
    """Every cgroup directory on this machine (nspawn makes payload/ and supervisor/ ones)."""
    found = set()
    for top, dirs, _ in os.walk('/sys/fs/cgroup'):
        found.update(os.path.join(top, d) for d in dirs)
    return found


def remove_cgroups(before):
    """rmdir the cgroups made since `before`, deepest first; the ones that remain."""
    left = []
    for path in sorted(cgroup_dirs() - before, key=len, reverse=True):
        try:
            os.rmdir(path)
        except OSError as exc:
            left.append('%s (%s)' % (path, exc.strerror))
    return left


def in_container(leader, args, timeout=60, **kwargs):
    return subprocess.run(['nsenter', '--target', str(leader), '--all'] + args, timeout=timeout,
                          **kwargs)


def host_main(args):
    preflight()
    build_tree(args.tree)
    run_dir = tempfile.mkdtemp(prefix='agent-systemd-test-')
    merged = os.path.join(run_dir, 'merged')
    for name in ('upper', 'work', 'merged'):
        os.makedirs(os.path.join(run_dir, name))
    mounted, nspawn, leader = False, None, None
    cgroups_before = cgroup_dirs()
    try:
        result = subprocess.run(['mount', '-t', 'overlay', 'overlay', '-o',
                                 'lowerdir=%s,upperdir=%s/upper,workdir=%s/work' % (args.tree, run_dir, run_dir),
                                 merged], stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise CannotRun('cannot mount an overlay on the tree: %s' % result.stderr.strip())
        mounted = True
        install_project(merged)
        env = dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY='1')
        console = open(os.path.join(run_dir, 'console.log'), 'w')
        machine = 'agenttest%d' % os.getpid()
        nspawn = subprocess.Popen(['systemd-nspawn', '--quiet', '--boot', '--private-network',
                                   '--register=no', '--keep-unit', '--directory=' + merged,
                                   '--machine=' + machine], stdin=subprocess.DEVNULL,
                                  stdout=console, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            if nspawn.poll() is not None:
                with open(os.path.join(run_dir, 'console.log'), errors='replace') as f:
                    raise CannotRun('systemd-nspawn exited (%d): %s' % (nspawn.returncode, f.read()[-800:]))
            if time.monotonic() > deadline:
                raise CannotRun('the container did not boot within 60 s')
            if leader is None:
                children = subprocess.run(['ps', '-o', 'pid=', '--ppid', str(nspawn.pid)],
                                          stdout=subprocess.PIPE, text=True).stdout.split()
                leader = int(children[0]) if children else None
            if leader is not None:
                state = in_container(leader, ['systemctl', 'is-system-running'], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True).stdout.strip()
                if state in ('running', 'degraded'):
                    break
            time.sleep(0.2)
        say('container up (systemd %s, leader pid %d, state %s)' % (
            in_container(leader, ['systemctl', '--version'], stdout=subprocess.PIPE, text=True)
            .stdout.split()[1], leader, state))
        result = in_container(leader, ['python3', '/root/systemd_test.py', '--inside'], timeout=600)
        return result.returncode
    finally:
        if leader is not None:
            try:
                os.kill(leader, signal.SIGRTMIN + 4)      # systemd: poweroff
            except ProcessLookupError:
                pass
        if nspawn is not None:
            try:
                nspawn.wait(30)
            except subprocess.TimeoutExpired:
                say('the container did not power off in 30 s: killing it')
                for pid in (leader, nspawn.pid):
                    if pid:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                nspawn.wait(10)
        if mounted:
            subprocess.run(['umount', merged])
        subprocess.run(['rm', '-rf', run_dir])
        left = remove_cgroups(cgroups_before)
        if left:
            say('cgroups left behind: %s' % ', '.join(left))


# ---------------------------------------------------------------------------------------------
# Inside the container (python3 of Debian 12, as root, systemd as PID 1)
# ---------------------------------------------------------------------------------------------

PIDFILE = '/run/agent/agent.pid'
AGENT = ['python3', '/opt/agent/agent.py', '--pidfile', PIDFILE]
BIG = 8 * 1024 * 1024
failures = []


def sh(*args, check=True, timeout=60):
    result = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError('%s exited %d: %s' % (' '.join(args), result.returncode, result.stdout.strip()))
    return result.stdout


def show(unit, *props):
    out = sh('systemctl', 'show', unit, '-p', ','.join(props))
    return dict(line.split('=', 1) for line in out.splitlines() if '=' in line)


def check(ok, what, detail=''):
    print('  %s %s%s' % ('ok  ' if ok else 'FAIL', what, (': %s' % (detail,)) if detail and not ok else ''),
          flush=True)
    if not ok:
        failures.append(what)
    return ok


def wait_until(predicate, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def children(pid):
    try:
        with open('/proc/%d/task/%d/children' % (pid, pid)) as f:
            return sorted(int(p) for p in f.read().split())
    except OSError:
        return []


def fetch(url, timeout=20):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read()


def journal_since(cursor, unit='agent.service'):
    return sh('journalctl', '--no-pager', '-o', 'short-monotonic', '--after-cursor', cursor, '-u', unit)


def cursor():
    out = sh('journalctl', '--no-pager', '-n', '0', '--show-cursor')
    return out.strip().rsplit('cursor: ', 1)[-1]


class Load:
    """Small requests in a loop from 4 threads, until stopped; counts and failures."""

    def __init__(self, url, body):
        self.url, self.body = url, body
        self.done, self.errors, self.failed_at = 0, [], []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.loop) for _ in range(4)]

    def loop(self):
        while not self.stop.is_set():
            try:
                status, data = fetch(self.url, 10)
                if (status, data) != (200, self.body):
                    self.errors.append(status)
                self.done += 1
            except Exception as exc:
                self.errors.append(repr(exc))
                self.failed_at.append(time.monotonic())

    def __enter__(self):
        for t in self.threads:
            t.start()
        wait_until(lambda: self.done > 20)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(30)


def slow_download(port=9085):
    """curl at 2 MB/s of the 8 MB file, in the background: a download still in flight."""
    out = tempfile.NamedTemporaryFile(delete=False)
    proc = subprocess.Popen(['curl', '-s', '-S', '--limit-rate', '2M', '-o', out.name,
                             'http://127.0.0.1:%d/big.jpg' % port], stderr=subprocess.PIPE)
    time.sleep(1.0)         # under way
    return proc, out.name


def download_complete(proc, path, what):
    proc.wait(60)
    with open(path, 'rb') as f, open('/srv/images/big.jpg', 'rb') as g:
        same = f.read() == g.read()
    check(proc.returncode == 0 and same, what, 'curl %s, identical %s' % (proc.returncode, same))


def stop_cleanly(what):
    """systemctl stop with a download in flight: it completes, Result=success, no SIGKILL."""
    mark = cursor()
    proc, path = slow_download()
    sh('systemctl', 'stop', 'agent.service', timeout=30)
    download_complete(proc, path, '%s: the download in flight completes' % what)
    state = show('agent.service', 'Result', 'ActiveState', 'ExecMainStatus', 'ExecMainCode')
    check(state['Result'] == 'success' and state['ActiveState'] == 'inactive',
          '%s: Result=success' % what, state)
    log = journal_since(mark)
    check('SIGKILL' not in log and 'not our child' not in log, '%s: no SIGKILL in the journal' % what, log)


def upgrade(what):
    main = int(show('agent.service', 'MainPID')['MainPID'])
    workers = children(main)
    mark = cursor()
    result = subprocess.run(AGENT + ['upgrade'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=120)
    check(result.returncode == 0 and 'upgraded in place' in result.stdout,
          '%s: agent.py upgrade exits 0' % what, result.stdout)
    state = show('agent.service', 'MainPID', 'ActiveState', 'SubState', 'StatusText')
    check(int(state['MainPID']) == main and read_pid() == main, '%s: same MainPID and pidfile' % what, state)
    check(state['ActiveState'] == 'active' and 'upgraded' in state['StatusText'],
          '%s: active, StatusText says upgraded' % what, state)
    check(wait_until(lambda: not set(workers) & set(children(main)) and len(children(main)) == 2),
          '%s: old workers drained, 2 new ones' % what, children(main))
    check('not our child' not in journal_since(mark), '%s: systemd still supervises its child' % what)


DROPIN_DIR = '/etc/systemd/system/agent.service.d'
RUN = ('/usr/bin/python3 /opt/agent/agent.py --root /srv/images --bind 0.0.0.0 --port 9085 '
       '--pidfile /run/agent/agent.pid --access-log /var/log/agent/access.log %s run')


def add_dropin(name, text):
    """A drop-in for agent.service (daemon-reload'ed); its path, for remove_dropin()."""
    path = os.path.join(DROPIN_DIR, name)
    os.makedirs(DROPIN_DIR, exist_ok=True)
    with open(path, 'w') as f:
        f.write('[Service]\n' + text)
    sh('systemctl', 'daemon-reload')
    return path


def remove_dropin(path):
    os.remove(path)
    sh('systemctl', 'daemon-reload')


def entries_since(mark, needle):
    """The agent's journal entries since mark whose MESSAGE has needle: (PRIORITY, MESSAGE)."""
    out = sh('journalctl', '--no-pager', '-o', 'json', '--after-cursor', mark, '-u', 'agent.service',
             check=False)
    entries = [json.loads(line) for line in out.splitlines() if line.startswith('{')]
    return [(e.get('PRIORITY'), e.get('MESSAGE')) for e in entries
            if isinstance(e.get('MESSAGE'), str) and needle in e['MESSAGE']]


def restart_under_load(url, body):
    """systemctl restart with requests going on: the requests that failed, how many were done,
    and the seconds from the first failure to the last (0 if none failed)."""
    with Load(url, body) as load:
        sh('systemctl', 'restart', 'agent.service', timeout=60)
        done = load.done
        wait_until(lambda: load.done > done + 50)
    gap = max(load.failed_at) - min(load.failed_at) if load.failed_at else 0.0
    return load.errors, load.done, gap


def starting(dropin_path):
    """systemctl start --no-block, until the unit is activating (in the ExecStart's sleep)."""
    sh('systemctl', 'start', '--no-block', 'agent.service')
    return wait_until(lambda: show('agent.service', 'ActiveState')['ActiveState'] == 'activating')


def read_pid():
    try:
        with open(PIDFILE) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def inside_main():
    print('inside: %s' % sh('systemctl', '--version').splitlines()[0], flush=True)
    sh('adduser', '--system', '--group', '--no-create-home', '--home', '/nonexistent', 'agent')
    os.makedirs('/srv/images', exist_ok=True)
    small = os.urandom(20000)
    with open('/srv/images/small.jpg', 'wb') as f:
        f.write(small)
    with open('/srv/images/big.jpg', 'wb') as f:
        f.write(os.urandom(BIG))
    with open('/srv/images/huge.jpg', 'wb') as f:
        f.write(os.urandom(8 * BIG))
    # README's install step: /opt is read-only to the unit (ProtectSystem=strict), so the
    # bytecode the agent runs from is compiled here.
    sh('python3', '-m', 'compileall', '-q', '/opt/agent')
    sh('systemctl', 'daemon-reload')
    url = 'http://127.0.0.1:9085/small.jpg'

    print('start', flush=True)
    mark = cursor()
    sh('systemctl', 'start', 'agent.service', timeout=60)
    state = show('agent.service', 'ActiveState', 'StatusText', 'MainPID', 'Type', 'NRestarts')
    main = int(state['MainPID'])
    check(state['Type'] == 'notify' and state['ActiveState'] == 'active', 'Type=notify, active', state)
    check(state['StatusText'].startswith('agent serving /srv/images at http://'), 'StatusText', state)
    check(read_pid() == main, 'MainPID = pidfile', (main, read_pid()))
    with open('/proc/%d/status' % main) as f:
        uid = int(re.search(r'(?m)^Uid:\s+(\d+)', f.read()).group(1))
    check(uid == int(sh('id', '-u', 'agent')), 'runs as user agent', uid)
    log = journal_since(mark)
    serving, started = log.find('agent: serving'), log.find('Started agent.service')
    check(0 <= serving < started, 'ready (workers up) before systemd says started', log)
    check(fetch(url) == (200, small), 'a byte-identical download')
    rss = [int(re.search(r'(?m)^VmRSS:\s+(\d+)', open('/proc/%d/status' % pid).read()).group(1))
           for pid in children(main)]
    print('  workers\' RSS from the bytecode compiled at install: %s kB' % rss, flush=True)
    check(sh('curl', '-s', 'http://127.0.0.1:9085/big.jpg', '-o', '/tmp/big') == '' and
          open('/tmp/big', 'rb').read() == open('/srv/images/big.jpg', 'rb').read(),
          'an 8 MB download with curl, byte-identical')

    print('reload under requests', flush=True)
    workers = children(main)
    with Load(url, small) as load:
        sh('systemctl', 'reload', 'agent.service')
        check(wait_until(lambda: not set(workers) & set(children(main)) and len(children(main)) == 2),
              'reload: workers replaced', children(main))
        done = load.done
        wait_until(lambda: load.done > done + 50)
    check(load.errors == [] and load.done > 50, 'reload: no request failed (%d done)' % load.done, load.errors[:5])
    check(int(show('agent.service', 'MainPID')['MainPID']) == main, 'reload: same MainPID')

    print('stop', flush=True)
    stop_cleanly('stop')

    print('upgrade, then stop', flush=True)
    sh('systemctl', 'start', 'agent.service', timeout=60)
    with Load(url, small) as load:
        upgrade('upgrade')
    check(load.errors == [], 'upgrade: no request failed (%d done)' % load.done, load.errors[:5])
    check(fetch(url) == (200, small), 'upgrade: serves')
    stop_cleanly('upgrade then stop')

    print('upgrade, then reload', flush=True)
    sh('systemctl', 'start', 'agent.service', timeout=60)
    upgrade('upgrade 2')
    main = int(show('agent.service', 'MainPID')['MainPID'])
    workers = children(main)
    with Load(url, small) as load:
        sh('systemctl', 'reload', 'agent.service')
        check(wait_until(lambda: not set(workers) & set(children(main)) and len(children(main)) == 2),
              'upgrade then reload: workers replaced', children(main))
    check(load.errors == [], 'upgrade then reload: no request failed (%d done)' % load.done, load.errors[:5])
    state = show('agent.service', 'ActiveState', 'SubState', 'MainPID')
    check(state['SubState'] == 'running' and int(state['MainPID']) == main, 'upgrade then reload: running', state)
    stop_cleanly('upgrade, reload, then stop')

    print('crash restart', flush=True)
    sh('systemctl', 'start', 'agent.service', timeout=60)
    state = show('agent.service', 'MainPID', 'NRestarts')
    before_crash = cursor()
    os.kill(int(state['MainPID']), signal.SIGKILL)
    check(wait_until(lambda: show('agent.service', 'NRestarts')['NRestarts'] == str(int(state['NRestarts']) + 1)
                     and show('agent.service', 'SubState')['SubState'] == 'running', 30),
          'killed master: restarted by systemd', show('agent.service', 'NRestarts', 'SubState'))
    check(wait_until(lambda: read_pid() == int(show('agent.service', 'MainPID')['MainPID'])), 'restart: MainPID = pidfile')
    check(fetch(url) == (200, small), 'restart: serves')
    after_crash = cursor()

    print('logrotate and USR1', flush=True)
    fetch(url)
    check(wait_until(lambda: os.path.exists('/var/log/agent/access.log')
                     and os.path.getsize('/var/log/agent/access.log') > 0), 'access.log written')
    sh('logrotate', '-f', '/etc/logrotate.d/agent')
    check(os.path.exists('/var/log/agent/access.log.1'), 'logrotate: access.log.1')
    fetch('http://127.0.0.1:9085/small.jpg?after-rotation')
    check(wait_until(lambda: 'after-rotation' in open('/var/log/agent/access.log').read()),
          'after USR1 the agent writes the new access.log')
    check('after-rotation' not in open('/var/log/agent/access.log.1').read(), 'and not the old one')
    sh('systemctl', 'stop', 'agent.service', timeout=30)

    print('socket activation', flush=True)
    sh('systemctl', 'start', 'agent.socket')
    check(show('agent.service', 'ActiveState')['ActiveState'] == 'inactive', 'socket: the service waits')
    check(fetch('http://127.0.0.1:9085/small.jpg') == (200, small), 'socket: first connection over IPv4 served')
    check(fetch('http://[::1]:9085/small.jpg') == (200, small), 'socket: IPv6 served')
    main = int(show('agent.service', 'MainPID')['MainPID'])
    listeners = sh('ss', '-Hltnp', 'sport = :9085').strip().splitlines()
    check(len(listeners) == 1 and 'systemd' in listeners[0] and 'agent: master' in listeners[0],
          'socket: one listening socket, systemd\'s, passed to the agent (no bind of its own)', listeners)
    upgrade('socket: upgrade')
    check(fetch('http://[::1]:9085/small.jpg') == (200, small), 'socket: serves after the upgrade')
    stop_cleanly('socket: stop')
    sh('systemctl', 'stop', 'agent.socket')

    print('LSB init script through the sysv generator', flush=True)
    sh('systemctl', 'daemon-reload')
    check('generated' in sh('systemctl', 'show', 'agentlsb.service', '-p', 'SourcePath,FragmentPath')
          or '/etc/init.d/agentlsb' in sh('systemctl', 'show', 'agentlsb.service', '-p', 'SourcePath'),
          'lsb: agentlsb.service generated from /etc/init.d/agentlsb')
    sh('systemctl', 'start', 'agentlsb.service', timeout=60)
    check(fetch('http://127.0.0.1:9086/small.jpg') == (200, small), 'lsb: serves on 9086')
    # The generator gives no PIDFile= (MainPID stays 0): the pidfile's agent must be in its cgroup.
    lsb_main = harness.read_pid('/run/agentlsb/agent.pid')
    with open('/proc/%d/cgroup' % lsb_main) as f:
        cgroup = f.read()
    check('agentlsb.service' in cgroup, 'lsb: the pidfile names the agent in agentlsb.service', cgroup)
    workers = children(lsb_main)
    sh('systemctl', 'reload', 'agentlsb.service')
    check(wait_until(lambda: workers and not set(workers) & set(children(lsb_main))), 'lsb: reload replaced the workers')
    sh('systemctl', 'stop', 'agentlsb.service', timeout=40)
    state = show('agentlsb.service', 'ActiveState', 'Result')
    check(state == {'ActiveState': 'inactive', 'Result': 'success'}, 'lsb: stopped cleanly', state)
    check(sh('pgrep', '-f', '/opt/agent/agent.py', check=False).strip() == '', 'lsb: no agent left')

    print('restart under requests', flush=True)
    sh('systemctl', 'start', 'agent.service', timeout=60)
    errors, done, gap = restart_under_load(url, small)
    # 4 threads that retry at once: the count is of attempts, the gap says how long it lasted.
    print('  restart without agent.socket: %d failed requests over %.2f s, %d done (%s)'
          % (len(errors), gap, done, sorted(set(str(e)[:60] for e in errors))[:3]), flush=True)
    check(show('agent.service', 'SubState')['SubState'] == 'running' and fetch(url) == (200, small),
          'restart: running and serving again')
    sh('systemctl', 'stop', 'agent.service', timeout=30)
    sh('systemctl', 'start', 'agent.socket')
    check(fetch(url) == (200, small), 'restart with agent.socket: activated')
    errors, done, gap = restart_under_load(url, small)
    print('  restart with agent.socket: %d failed requests, %d done' % (len(errors), done), flush=True)
    check(errors == [], 'restart with agent.socket: no request failed (%d done)' % done, errors[:5])
    check(fetch(url) == (200, small), 'restart with agent.socket: serves')
    sh('systemctl', 'stop', 'agent.socket', 'agent.service', timeout=30)

    print('systemctl kill', flush=True)
    sh('systemctl', 'start', 'agent.service', timeout=60)
    main = int(show('agent.service', 'MainPID')['MainPID'])
    workers = children(main)
    os.rename('/var/log/agent/access.log', '/var/log/agent/access.log.moved')
    sh('systemctl', 'kill', '--signal=SIGUSR1', 'agent.service')
    fetch('http://127.0.0.1:9085/small.jpg?after-kill-usr1')
    check(wait_until(lambda: os.path.exists('/var/log/agent/access.log')
                     and 'after-kill-usr1' in open('/var/log/agent/access.log').read()),
          'kill USR1 (master and workers): the logs reopened')
    state = show('agent.service', 'ActiveState', 'MainPID')
    check(state['ActiveState'] == 'active' and int(state['MainPID']) == main and children(main) == workers,
          'kill USR1: same master and workers', (state, workers, children(main)))
    mark = cursor()
    proc, path = slow_download()
    sh('systemctl', 'kill', 'agent.service')
    check(wait_until(lambda: show('agent.service', 'ActiveState')['ActiveState'] in ('inactive', 'failed'), 30),
          'kill (TERM to all): the service ends', show('agent.service', 'ActiveState'))
    download_complete(proc, path, 'kill: the download in flight completes')
    state = show('agent.service', 'Result', 'ActiveState', 'NRestarts', 'ExecMainStatus')
    check(state['Result'] == 'success' and state['ActiveState'] == 'inactive',
          'kill: Result=success, not restarted', state)
    log = journal_since(mark)
    check(not re.search(r'SIGKILL|not our child|died|Traceback', log), 'kill: no SIGKILL, no worker "died"', log)

    print('reload and stop while starting', flush=True)
    # A slow start: the main process sleeps 2 s, then execs the agent (one process all along:
    # a shell's `sleep` child would be left to KillMode=mixed's SIGKILL by a stop in the sleep).
    delay = ('/usr/bin/python3 -c "import os, sys, time; time.sleep(2); '
             'os.execv(sys.executable, [sys.executable] + sys.argv[1:])" ')
    slow = add_dropin('slowstart.conf', 'ExecStart=\nExecStart=%s%s\n'
                      % (delay, (RUN % '--stop-timeout 10')[len('/usr/bin/python3 '):]))
    check(starting(slow), 'reload while starting: activating')
    mark = cursor()
    result = subprocess.run(['systemctl', 'reload', 'agent.service'], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=60)
    state = show('agent.service', 'ActiveState', 'SubState', 'MainPID', 'Result')
    log = journal_since(mark)
    print('  systemctl reload while activating: exit %d %r; then %s' % (result.returncode, result.stdout.strip(),
          state), flush=True)
    print('  ' + '\n  '.join(line for line in log.splitlines() if re.search('systemd.*(Start|Reload)', line)),
          flush=True)
    check(wait_until(lambda: show('agent.service', 'SubState')['SubState'] == 'running'),
          'reload while starting: running', (state, log))
    # systemd merges a reload into the start job under way: it returns once the unit is up,
    # and ExecReload never runs against an agent that has no pidfile yet.
    check(result.returncode == 0 and 'reloading (SIGHUP)' not in journal_since(mark),
          'reload while starting: waits for the start, no reload of its own', (result.stdout, journal_since(mark)))
    main = int(show('agent.service', 'MainPID')['MainPID'])
    check(read_pid() == main and len(children(main)) == 2 and fetch(url) == (200, small),
          'reload while starting: MainPID = pidfile, 2 workers, serves', (main, read_pid(), children(main)))
    sh('systemctl', 'stop', 'agent.service', timeout=30)
    check(starting(slow), 'stop while starting: activating')
    mark = cursor()
    sh('systemctl', 'stop', 'agent.service', timeout=30)
    state = show('agent.service', 'Result', 'ActiveState')
    log = journal_since(mark)
    check(state == {'Result': 'success', 'ActiveState': 'inactive'}, 'stop while starting: Result=success',
          (state, log))
    check('SIGKILL' not in log, 'stop while starting: no SIGKILL',
          [line for line in log.splitlines() if 'SIGKILL' in line] or log)
    remove_dropin(slow)

    print('security and journal', flush=True)
    out = sh('systemd-analyze', 'security', '--no-pager', 'agent.service', check=False)
    score = re.search(r'Overall exposure level for agent\.service: ([\d.]+) (\S+)', out)
    check(score is not None, 'systemd-analyze security agent.service',
          out[-300:])
    if score:
        print('  systemd-analyze security agent.service: %s %s' % (score.group(1), score.group(2)), flush=True)
    warnings = sh('journalctl', '--no-pager', '-p', 'warning', '-u', 'agent.service', '-u', 'agent.socket',
                  '-u', 'agentlsb.service', check=False)
    bad = [line for line in warnings.splitlines() if 'python3' in line or 'agent[' in line]
    # Everything but the crash that the test itself caused (a SIGKILLed master, once).
    everything = sh('journalctl', '--no-pager', '--cursor', before_crash, '--reverse', check=False) + \
        sh('journalctl', '--no-pager', '--after-cursor', after_crash, check=False)
    bad += [line for line in everything.splitlines()
            if re.search(r'not our child|Traceback|Killing process .*python3|status=9/KILL', line)]
    check(bad == [], 'journal: no warning from the agent', '\n'.join(bad[:10]))

    # Last: a watchdog timeout is a warning in the journal, on purpose.
    print('watchdog', flush=True)
    dropin = '/etc/systemd/system/agent.service.d/watchdog.conf'
    os.makedirs(os.path.dirname(dropin), exist_ok=True)
    with open(dropin, 'w') as f:
        f.write('[Service]\nWatchdogSec=2\nTimeoutAbortSec=3\n')
    sh('systemctl', 'daemon-reload')
    sh('systemctl', 'start', 'agent.service', timeout=60)
    state = show('agent.service', 'MainPID', 'NRestarts', 'WatchdogUSec')
    check(state['WatchdogUSec'] in ('2s', '2000000'), 'watchdog: WatchdogSec=2 in effect', state)
    time.sleep(5)
    now = show('agent.service', 'ActiveState', 'MainPID', 'NRestarts')
    check(now['ActiveState'] == 'active' and now['MainPID'] == state['MainPID']
          and now['NRestarts'] == state['NRestarts'], 'watchdog: fed for 5 s, no restart', now)
    mark = cursor()
    hung = int(state['MainPID'])
    os.kill(hung, signal.SIGSTOP)
    check(wait_until(lambda: show('agent.service', 'NRestarts')['NRestarts'] == str(int(state['NRestarts']) + 1)
                     and show('agent.service', 'SubState')['SubState'] == 'running', 30),
          'watchdog: a hung (stopped) master is restarted', show('agent.service', 'NRestarts', 'SubState'))
    check('Watchdog timeout' in journal_since(mark), 'watchdog: the journal says "Watchdog timeout"')
    check(wait_until(lambda: not harness.pid_alive(hung)), 'watchdog: the hung master is gone')
    check(wait_until(lambda: read_pid() == int(show('agent.service', 'MainPID')['MainPID'])),
          'watchdog: MainPID = pidfile')
    check(fetch(url) == (200, small), 'watchdog: serves after the restart')

    # Also last (a warning on purpose): the journal files the agent's warnings and errors as
    # such (<4>, <3> on its stream), so `journalctl -p warning` and `systemctl status` show them.
    print('journal priorities', flush=True)
    mark = cursor()
    main = int(show('agent.service', 'MainPID')['MainPID'])
    os.kill(children(main)[0], signal.SIGKILL)
    def died():
        """The journal's entries (PRIORITY, MESSAGE) of the agent since mark that say 'died'
        (journalctl -p with -u matches more than the unit's lines: the fields are read instead)."""
        out = sh('journalctl', '--no-pager', '-o', 'json', '--after-cursor', mark, '-u', 'agent.service',
                 check=False)
        entries = [json.loads(line) for line in out.splitlines() if line.startswith('{')]
        return [(e.get('PRIORITY'), e.get('MESSAGE')) for e in entries
                if isinstance(e.get('MESSAGE'), str) and 'died (killed by SIGKILL)' in e['MESSAGE']]
    check(wait_until(lambda: died()), 'journal: the worker\'s death logged', died())
    check([p for p, _ in died()] == ['4'] and not re.match(r'<\d>', died()[0][1]),
          'journal: a dead worker is a warning (PRIORITY=4, prefix stripped)', died())
    sh('systemctl', 'stop', 'agent.service', timeout=30)
    os.remove(dropin)
    sh('systemctl', 'daemon-reload')

    # Also last (errors on purpose): a reload that fails -- here a certificate that does not
    # parse -- fails `systemctl reload` (ExecReload waits for the agent's verdict), and the
    # service goes on as it was, on its old certificate.
    print('a reload that fails', flush=True)
    sh('install', '-d', '-o', 'root', '-g', 'agent', '-m', '750', '/etc/agent/tls')
    for name in ('tls.crt', 'tls.key'):
        sh('install', '-o', 'agent', '-g', 'agent', '-m', '600', '/root/' + name, '/etc/agent/tls/' + name)
    tls_dropin = '/etc/systemd/system/agent.service.d/tls.conf'
    with open(tls_dropin, 'w') as f:
        f.write('[Service]\nExecStart=\nExecStart=/usr/bin/python3 /opt/agent/agent.py --root /srv/images '
                '--bind 127.0.0.1 --port 9443 --tls-cert /etc/agent/tls/tls.crt --tls-key '
                '/etc/agent/tls/tls.key --pidfile /run/agent/agent.pid --access-log '
                '/var/log/agent/access.log run\nReadOnlyPaths=/etc/agent/tls\n')
    sh('systemctl', 'daemon-reload')
    sh('systemctl', 'start', 'agent.service', timeout=60)
    https = ['curl', '-s', '-k', '-o', '/dev/null', '-w', '%{http_code}', 'https://127.0.0.1:9443/small.jpg']
    check(sh(*https, check=False) == '200', 'tls: serves HTTPS')
    main = int(show('agent.service', 'MainPID')['MainPID'])
    workers, mark = children(main), cursor()
    with open('/etc/agent/tls/tls.crt', 'w') as f:
        f.write('not a certificate\n')
    result = subprocess.run(['systemctl', 'reload', 'agent.service'], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=60)
    check(result.returncode != 0, 'failed reload: systemctl reload fails', result.stdout)
    state = show('agent.service', 'ActiveState', 'SubState', 'MainPID')
    check(state['SubState'] == 'running' and int(state['MainPID']) == main,
          'failed reload: still running, same MainPID', state)
    check(children(main) == workers, 'failed reload: the old workers go on', (workers, children(main)))
    check(sh(*https, check=False) == '200', 'failed reload: still serves HTTPS')
    out = sh('journalctl', '--no-pager', '-o', 'json', '--after-cursor', mark, '-u', 'agent.service')
    entries = [json.loads(line) for line in out.splitlines() if line.startswith('{')]
    said = [(e.get('PRIORITY'), e.get('MESSAGE')) for e in entries if isinstance(e.get('MESSAGE'), str)
            and 'reload failed: TLS certificate /etc/agent/tls/tls.crt' in e['MESSAGE']]
    check([p for p, _ in said][:1] == ['3'], 'failed reload: an error in the journal, naming the file', said)
    sh('install', '-o', 'agent', '-g', 'agent', '-m', '600', '/root/tls.crt', '/etc/agent/tls/tls.crt')
    result = subprocess.run(['systemctl', 'reload', 'agent.service'], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=60)
    check(result.returncode == 0, 'fixed, reloaded: systemctl reload succeeds', result.stdout)
    check(wait_until(lambda: not set(workers) & set(children(main)) and len(children(main)) == 2),
          'fixed, reloaded: workers replaced', children(main))
    check(sh(*https, check=False) == '200', 'fixed, reloaded: serves HTTPS')
    sh('systemctl', 'stop', 'agent.service', timeout=30)
    os.remove(tls_dropin)
    sh('systemctl', 'daemon-reload')

    # Also last (a warning on purpose: 'did not finish in time; killing it').
    print('stop with a download longer than --stop-timeout', flush=True)
    short = add_dropin('stoptimeout.conf', 'ExecStart=\nExecStart=%s\n' % (RUN % '--stop-timeout 2'))
    sh('systemctl', 'start', 'agent.service', timeout=60)
    mark = cursor()
    out = tempfile.NamedTemporaryFile(delete=False)
    # 64 MB at 4 MB/s: more than the socket buffers hold (loopback's take several MB, and an
    # 8 MB file is then all sent, in them, before the stop), and longer than 2 s.
    proc = subprocess.Popen(['curl', '-s', '--limit-rate', '4M', '-o', out.name,
                             'http://127.0.0.1:9085/huge.jpg'], stderr=subprocess.PIPE)
    wait_until(lambda: os.path.getsize(out.name) > 0)
    began = time.monotonic()
    sh('systemctl', 'stop', 'agent.service', timeout=30)
    took = time.monotonic() - began
    proc.wait(30)
    with open(out.name, 'rb') as f, open('/srv/images/huge.jpg', 'rb') as g:
        got, whole = f.read(), g.read()
    os.remove(out.name)
    print('  systemctl stop with --stop-timeout 2: %.1f s, %d of %d bytes sent' % (took, len(got), len(whole)),
          flush=True)
    # Timeouts are checked once a second (up to 1 s late); far below TimeoutStopSec=15 anyway.
    check(took < 2 + 1 + 2, 'stop-timeout: the stop takes --stop-timeout, not TimeoutStopSec', took)
    check(proc.returncode != 0 and 0 < len(got) < len(whole) and whole.startswith(got),
          'stop-timeout: the download is cut (a prefix of the file)', (proc.returncode, len(got)))
    state = show('agent.service', 'Result', 'ActiveState')
    check(state == {'Result': 'success', 'ActiveState': 'inactive'}, 'stop-timeout: Result=success', state)
    log = journal_since(mark)
    check('SIGKILL' not in log and 'not our child' not in log, 'stop-timeout: no SIGKILL in the journal', log)
    remove_dropin(short)

    # Also last (warnings on purpose): out of descriptors.
    print('LimitNOFILE=64', flush=True)
    nofile = add_dropin('nofile.conf', 'LimitNOFILE=64\n')
    sh('systemctl', 'start', 'agent.service', timeout=60)
    state = show('agent.service', 'MainPID', 'NRestarts')
    check(fetch(url) == (200, small), 'nofile: starts and serves')
    mark = cursor()
    held = []
    try:
        for _ in range(160):        # more than the two workers' 64 descriptors each
            conn = socket.create_connection(('127.0.0.1', 9085), timeout=5)
            conn.sendall(b'GET /small.jpg HTTP/1.1\r\nHost: x\r\n')     # a head never finished
            held.append(conn)
        check(wait_until(lambda: entries_since(mark, 'Too many open files')),
              'nofile: out of descriptors, the journal says so')
        # One client holds every descriptor with heads it never ends: it gives up its slowest
        # for a newcomer (Worker.crowding), so a request is answered while they are held: the
        # file, or (no descriptor left to open it) 503 with Retry-After; never a wait.
        try:
            answer = fetch(url)[0], None
        except urllib.error.HTTPError as exc:
            answer = exc.code, exc.headers.get('Retry-After')
        check(answer in ((200, None), (503, '1')), 'nofile: answered while the connections are held', answer)
        time.sleep(3)       # a few seconds of it, while the connections are held
        for conn in held:
            conn.close()
        held = []
        check(fetch(url) == (200, small), 'nofile: serves once the connections are gone')
    finally:
        for conn in held:
            conn.close()
    said = entries_since(mark, 'Too many open files')
    print('  with LimitNOFILE=64 and 160 held connections: %d warning line(s)' % len(said), flush=True)
    check(1 <= len(said) <= 4, 'nofile: a warning or two per worker, not one a connection or a second', said)
    now = show('agent.service', 'MainPID', 'NRestarts', 'SubState')
    check(now['MainPID'] == state['MainPID'] and now['NRestarts'] == state['NRestarts']
          and now['SubState'] == 'running' and not entries_since(mark, 'died'),
          'nofile: no crash, no restart', now)
    sh('systemctl', 'stop', 'agent.service', timeout=30)
    remove_dropin(nofile)

    print('inside: %d failure(s)%s' % (len(failures), (': ' + '; '.join(failures)) if failures else ''), flush=True)
    return 1 if failures else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--tree', default=TREE, help='the cached bookworm tree (default: %s)' % TREE)
    p.add_argument('--inside', action='store_true', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inside:
        try:
            return inside_main()
        except Exception as exc:
            import traceback
            traceback.print_exc()
            print('inside: aborted: %r' % exc, flush=True)
            return 1
    started = time.monotonic()
    try:
        code = host_main(args)
    except CannotRun as exc:
        say('CANNOT RUN: %s' % exc)
        return CANNOT_RUN
    say('%s in %.0f s' % ('passed' if code == 0 else 'FAILED', time.monotonic() - started))
    return code


if __name__ == '__main__':
    sys.exit(main())
