#!/usr/bin/env python3
"""One client's latency while others flood pipelined gallery requests: agent.py beside nginx.

The README promises that one client never stops the agent from serving the others (issue 26,
item 3).  This measures it.  Both servers serve the same folder on 127.0.0.1: small.jpg (1 KB)
and big/, 5,000 files.  For each server in turn (interleaved, --rounds rounds):

  flood   --conns connections (a separate process), each sending one packet of --depth
          pipelined requests for /big/ (the agent's gallery page, nginx's autoindex), reading
          every answer, then the next packet, for --seconds.  Two mixes: HEADs alone (the
          issue's case), and HEADs with a GET in every 4 (nginx's GET is the whole listing of
          5,000 names, chunked: its costly case; the agent's is a page of 200)
  probe   one keep-alive connection of this process: GET /small.jpg, then --gap ms of rest,
          the time to each whole response recorded

and prints, per mix, server and round, the probe's p50, p99 and max and the flood's responses
per second; then the agent's p99 as a multiple of nginx's (median of the rounds; target: 1.5x
at most).  --agent PATH measures another agent.py (an older commit) in the same way.  nginx runs with 2 workers and `autoindex on`, from its own config in a temporary
directory; the agent with 2 workers and its defaults (access logs on for both).

    python3 bench/flood.py                  # make bench: 3 rounds of 6 s
    python3 bench/flood.py --quick          # 1 round of 3 s

Needs /usr/sbin/nginx (Debian nginx-light); without it the agent runs alone and no ratio is
printed.  Everything started here is stopped on exit, on error and on Ctrl-C.  Standard library
only.
"""

import argparse
import multiprocessing
import os
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness      # noqa: E402

HOST = '127.0.0.1'
NGINX = '/usr/sbin/nginx'
FILES = 5000
STATUS = b'HTTP/1.1 200'


def cpu_model():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return '%s, %d CPUs' % (line.split(':', 1)[1].strip(), os.cpu_count())
    except OSError:
        pass
    return 'unknown, %d CPUs' % os.cpu_count()


def make_root(directory):
    root = os.path.join(directory, 'www')
    big = os.path.join(root, 'big')
    os.makedirs(big)
    with open(os.path.join(root, 'small.jpg'), 'wb') as f:
        f.write(os.urandom(1024))
    for i in range(FILES):
        with open(os.path.join(big, 'photo-%05d.jpg' % i), 'wb') as f:
            f.write(b'\xff\xd8\xff' + os.urandom(i % 200))
    return root


class Nginx:
    """nginx with 2 workers and autoindex on, from a config of its own in directory."""

    def __init__(self, directory, root):
        self.dir = directory
        self.root = root
        self.port = harness.free_port()
        self.proc = None

    def start(self):
        d = self.dir
        user = 'user root;\n' if os.geteuid() == 0 else ''
        temps = ''.join('    %s_temp_path %s/%s;\n' % (k, d, k)
                        for k in ('client_body', 'proxy', 'fastcgi', 'uwsgi', 'scgi'))
        conf = os.path.join(d, 'nginx.conf')
        with open(conf, 'w') as f:
            f.write('%sdaemon off;\nmaster_process on;\nworker_processes 2;\npid %s/nginx.pid;\n'
                    'error_log %s/nginx-error.log;\nevents { worker_connections 4096; }\n'
                    'http {\n    types { image/jpeg jpg; }\n    access_log %s/nginx-access.log;\n'
                    '    sendfile on;\n    keepalive_requests 1000000;\n%s'
                    '    server {\n        listen %s:%d;\n        root %s;\n        autoindex on;\n'
                    '    }\n}\n' % (user, d, d, d, temps, HOST, self.port, self.root))
        self.proc = subprocess.Popen([NGINX, '-c', conf, '-p', d + '/'], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        self.stop()
        raise RuntimeError('nginx did not start (see %s/nginx-error.log)' % d)

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except OSError:
                pass
            try:
                self.proc.wait(timeout=5)
                return
            except subprocess.TimeoutExpired:
                continue


def flood(port, conns, depth, get_every, seconds, answered):
    """The flooders, in a process of their own: conns connections, each a packet of depth
    pipelined requests at a time (a GET in every get_every, if not 0, else HEADs), until
    seconds have passed; answered counts the responses."""
    packet = b''.join(harness.raw_request('/big/', method='GET' if get_every and i % get_every == get_every - 1
                                          else 'HEAD') for i in range(depth))
    selector = selectors.DefaultSelector()
    waiting = {}

    def open_one():
        sock = socket.create_connection((HOST, port), timeout=10)
        sock.sendall(packet)
        sock.setblocking(False)
        waiting[sock] = [depth, b'']
        selector.register(sock, selectors.EVENT_READ)

    for _ in range(conns):
        open_one()
    ends = time.monotonic() + seconds
    count = 0
    while time.monotonic() < ends:
        for key, _ in selector.select(0.1):
            sock = key.fileobj
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                continue
            except OSError:
                data = b''
            state = waiting[sock]
            if not data:                # closed (a limit of the server's): a new connection
                selector.unregister(sock)
                del waiting[sock]
                sock.close()
                open_one()
                continue
            seen = (state[1] + data).count(STATUS)      # the tail is shorter than STATUS
            state[0] -= seen
            count += seen
            state[1] = data[-(len(STATUS) - 1):]
            if state[0] <= 0:
                state[0] = depth
                sock.setblocking(True)
                sock.sendall(packet)
                sock.setblocking(False)
    answered.value = count
    for sock in waiting:
        sock.close()


def probe(port, seconds, gap):
    """Latencies (s) of GET /small.jpg on one keep-alive connection, one every gap seconds."""
    request = harness.raw_request('/small.jpg')
    sock = socket.create_connection((HOST, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    ends = time.monotonic() + seconds
    try:
        while time.monotonic() < ends:
            started = time.monotonic()
            sock.sendall(request)
            data = b''
            while b'\r\n\r\n' not in data:
                data += recv(sock)
            head, _, body = data.partition(b'\r\n\r\n')
            length = int(head.lower().split(b'content-length:')[1].split(b'\r\n')[0])
            while len(body) < length:
                body += recv(sock)
            times.append(time.monotonic() - started)
            time.sleep(gap)
    finally:
        sock.close()
    return times


def recv(sock):
    data = sock.recv(65536)
    if not data:
        raise RuntimeError('the probe connection was closed')
    return data


def measure(port, get_every, args):
    answered = multiprocessing.Value('q', 0)
    flooder = multiprocessing.Process(target=flood, args=(port, args.conns, args.depth, get_every,
                                                          args.seconds + 1.5, answered))
    flooder.start()
    try:
        time.sleep(1.0)                 # the flood under way
        times = probe(port, args.seconds, args.gap / 1000.0)
        flooder.join(30)
    finally:
        if flooder.is_alive():
            flooder.terminate()
            flooder.join(5)
    times.sort()
    return {'p50': harness.percentile(times, 0.5) * 1000, 'p99': harness.percentile(times, 0.99) * 1000,
            'max': times[-1] * 1000, 'n': len(times), 'flood': answered.value / (args.seconds + 1.5)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--conns', type=int, default=8, help='flooding connections (8)')
    parser.add_argument('--depth', type=int, default=200, help='pipelined requests a packet (200)')
    parser.add_argument('--seconds', type=float, default=6.0, help='probe time a run (6)')
    parser.add_argument('--gap', type=float, default=10.0, help='ms between probe requests (10)')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--quick', action='store_true', help='1 round of 3 s')
    parser.add_argument('--agent', help='the agent.py to measure (default: this one)')
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 1, 3.0
    workdir = tempfile.mkdtemp(prefix='agent-flood-')
    servers = []
    try:
        root = make_root(workdir)
        agent = harness.AgentProcess(root=root, workers=2, prefix='agent-flood-', agent=args.agent).start()
        servers.append(('agent', agent))
        if os.path.exists(NGINX):
            nginx_dir = os.path.join(workdir, 'nginx')
            os.mkdir(nginx_dir)
            servers.append(('nginx', Nginx(nginx_dir, root).start()))
        else:
            print('nginx: not installed (apt-get install nginx-light): the agent alone')
        print('cpu: %s' % cpu_model())
        print('agent: %s' % (args.agent or harness.AGENT))
        print('flood: %d connections x %d pipelined requests a packet for /big/ (%d files); '
              'probe: GET /small.jpg (1 KB) every %g ms for %g s; %d round(s), load average %.1f'
              % (args.conns, args.depth, FILES, args.gap, args.seconds, args.rounds, os.getloadavg()[0]))
        for mix, get_every in (('HEAD', 0), ('HEAD+GET', 4)):
            print('\n%-8s %-6s %5s %9s %9s %9s %6s %12s' % ('flood', 'server', 'round', 'p50 ms', 'p99 ms',
                                                         'max ms', 'n', 'flood resp/s'))
            p99s = {name: [] for name, _ in servers}
            for round_ in range(1, args.rounds + 1):
                for name, server in servers:
                    r = measure(server.port, get_every, args)
                    p99s[name].append(r['p99'])
                    print('%-8s %-6s %5d %9.2f %9.2f %9.2f %6d %12.0f' % (
                        mix, name, round_, r['p50'], r['p99'], r['max'], r['n'], r['flood']), flush=True)
            if 'nginx' in p99s:
                ratio = statistics.median(p99s['agent']) / statistics.median(p99s['nginx'])
                print('%s: agent p99 / nginx p99 (medians of the rounds): %.2fx (target: 1.5x at most)'
                      % (mix, ratio))
        bad = agent.bad_log_lines()
        for line in bad[:5]:
            print('agent log: ' + line)
        return 1 if bad else 0
    finally:
        for _, server in servers:
            server.stop()
        if servers:
            servers[0][1].cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
