#!/usr/bin/env python3
"""Three agents behind a real HAProxy, then behind nginx (issue 23): what a site that outgrows
one machine runs.  contrib/haproxy.cfg and contrib/nginx-proxy.conf are run as they are, but for
their addresses (rewritten here, each rewrite checked to have happened).

What it proves, each check a PASS or FAIL line with its figures (exit 0 only if every one
passes; exit 77 naming the tool where haproxy or nginx is missing):
  HAProxy, PROXY protocol v2 to three agents on `cp -a` copies of one folder, health checks on
  --health /healthz:
    * the same ETag for a file and the same gallery ETag from every node (through HAProxy,
      round-robin, each node's access log showing it answered);
    * N conditional GETs through HAProxy are N 304s, N If-Range resumes N 206s with the right
      bytes, N gallery revalidations N 304s;
    * the client's own address (it connects from 127.0.0.7) in each node's access log, never
      HAProxy's (127.0.0.2);
    * steady load (3 keep-alive clients, a request each 10 ms at most) while each node in turn is stopped and started,
      upgraded (`agent.py upgrade`) and reloaded: every response a 200, none failed;
    * all three nodes UP at the end (HAProxy's stats socket, `show stat`).
  HAProxy in `mode tcp` passing TLS through to three HTTPS agents with PROXY v2 (the example
  commented at the end of contrib/haproxy.cfg), health checks over TLS after their own header:
    * every node UP; N GETs over TLS through HAProxy, each verified against the nodes'
      certificate, each a 200 with the right bytes, answered by every node;
    * the client's own address in each node's access log, never HAProxy's;
    * (not with --quick) the same rolling stop/start, upgrade and reload under load, over TLS,
      every response a 200; all three nodes UP at the end.
  nginx, X-Forwarded-For to three agents (--trusted-proxy nginx's address):
    * the same validators, 304s and 206s, the client's address in each node's log;
    * a client that forges X-Forwarded-For straight to a node is logged as itself, and so is
      one that forges it through nginx;
    * the same rolling stop/start, upgrade and reload under load, every response a 200.
Loopback only: the clients, the proxies (their source addresses 127.0.0.2 and .3) and the
agents; ports the kernel called free; everything in a temporary directory; every process
stopped at the end, on failure too.

    python3 bench/balancer.py [--quick] [--only haproxy|haproxy-tls|nginx] [--keep]
--quick (CI, `make balancer-ci`): 30 conditional GETs of each kind and one round of the rolling
operations; the full run (`make balancer`): 300, and two rounds.
"""

import argparse
import collections
import functools
import http.client
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

from harness import REPO, AgentProcess, free_port

CLIENT = '127.0.0.7'            # the client: what each node's log must show
FORGER = '127.0.0.9'            # a client that writes X-Forwarded-For itself
HAPROXY_SOURCE = '127.0.0.2'    # HAProxy's address as the nodes see it (its `source`)
NGINX_SOURCE = '127.0.0.3'      # nginx's (proxy_bind)
NODES = 3
GRACE = 3                       # --stop-grace: contrib/haproxy.cfg takes a node out within 3 s
WAIT = 30.0                     # seconds for anything to happen (a node UP, a proxy listening)
PACE = 0.01                     # each load client's pause between requests: steady, not a flood
                                # that would slow every start and upgrade on a 2-CPU machine


class Failed(Exception):
    pass


class Checks:
    def __init__(self):
        self.results = []

    def check(self, name, ok, figures):
        self.results.append((name, bool(ok)))
        print('%s  %s: %s' % ('PASS' if ok else 'FAIL', name, figures), flush=True)

    def passed(self):
        return all(ok for _, ok in self.results)


def which(name):
    return shutil.which(name) or shutil.which(name, path='/usr/sbin:/sbin')


def wait(predicate, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise Failed('timed out waiting for %s' % what)


def connect(port, source=CLIENT, tls=None, timeout=10):
    """An HTTP connection from source; HTTPS verified by the context tls (for 127.0.0.1)."""
    if tls is None:
        return http.client.HTTPConnection('127.0.0.1', port, timeout=timeout, source_address=(source, 0))
    return http.client.HTTPSConnection('127.0.0.1', port, timeout=timeout, source_address=(source, 0),
                                       context=tls)


def request(port, path, headers=None, source=CLIENT, conn=None, tls=None):
    """(status, headers with lowercase names, body), on conn or a new connection from source."""
    own = conn is None
    if own:
        conn = connect(port, source, tls)
    try:
        conn.request('GET', path, headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        if own:
            conn.close()


# ---------------------------------------------------------------------------------------------
# The site, its copies, the nodes
# ---------------------------------------------------------------------------------------------

def make_site(base):
    """A folder and NODES `cp -a` copies of it (each copy: other inodes, another ctime)."""
    site = os.path.join(base, 'site')
    os.makedirs(os.path.join(site, 'photos', 'trip'))
    files = {'photos/a.jpg': os.urandom(20000), 'photos/big.jpg': os.urandom(300000),
             'photos/trip/b.png': os.urandom(3000)}
    for name, data in files.items():
        with open(os.path.join(site, name), 'wb') as f:
            f.write(data)
    roots = []
    for n in range(NODES):
        time.sleep(0.02)
        root = os.path.join(base, 'node%d' % (n + 1))
        subprocess.run(['cp', '-a', site, root], check=True)
        roots.append(root)
    return files, roots


class Node(AgentProcess):
    """One agent on a port of its own, kept across its stop and start."""

    def __init__(self, root, options, workers):
        self.fixed_port = free_port()
        AgentProcess.__init__(self, root=root, options=['--port', str(self.fixed_port)] + options,
                              workers=workers, prefix='agent-balancer-')

    def must(self, action):
        result = self.command(action)
        if result.returncode != 0:
            raise Failed('%s of the node on port %d: %s%s\n%s' % (
                action, self.fixed_port, result.stdout, result.stderr, self.log_text()[-2000:]))

    def log_lines(self):
        try:
            with open(self.access_log, errors='replace') as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []


def start_nodes(roots, options, workers):
    nodes = []
    try:
        for root in roots:
            nodes.append(Node(root, options, workers))
            nodes[-1].start()
    except BaseException:
        stop_nodes(nodes)
        raise
    return nodes


def stop_nodes(nodes):
    for node in nodes:
        try:
            node.stop()
        finally:
            node.cleanup()


def rewrite(text, old, new, count=1, regex=False):
    """A contrib file's address made this run's: exactly count places, or Failed."""
    found = len(re.findall(old, text, re.M)) if regex else text.count(old)
    if found != count:
        raise Failed('the contrib file changed: %r found %d times, not %d' % (old, found, count))
    return re.sub(old, new, text, flags=re.M) if regex else text.replace(old, new)


# ---------------------------------------------------------------------------------------------
# The proxies
# ---------------------------------------------------------------------------------------------

class Proxy:
    """A proxy process run in the foreground, in a session of its own (killed as a group)."""

    def __init__(self, name, args, log):
        self.name = name
        self.log = log
        with open(log, 'wb') as out:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True)

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def log_text(self):
        with open(self.log, errors='replace') as f:
            return f.read()


def listening(port):
    try:
        socket.create_connection(('127.0.0.1', port), timeout=1).close()
        return True
    except OSError:
        return False


def start_haproxy(work, nodes, port, cert=None):
    """HAProxy on contrib/haproxy.cfg; with cert (the nodes' certificate, for its checks to
    verify), its global and defaults and the TLS-passthrough example that is commented at its
    end, uncommented (the plain frontend and backend left out: their nodes are not these)."""
    text = open(os.path.join(REPO, 'contrib', 'haproxy.cfg')).read()
    name, bind, node_port = ('haproxy-tls', 'bind :443', 9443) if cert else ('haproxy', 'bind :80', 9085)
    if cert:
        head, _, rest = text.partition('\nfrontend www\n')
        block = rest.partition('\n# frontend www-tls\n')[2]
        if not head or not block:
            raise Failed('the contrib file changed: no plain frontend, or no commented TLS example')
        text = head + '\nfrontend www-tls\n' + re.sub(r'^# ?', '', block, flags=re.M)
        text = rewrite(text, 'check-sni images.example', 'check-sni localhost')
        text = rewrite(text, 'ca-file /etc/haproxy/nodes-ca.pem', 'ca-file %s' % cert)
    text = rewrite(text, r'^\s*log /dev/log.*$', '', regex=True)
    text = rewrite(text, '/run/haproxy/admin.sock', os.path.join(work, name + '.sock'))
    text = rewrite(text, bind, 'bind 127.0.0.1:%d' % port)
    text = rewrite(text, r'^    balance roundrobin$', '    balance roundrobin\n    source %s' % HAPROXY_SOURCE,
                   regex=True)      # not the commented TLS example's
    for n, node in enumerate(nodes):
        text = rewrite(text, '10.0.0.1%d:%d' % (n + 1, node_port), '127.0.0.1:%d' % node.fixed_port)
    path = os.path.join(work, name + '.cfg')
    with open(path, 'w') as f:
        f.write(text)
    check = subprocess.run([which('haproxy'), '-c', '-f', path], capture_output=True, text=True)
    if check.returncode != 0:
        raise Failed('haproxy -c: %s%s' % (check.stdout, check.stderr))
    proxy = Proxy('haproxy', [which('haproxy'), '-db', '-f', path], os.path.join(work, name + '.log'))
    proxy.stats = os.path.join(work, name + '.sock')
    return proxy


def haproxy_status(proxy, backend='agents'):
    """{server name: status} of the backend, from the stats socket's `show stat`."""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(proxy.stats)
            sock.sendall(b'show stat\n')
            data = b''.join(iter(lambda: sock.recv(65536), b''))     # until HAProxy closes
    except OSError:
        return {}
    lines = data.decode('ascii', 'replace').splitlines()
    if not lines or not lines[0].startswith('# '):
        return {}
    fields = lines[0][2:].split(',')
    rows = [dict(zip(fields, line.split(','))) for line in lines[1:] if line]
    return {row['svname']: row['status'] for row in rows
            if row.get('pxname') == backend and row.get('svname', '').startswith('node')}


def make_certificate(work):
    """A self-signed certificate for localhost and 127.0.0.1: the nodes', and what the client
    and HAProxy's checks verify them against.  (cert, key)."""
    cert, key = os.path.join(work, 'node.crt'), os.path.join(work, 'node.key')
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256',
                    '-nodes', '-keyout', key, '-out', cert, '-days', '2', '-subj', '/CN=localhost',
                    '-addext', 'subjectAltName = DNS:localhost, IP:127.0.0.1'],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return cert, key


def start_nginx(work, nodes, port):
    text = open(os.path.join(REPO, 'contrib', 'nginx-proxy.conf')).read()
    text = rewrite(text, '    listen 80;', '    listen 127.0.0.1:%d;' % port)
    text = rewrite(text, '        proxy_pass http://agents;',
                   '        proxy_pass http://agents;\n        proxy_bind %s;' % NGINX_SOURCE)
    for n, node in enumerate(nodes):
        text = rewrite(text, '10.0.0.1%d:9085' % (n + 1), '127.0.0.1:%d' % node.fixed_port)
    with open(os.path.join(work, 'nginx-proxy.conf'), 'w') as f:
        f.write(text)
    temp = ''.join('%s_temp_path %s;\n    ' % (kind, os.path.join(work, kind))
                   for kind in ('client_body', 'proxy', 'fastcgi', 'uwsgi', 'scgi'))
    main = ('worker_processes 1;\npid %s;\nerror_log %s warn;\ndaemon off;\n'
            'events { worker_connections 512; }\n'
            'http {\n    access_log %s;\n    %sproxy_max_temp_file_size 0;\n    include %s;\n}\n' % (
                os.path.join(work, 'nginx.pid'), os.path.join(work, 'nginx-error.log'),
                os.path.join(work, 'nginx-access.log'), temp, os.path.join(work, 'nginx-proxy.conf')))
    path = os.path.join(work, 'nginx.conf')
    with open(path, 'w') as f:
        f.write(main)
    args = [which('nginx'), '-p', work + '/', '-e', os.path.join(work, 'nginx-error.log'), '-c', path]
    check = subprocess.run(args + ['-t'], capture_output=True, text=True)
    if check.returncode != 0:
        raise Failed('nginx -t: %s%s' % (check.stdout, check.stderr))
    return Proxy('nginx', args, os.path.join(work, 'nginx.log'))


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------

def check_validators(checks, label, port, nodes, files, rounds):
    """The same ETags from every node; 304s, 206 resumes and gallery 304s through the proxy."""
    tags, gallery_tags = collections.Counter(), collections.Counter()
    for i in range(rounds):
        status, headers, body = request(port, '/photos/a.jpg?node-etag=%d' % i)
        if status == 200 and body == files['photos/a.jpg']:
            tags[headers.get('etag')] += 1
        status, headers, body = request(port, '/photos/?gallery-etag=%d' % i)
        if status == 200:
            gallery_tags[headers.get('etag')] += 1
    answered = [sum('node-etag=' in line for line in node.log_lines()) for node in nodes]
    checks.check('%s: the same ETag from every node' % label,
                 len(tags) == 1 and sum(tags.values()) == rounds and all(answered),
                 '%d distinct ETag(s) in %d GETs, answered by the nodes %s' % (len(tags), rounds, answered))
    gallery_answered = [sum('gallery-etag=' in line for line in node.log_lines()) for node in nodes]
    checks.check('%s: the same gallery ETag from every node' % label,
                 len(gallery_tags) == 1 and sum(gallery_tags.values()) == rounds and all(gallery_answered),
                 '%d distinct gallery ETag(s) in %d GETs, answered by the nodes %s'
                 % (len(gallery_tags), rounds, gallery_answered))
    etag = next(iter(tags), '')
    not_modified = sum(request(port, '/photos/a.jpg?c=%d' % i, {'If-None-Match': etag})[0] == 304
                       for i in range(rounds))
    checks.check('%s: 304s through the proxy' % label, not_modified == rounds,
                 '%d 304s of %d conditional GETs' % (not_modified, rounds))
    big = files['photos/big.jpg']
    big_tag = request(port, '/photos/big.jpg')[1].get('etag', '')
    resumed = 0
    for i in range(rounds):
        offset = 1000 * (i + 1)
        status, _, body = request(port, '/photos/big.jpg?r=%d' % i,
                                  {'Range': 'bytes=%d-' % offset, 'If-Range': big_tag})
        resumed += status == 206 and body == big[offset:]
    checks.check('%s: 206 resumes through the proxy' % label, resumed == rounds,
                 '%d 206s with the right bytes of %d If-Range requests' % (resumed, rounds))
    page_tag = next(iter(gallery_tags), '')
    pages = sum(request(port, '/photos/', {'If-None-Match': page_tag})[0] == 304 for _ in range(rounds))
    checks.check('%s: gallery 304s through the proxy' % label, pages == rounds,
                 '%d 304s of %d gallery revalidations' % (pages, rounds))


def check_client_address(checks, label, nodes, proxy_address):
    """Each node's lines for the client's requests name the client, never the proxy."""
    per_node = []
    for node in nodes:
        lines = [line for line in node.log_lines() if 'node-etag=' in line]
        per_node.append((sum(line.startswith(CLIENT + ' ') for line in lines), len(lines),
                         sum(line.startswith(proxy_address + ' ') for line in lines)))
    checks.check('%s: the client\'s address in each node\'s log' % label,
                 all(own == total and total and not proxied for own, total, proxied in per_node),
                 ', '.join('node%d %d of %d lines %s' % (n + 1, own, total, CLIENT)
                           for n, (own, total, _) in enumerate(per_node)))


class Load:
    """Keep-alive clients asking through the proxy until stopped; every outcome counted."""

    def __init__(self, port, files, clients=3, tls=None):
        self.port, self.files, self.tls = port, files, tls
        self.outcomes = collections.Counter()
        self.errors = []
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(n,), daemon=True) for n in range(clients)]
        for thread in self.threads:
            thread.start()

    def run(self, n):
        conn = None
        i = 0
        while not self.done.is_set():
            i += 1
            path = '/photos/' if i % 5 == 0 else '/photos/a.jpg'
            if conn is None:
                conn = connect(self.port, tls=self.tls, timeout=15)
            try:
                status, _, body = request(self.port, '%s?load=%d-%d' % (path, n, i), conn=conn)
            except (OSError, http.client.HTTPException) as exc:
                self.outcomes['error'] += 1
                self.errors.append('%s: %s' % (path, exc))
                conn.close()
                conn = None
                continue
            good = status == 200 and (path.endswith('/') or body == self.files['photos/a.jpg'])
            self.outcomes[status if good else 'bad %d' % status] += 1
            self.done.wait(PACE)
        if conn is not None:
            conn.close()

    def stop(self):
        self.done.set()
        for thread in self.threads:
            thread.join(timeout=20)
        return self.outcomes


def rolling(checks, label, nodes, load, rounds, node_up):
    """Each node in turn: stop and start, upgrade, reload; node_up(n) says it serves again."""
    steps = []
    for _ in range(rounds):
        for n, node in enumerate(nodes):
            times = []
            for step in ('stop', 'start', 'upgrade', 'reload'):
                began = time.monotonic()
                if step == 'start':
                    node.start()
                else:
                    node.must(step)
                if step != 'stop':
                    wait(lambda: node_up(n), 'node%d up after its %s' % (n + 1, step))
                times.append('%s %.1fs' % (step, time.monotonic() - began))
            steps.append('node%d: %s' % (n + 1, ', '.join(times)))
    outcomes = load.stop()
    total = sum(outcomes.values())
    checks.check('%s: every response a 200 through stop/start, upgrade and reload of each node' % label,
                 set(outcomes) == {200} and total > 0,
                 '%d requests: %s (%s)%s' % (
                     total, dict(outcomes), '; '.join(steps),
                     '; first errors: %s' % load.errors[:3] if load.errors else ''))


def run_phase(checks, label, roots, options, start_proxy, body, quick):
    """Nodes with options behind the proxy that start_proxy(nodes, port) starts, then
    body(proxy, port, nodes); the proxy and the nodes stopped after, on failure too.  A node
    has one worker with --quick (each start and upgrade forks and boots fewer), else two."""
    nodes = start_nodes(roots, options, 1 if quick else 2)
    proxy = None
    try:
        port = free_port()
        proxy = start_proxy(nodes, port)
        wait(lambda: listening(port), '%s on port %d' % (label, port))
        body(proxy, port, nodes)
    except Failed as exc:
        checks.check('%s: the run' % label, False, exc)
        if proxy is not None:
            print(proxy.log_text()[-3000:])
    finally:
        if proxy is not None:
            proxy.stop()
        stop_nodes(nodes)


def under_load(checks, label, port, files, nodes, rounds, node_up, tls=None):
    load = Load(port, files, tls=tls)
    try:
        rolling(checks, label, nodes, load, rounds, node_up)
    finally:
        load.stop()


def run_haproxy(checks, work, files, roots, quick):
    def body(proxy, port, nodes):
        wait(lambda: set(haproxy_status(proxy).values()) == {'UP'}, 'every node UP in haproxy')
        check_validators(checks, 'haproxy', port, nodes, files, 30 if quick else 300)
        check_client_address(checks, 'haproxy (PROXY v2)', nodes, HAPROXY_SOURCE)
        under_load(checks, 'haproxy', port, files, nodes, 1 if quick else 2,
                   lambda n: haproxy_status(proxy).get('node%d' % (n + 1)) == 'UP')
        status = haproxy_status(proxy)
        checks.check('haproxy: all nodes UP at the end', len(status) == NODES and set(status.values()) == {'UP'},
                     'show stat: %s' % status)
    run_phase(checks, 'haproxy', roots, ['--proxy-protocol', '--trusted-proxy', HAPROXY_SOURCE + '/32',
                                         '--health', '/healthz', '--stop-grace', str(GRACE)],
              lambda nodes, port: start_haproxy(work, nodes, port), body, quick)


def run_haproxy_tls(checks, work, files, roots, quick):
    cert, key = make_certificate(work)
    tls = ssl.create_default_context(cafile=cert)

    def body(proxy, port, nodes):
        status = functools.partial(haproxy_status, proxy, 'agents-tls')
        wait(lambda: set(status().values()) == {'UP'}, 'every node UP in haproxy (TLS)')
        rounds = 30 if quick else 300
        good = sum(request(port, '/photos/a.jpg?node-etag=%d' % i, tls=tls)[::2]
                   == (200, files['photos/a.jpg']) for i in range(rounds))
        answered = [sum('node-etag=' in line for line in node.log_lines()) for node in nodes]
        checks.check('haproxy-tls: GETs over TLS passed through to the nodes',
                     good == rounds and all(answered),
                     '%d of %d 200s with the right bytes, answered by the nodes %s' % (good, rounds, answered))
        check_client_address(checks, 'haproxy-tls (PROXY v2 before TLS)', nodes, HAPROXY_SOURCE)
        if not quick:       # 90 s more in CI for what the plain phase and `make tls` cover
            under_load(checks, 'haproxy-tls', port, files, nodes, 2,
                       lambda n: status().get('node%d' % (n + 1)) == 'UP', tls=tls)
        up = status()
        checks.check('haproxy-tls: all nodes UP at the end', len(up) == NODES and set(up.values()) == {'UP'},
                     'show stat: %s' % up)
    run_phase(checks, 'haproxy-tls', roots, ['--proxy-protocol', '--trusted-proxy', HAPROXY_SOURCE + '/32',
                                             '--health', '/healthz', '--stop-grace', str(GRACE),
                                             '--tls-cert', cert, '--tls-key', key],
              lambda nodes, port: start_haproxy(work, nodes, port, cert), body, quick)


def run_nginx(checks, work, files, roots, quick):
    def body(proxy, port, nodes):
        check_validators(checks, 'nginx', port, nodes, files, 30 if quick else 300)
        check_client_address(checks, 'nginx (X-Forwarded-For)', nodes, NGINX_SOURCE)
        forged = {'X-Forwarded-For': '203.0.113.66', 'Forwarded': 'for=203.0.113.67'}
        direct = request(nodes[0].fixed_port, '/photos/a.jpg?forged-direct', forged, source=FORGER)[0]
        through = request(port, '/photos/a.jpg?forged-through', forged, source=FORGER)[0]
        time.sleep(1.5)             # the access log is written within a second
        lines = [line for node in nodes for line in node.log_lines() if 'forged-' in line]
        logged = sorted(line.split(' ', 1)[0] for line in lines)
        checks.check('nginx: a client forging X-Forwarded-For is logged as itself',
                     (direct, through) == (200, 200) and logged == [FORGER, FORGER]
                     and not any('203.0.113.6' in line for node in nodes for line in node.log_lines()),
                     'straight to a node and through nginx, logged as %s' % logged)
        under_load(checks, 'nginx', port, files, nodes, 1 if quick else 2,
                   lambda n: listening(nodes[n].fixed_port)
                   and request(nodes[n].fixed_port, '/photos/a.jpg?up')[0] == 200)
    run_phase(checks, 'nginx', roots, ['--trusted-proxy', NGINX_SOURCE + '/32'],
              lambda nodes, port: start_nginx(work, nodes, port), body, quick)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='CI size')
    parser.add_argument('--only', choices=('haproxy', 'haproxy-tls', 'nginx'))
    parser.add_argument('--keep', action='store_true', help='keep the temporary directory')
    args = parser.parse_args()
    wanted = [args.only] if args.only else ['haproxy', 'haproxy-tls', 'nginx']
    missing = sorted({name.split('-')[0] for name in wanted if not which(name.split('-')[0])})
    if missing:
        print('balancer: %s not installed (Debian: apt-get install %s); nothing run'
              % (' and '.join(missing), ' '.join('nginx-light' if m == 'nginx' else m for m in missing)))
        return 77
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))     # finally: clean up
    work = tempfile.mkdtemp(prefix='agent-balancer-')
    checks = Checks()
    started = time.monotonic()
    try:
        files, roots = make_site(work)
        if 'haproxy' in wanted:
            run_haproxy(checks, work, files, roots, args.quick)
        if 'haproxy-tls' in wanted:
            run_haproxy_tls(checks, work, files, roots, args.quick)
        if 'nginx' in wanted:
            run_nginx(checks, work, files, roots, args.quick)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    passed = checks.passed()
    print('balancer: %d of %d checks passed in %.0f s' % (
        sum(ok for _, ok in checks.results), len(checks.results), time.monotonic() - started))
    return 0 if passed and checks.results else 1


if __name__ == '__main__':
    sys.exit(main())
