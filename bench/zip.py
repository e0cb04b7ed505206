#!/usr/bin/env python3
"""The album as one download: FOLDER/?download=zip against the same files one by one, one run.

One agent (1 worker, so the second zip finds the CRCs its first one read) serves a folder of
--files photos of --size MB (random bytes: a photo does not compress, and neither does this) on
127.0.0.1.  Over one keep-alive connection, each measured --repeat times (median):
  zip, first     the zip as a browser downloads it: every file read once more for its CRC,
                 then sent by sendfile (the first repeat only: later ones find the CRCs kept)
  zip, again     the same zip with the CRCs kept: headers and sendfile alone
  one by one     GET of each file in turn, as a client that fetches the files itself would
Throughput is the body bytes over the wall time, with the client reading in 1 MiB buffers; the
agent worker's CPU time is read from /proc.  The CPU model is printed with the figures.

    python3 bench/zip.py                  # 100 files of 4 MB
    python3 bench/zip.py --quick          # 30 files of 1 MB (CI size)
"""

import argparse
import os
import socket
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402
from parsers import cpu_model  # noqa: E402


def cpu_seconds(pid):
    """User + system CPU seconds of a process, from /proc/PID/stat."""
    with open('/proc/%d/stat' % pid) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def read_body(sock, buf, length):
    view = memoryview(buf)
    left = length
    while left:
        n = sock.recv_into(view, min(left, len(buf)))
        if not n:
            raise ConnectionError('closed with %d bytes left' % left)
        left -= n


def get(sock, buf, target):
    """One GET on a keep-alive connection: the body's length (the body read and dropped)."""
    sock.sendall(b'GET %s HTTP/1.1\r\nHost: x\r\n\r\n' % target.encode('ascii'))
    head = b''
    while b'\r\n\r\n' not in head:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError('closed before a head')
        head += data
    head, _, rest = head.partition(b'\r\n\r\n')
    if not head.startswith(b'HTTP/1.1 200 '):
        raise RuntimeError('%s: %r' % (target, head.split(b'\r\n')[0]))
    length = int([line.split(b':', 1)[1] for line in head.split(b'\r\n')
                  if line.lower().startswith(b'content-length:')][0])
    read_body(sock, buf, length - len(rest))
    return length


def timed(agent, worker, run):
    """(seconds, bytes, worker CPU seconds) of run(sock, buf) on a new connection."""
    sock = socket.create_connection(('127.0.0.1', agent.port), timeout=120)
    buf = bytearray(1 << 20)
    try:
        cpu = cpu_seconds(worker)
        started = time.perf_counter()
        total = run(sock, buf)
        return time.perf_counter() - started, total, cpu_seconds(worker) - cpu
    finally:
        sock.close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--files', type=int, default=100)
    p.add_argument('--size', type=float, default=4.0, help='MB a file (default 4)')
    p.add_argument('--repeat', type=int, default=5)
    p.add_argument('--quick', action='store_true', help='30 files of 1 MB, 3 repeats')
    args = p.parse_args(argv)
    if args.quick:
        args.files, args.size, args.repeat = 30, 1.0, 3
    with harness.AgentProcess(workers=1) as agent:
        folder = os.path.join(agent.root, 'album')
        os.makedirs(folder)
        names = ['IMG_%04d.jpg' % i for i in range(args.files)]
        for name in names:
            with open(os.path.join(folder, name), 'wb') as f:
                f.write(os.urandom(int(args.size * 1e6)))
        agent.start()
        worker = agent.workers()[0]
        zip_run = lambda sock, buf: get(sock, buf, '/album/?download=zip')     # noqa: E731
        files_run = lambda sock, buf: sum(get(sock, buf, '/album/' + n) for n in names)  # noqa: E731
        results = {'zip, first': [timed(agent, worker, zip_run)]}
        results['zip, again'] = [timed(agent, worker, zip_run) for _ in range(args.repeat)]
        results['one by one'] = [timed(agent, worker, files_run) for _ in range(args.repeat)]
        print('zip of a folder against its files one by one: %d files of %.1f MB, 1 worker, 127.0.0.1'
              % (args.files, args.size))
        print('cpu: %s, nproc %s; Python %s' % (cpu_model(), os.cpu_count(), sys.version.split()[0]))
        print('%-12s %10s %10s %10s %14s' % ('', 'MB', 'seconds', 'MB/s', 'worker CPU s'))
        for label, runs in results.items():
            seconds = statistics.median(r[0] for r in runs)
            size = runs[0][1]
            cpu = statistics.median(r[2] for r in runs)
            print('%-12s %10.1f %10.3f %10.0f %14.3f' % (label, size / 1e6, seconds, size / 1e6 / seconds, cpu))
        bad = agent.bad_log_lines()
        if bad:
            print('FAIL: the agent logged: %s' % bad[:3])
            return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
