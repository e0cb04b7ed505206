#!/usr/bin/env python3
"""The unit suite under the Pythons people run: 3.9, 3.13, 3.14 and this machine's own.

    python3 bench/pythons.py             # or: make pythons   (root; a few minutes a tree, and
                                         #  once about a minute more a tree to build it)
    python3 bench/pythons.py 3.9 host    # only these (a version, a suite name, or host)
    python3 bench/pythons.py -W error    # PYTHONWARNINGS=error for the suite and its agents

The card promises Python 3.9+, and what an interpreter does differs in ways no syntax check sees
(3.13's ssl verifies certificates strictly, 3.9 has no sys.orig_argv).  Each version is the
python3 of a Debian release, in a tree made once with `debootstrap --variant=minbase` and kept
in /var/cache/agent-pythons/SUITE (--cache; a stamp with the package list marks a finished
tree, so one left half-made by an interrupted build is made again):

    bullseye (Debian 11)   3.9
    trixie   (Debian 13)   3.13
    forky    (Debian 14)   3.14

and then this machine's own interpreter (sys.executable, "host").  The trees hold python3,
openssl, curl and procps, nothing else: the tests of other tools (systemd, logrotate, wrk,
chromium...) skip, saying so.  Each run is `python3 test_daemon.py` (its 4 processes) in a copy
of the project, chrooted in the tree, in a mount namespace of its own (unshare) where /proc,
/sys, /dev (with /dev/pts) and a fresh tmpfs on /tmp are mounted: they go when the namespace's
last process ends, on failure too, and the cached tree is left as it was made.  Processes the
suite left in the tree are killed at the end.

Each interpreter's closing line is printed with its version, then all of them once more:

    pythons: python 3.9.2 (bullseye): 402 passed, 0 failed, 3 skipped

Exit status: 0 every suite passed, 1 one failed, 77 this machine cannot run them (not root, no
debootstrap, unshare or chroot, no Debian mirror: the reason is printed).
"""

import argparse
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)
CANNOT_RUN = 77
CACHE = '/var/cache/agent-pythons'
MIRROR = 'http://deb.debian.org/debian'
TREES = [('bullseye', '3.9'), ('trixie', '3.13'), ('forky', '3.14')]
PACKAGES = ['python3', 'openssl', 'curl', 'procps']
STAMP = '.agent-pythons'
SUITE_TIMEOUT = 900             # seconds for one suite; it takes one or two
CLOSING_LINE = re.compile(r'^(\d+) passed, (\d+) failed, (\d+) skipped$', re.M)
HOSTS = '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n'
PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'


class CannotRun(Exception):
    pass


def say(message):
    print('pythons: %s' % message, flush=True)


def tool(name):
    return shutil.which(name, path=os.environ.get('PATH', '') + ':/usr/sbin:/sbin')


def preflight():
    if os.geteuid() != 0:
        raise CannotRun('needs root (debootstrap, mount, chroot)')
    for name in ('debootstrap', 'unshare', 'chroot', 'mount'):
        if not tool(name):
            raise CannotRun('%s is not installed (Debian: debootstrap, util-linux, coreutils)' % name)


def debian_mirror():
    """The first Debian archive in this machine's apt sources (not -security), or deb.debian.org."""
    uris = []
    for path in sorted(glob.glob('/etc/apt/sources.list.d/*.sources')):
        with open(path) as f:
            uris += re.findall(r'(?m)^URIs:\s*(\S+)', f.read())
    for path in ['/etc/apt/sources.list'] + sorted(glob.glob('/etc/apt/sources.list.d/*.list')):
        try:
            with open(path) as f:
                for line in f:
                    words = [w for w in line.split('#', 1)[0].split() if not w.startswith('[')]
                    if len(words) >= 3 and words[0] == 'deb':
                        uris.append(words[1])
        except OSError:
            pass
    return next((uri for uri in uris if uri.rstrip('/').endswith('/debian')), MIRROR)


def build_tree(tree, suite, mirror):
    """debootstrap the tree once; the stamp (suite and packages) says it is complete."""
    wanted = '%s %s' % (suite, ' '.join(PACKAGES))
    try:
        with open(os.path.join(tree, STAMP)) as f:
            if f.read().strip() == wanted:
                return False
    except OSError:
        pass
    say('building %s with debootstrap %s from %s (once; cached afterwards)' % (tree, suite, mirror))
    partial = tree + '.partial'
    subprocess.run(['rm', '-rf', partial, tree], check=True)
    os.makedirs(os.path.dirname(tree), exist_ok=True)
    command = ['debootstrap', '--variant=minbase', '--include=' + ','.join(PACKAGES), suite, partial, mirror]
    if not os.path.exists('/usr/share/debootstrap/scripts/' + suite):
        # A debootstrap older than the release (bookworm's knows no forky): the unstable script
        # fits every release since bullseye.
        command.append('/usr/share/debootstrap/scripts/sid')
    started = time.monotonic()
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        subprocess.run(['rm', '-rf', partial])
        raise CannotRun('debootstrap %s failed (%d): %s' % (suite, result.returncode, result.stdout.strip()[-800:]))
    # What an installed system has and debootstrap does not write: without it `localhost`
    # does not resolve (curl's TLS test named it).
    with open(os.path.join(partial, 'etc/hosts'), 'w') as f:
        f.write(HOSTS)
    with open(os.path.join(partial, STAMP), 'w') as f:
        f.write(wanted + '\n')
    os.rename(partial, tree)
    say('built %s in %.0f s' % (tree, time.monotonic() - started))
    return True


def copy_project(into):
    """The project's files, not its git directory or caches."""
    shutil.copytree(PROJECT, into, symlinks=True,
                    ignore=shutil.ignore_patterns('.git', '__pycache__', '*.pyc', 'artifacts'))


def leftovers(root):
    """Pids of processes whose root directory is the tree (what the suite left running)."""
    pids = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                if os.readlink('/proc/%s/root' % entry) == root:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def run_suite(command, label, env=None):
    """Run command, its output through to ours; (closing line or None, return code).  Killed
    (its process group) if it has not ended after SUITE_TIMEOUT."""
    say('%s: running the suite' % label)
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors='replace', start_new_session=True, env=env)
    timer = threading.Timer(SUITE_TIMEOUT, os.killpg, (proc.pid, signal.SIGKILL))
    timer.start()
    tail = []
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            tail = (tail + [line])[-5:]
        code = proc.wait()
    finally:
        timer.cancel()
        sys.stdout.flush()
    if code == -signal.SIGKILL:
        say('%s: no end after %d s: killed' % (label, SUITE_TIMEOUT))
    found = CLOSING_LINE.findall(''.join(tail))
    return ('%s passed, %s failed, %s skipped' % found[-1]) if found else None, code


def python_version(prefix):
    result = subprocess.run(prefix + ['python3', '-c', 'import platform; print(platform.python_version())'],
                            capture_output=True, text=True)
    return result.stdout.strip() or '(no python3: %s)' % result.stderr.strip()[-200:]


def in_tree(cache, suite, mirror, warnings=None):
    """Build the tree if need be, run the suite in it: (interpreter label, closing line, code)."""
    tree = os.path.join(cache, suite)
    build_tree(tree, suite, mirror)
    # The project goes in through a host directory bound onto the tree's tmpfs /tmp.
    staging = tempfile.mkdtemp(prefix='agent-pythons-')
    try:
        copy_project(os.path.join(staging, 'agent'))
        version = python_version(['chroot', tree])
        label = 'python %s (%s)' % (version, suite)
        script = ('set -e; t="$1"; s="$2"\n'
                  'mount -t proc proc "$t/proc"; mount -t sysfs sysfs "$t/sys"\n'
                  'mount --rbind /dev "$t/dev"; mount -t tmpfs -o mode=1777 tmpfs "$t/tmp"\n'
                  'mkdir "$t/tmp/agent"; mount --bind "$s/agent" "$t/tmp/agent"\n'
                  'exec chroot "$t" env -i PATH=%s HOME=/root LANG=C.UTF-8 TMPDIR=/tmp %s'
                  'sh -c "cd /tmp/agent && exec python3 test_daemon.py"\n'
                  % (PATH, 'PYTHONWARNINGS=%s ' % warnings if warnings else ''))
        line, code = run_suite(['unshare', '--mount', '--propagation', 'private', 'sh', '-c', script,
                                'pythons', tree, staging], label)
        stray = leftovers(os.path.realpath(tree))
        if stray:
            say('%s: the suite left %d process(es) in the tree: killed %s' % (label, len(stray), stray))
            for pid in stray:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            code = code or 1
        return label, line, code
    finally:
        subprocess.run(['rm', '-rf', staging])


def on_host(warnings=None):
    env = dict(os.environ, PYTHONWARNINGS=warnings) if warnings else None
    label = 'python %s (this machine)' % '.'.join(map(str, sys.version_info[:3]))
    line, code = run_suite([sys.executable, os.path.join(PROJECT, 'test_daemon.py')], label, env)
    return label, line, code


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('which', nargs='*', help='versions or suites to run (3.9, trixie, host...); default all')
    p.add_argument('--cache', default=CACHE, help='where the trees are kept (default: %s)' % CACHE)
    p.add_argument('--mirror', help='the Debian archive for debootstrap (default: from /etc/apt, or %s)' % MIRROR)
    p.add_argument('-W', metavar='ACTION', help='PYTHONWARNINGS for the suite and every agent it starts '
                   '(-W error: a warning of 3.12+, a deprecation or a fork with threads, fails its test)')
    args = p.parse_args()
    wanted = set(args.which)
    unknown = wanted - {'host'} - {name for tree in TREES for name in tree}
    if unknown:
        p.error('no such Python or suite: %s (these: %s, host)'
                % (', '.join(sorted(unknown)), ', '.join('%s (%s)' % (v, s) for s, v in TREES)))
    trees = [(suite, version) for suite, version in TREES if not wanted or wanted & {suite, version}]
    host = not wanted or 'host' in wanted
    results, cannot = [], []
    started = time.monotonic()
    if trees:
        try:
            preflight()
        except CannotRun as exc:
            cannot.append('every tree: %s' % exc)
            trees = []
    mirror = args.mirror or (debian_mirror() if trees else MIRROR)
    for suite, version in trees:
        try:
            results.append(in_tree(args.cache, suite, mirror, args.W))
        except CannotRun as exc:
            cannot.append('%s (%s): %s' % (version, suite, exc))
    if host:
        results.append(on_host(args.W))
    failed = 0
    for label, line, code in results:
        ok = code == 0 and line is not None and ', 0 failed,' in line
        failed += not ok
        say('%s: %s%s' % (label, line or 'no closing line', '' if ok else '  <- FAILED (exit %s)' % code))
    for reason in cannot:
        say('CANNOT RUN %s' % reason)
    say('%s in %.0f s' % ('FAILED' if failed else 'passed' if not cannot else 'incomplete',
                          time.monotonic() - started))
    return 1 if failed else CANNOT_RUN if cannot else 0


if __name__ == '__main__':
    sys.exit(main())
