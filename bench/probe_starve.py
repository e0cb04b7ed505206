#!/usr/bin/env python3
"""Outside probing: can one client (one address, a few connections) raise the others' latency?

For each attack, an agent (2 workers, 127.0.0.1, --port 0, as `make smoke` runs it) serves a
temporary root: small.jpg (1 KB), big.bin (10 MB), many/ (5,000 small files), photos/ (--photos
distinct JPEGs, for ?thumb).  A well-behaved client in this process, from 127.0.0.2 (the attacks
come from 127.0.0.1, but auth_many_addr's), GETs /small.jpg every --gap ms, on a fresh
connection and on a kept-alive one in turn, and records the time to the whole response: first
--seconds alone (the baseline), then --seconds while the attack runs in a separate process.  Printed per attack: p50/p99/max of both kinds of request, before and
during, and how many of the client's requests failed.

Attacks (--only NAME,NAME to pick):
  tls_slow_hello   300 connections trickling a real ClientHello, a byte every 0.5 s
  tls_no_finish    300 connections sending a whole ClientHello, never the Finished
  tls_handshakes   new TLS connections as fast as one process makes them (full handshakes)
  slow_readers     50 connections, SO_RCVBUF 1 KB, GET /big.bin, reading 1 byte a second
  tls_slow_readers the same over HTTPS
  range_flood      8 connections pipelining 200 GETs of 16 ranges of big.bin, reading all
  head_flood       8 connections pipelining 200 HEADs of /big.bin with Range, reading all
  zip_flood        4 connections each GETting /many/?download=zip again and again
  gallery_varying  8 connections pipelining gallery pages of many/, by name and by size, every
                   page and format, with a query string that changes each time (?v=N)
  gallery_dates    the same by date taken (each photo's header read once per worker)
  thumb_flood      ?thumb of every photo, 4 connections (thumbnailer on)
  auth_flood       wrong passwords with --auth, from 127.0.0.1 only (the victim is logged in)
  auth_many_addr   wrong passwords from 64 addresses of 127.0.0.0/8 (one machine's)
  share_tokens     random share-link tokens with --share-key, 8 connections pipelining
  tiny_headers     8 connections pipelining requests of 99 headers of 80 bytes each
  chunked_ones     8 connections sending 1 MB bodies of 1-byte chunks
  expect_hold      300 connections sending Expect: 100-continue with a Content-Length, no body
  half_closed      8 connections: 50 pipelined GETs of big.bin, shutdown(SHUT_WR), never read
  never_read       8 connections pipelining GETs of big.bin forever, never reading
  conn_exhaust     with --max-connections 200: 500 connections each sending a request line,
                   then a header line every 0.5 s (slowloris), more than both workers hold

    python3 bench/probe_starve.py                      # every attack, 4 s + 4 s each
    python3 bench/probe_starve.py --only auth_flood --seconds 6
    git show REV:agent.py > /tmp/old/agent.py; git show REV:daemon.py > /tmp/old/daemon.py
    python3 bench/probe_starve.py --agent /tmp/old/agent.py      # the same probes, before

Needs openssl (certificates) and, for thumb_flood, ImageMagick's convert.  Loopback only; every
agent and attacker started here is stopped on exit, on error and on Ctrl-C.  Standard library.
"""

import argparse
import base64
import multiprocessing
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

HOST = '127.0.0.1'
FILES = 5000
BIG = 10 << 20
PASSWORD = 'correct horse'
CAP_CONNECTIONS = 200           # --max-connections of conn_exhaust's agent (per worker)
VICTIM = '127.0.0.2'            # the well-behaved client's address; the attacks come from 127.0.0.1


def cpu_model():
    with open('/proc/cpuinfo') as f:
        for line in f:
            if line.startswith('model name'):
                return '%s, %d CPUs' % (line.split(':', 1)[1].strip(), os.cpu_count())
    return 'unknown'


def make_root(directory, photos):
    root = os.path.join(directory, 'www')
    for sub in ('many', 'photos'):
        os.makedirs(os.path.join(root, sub))
    with open(os.path.join(root, 'small.jpg'), 'wb') as f:
        f.write(os.urandom(1024))
    with open(os.path.join(root, 'big.bin'), 'wb') as f:
        f.write(os.urandom(BIG))
    for i in range(FILES):
        with open(os.path.join(root, 'many', 'photo-%05d.jpg' % i), 'wb') as f:
            f.write(b'\xff\xd8\xff' + os.urandom(i % 200))
    if photos and shutil.which('convert'):
        seed = os.path.join(directory, 'seed.png')
        subprocess.run(['convert', '-size', '1600x1200', 'plasma:', seed], check=True)
        with open(seed, 'rb') as f:
            png = f.read()
        # Distinct files (a text chunk before IEND), each a thumbnailer run of its own.
        for i in range(photos):
            chunk = b'tEXt' + b'Comment\0%d' % i
            import zlib
            body = chunk[4:]
            extra = len(body).to_bytes(4, 'big') + chunk + zlib.crc32(chunk).to_bytes(4, 'big')
            with open(os.path.join(root, 'photos', 'p%04d.png' % i), 'wb') as f:
                f.write(png[:-12] + extra + png[-12:])
    return root


def make_tls(directory):
    key, cert = os.path.join(directory, 'key.pem'), os.path.join(directory, 'cert.pem')
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256',
                    '-nodes', '-keyout', key, '-out', cert, '-days', '2', '-subj', '/CN=localhost'],
                   check=True, capture_output=True)
    os.chmod(key, 0o600)
    return cert, key


def client_context():
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(['http/1.1'])
    return context


def connect(port, tls=False, source=None):
    sock = socket.create_connection((HOST, port), timeout=10, source_address=(source, 0) if source else None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client_context().wrap_socket(sock) if tls else sock


# ---------------------------------------------------------------------------------------------
# The well-behaved client
# ---------------------------------------------------------------------------------------------

def victim(port, seconds, gap, tls, headers=()):
    """{'fresh': [s...], 'kept': [s...], 'failed': n}: GET /small.jpg every gap s, on a new
    connection and on the kept-alive one in turn."""
    request = harness.request_bytes('small.jpg', headers)
    times = {'fresh': [], 'kept': [], 'failed': 0}
    kept = None
    end = time.monotonic() + seconds
    turn = 0
    while time.monotonic() < end:
        turn += 1
        kind = 'kept' if turn % 2 else 'fresh'
        started = time.monotonic()
        conn = None
        try:
            if kind == 'kept' and kept is not None:
                conn = kept
            else:
                conn = harness.RawConn(sock=connect(port, tls, VICTIM), timeout=10)
            conn.send(request)
            response = conn.response()
            if response.status != 200:
                raise harness.ResponseError('status %d' % response.status)
            times[kind].append(time.monotonic() - started)
            if kind == 'kept':
                kept = conn
            else:
                conn.close()
        except OSError:
            times['failed'] += 1
            if conn is not None:
                conn.close()
            if conn is kept:
                kept = None
        time.sleep(gap)
    if kept is not None:
        kept.close()
    return times


def summary(values):
    if not values:
        return 'none'
    return 'p50 %6.1f  p99 %7.1f  max %7.1f ms (%d)' % (
        harness.percentile(values, 0.5) * 1e3, harness.percentile(values, 0.99) * 1e3,
        max(values) * 1e3, len(values))


# ---------------------------------------------------------------------------------------------
# The attacks: each runs in a process of its own until `end` (time.monotonic())
# ---------------------------------------------------------------------------------------------

def client_hello():
    """The bytes of a real ClientHello (Python's own, ALPN http/1.1)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_context().wrap_bio(incoming, outgoing, server_hostname='localhost')
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def hold(port, count, end, step, first=b'', trickle=b'', source=None):
    """count connections sending first, then a byte of trickle each step s; reconnect when cut."""
    socks = []
    sent = []
    while time.monotonic() < end:
        while len(socks) < count:
            try:
                sock = socket.create_connection((HOST, port), timeout=2, source_address=(source, 0) if source else None)
                sock.setblocking(False)
                if first:
                    sock.send(first)
            except OSError:
                time.sleep(0.05)
                continue
            socks.append(sock)
            sent.append(0)
        time.sleep(step)
        for i in reversed(range(len(socks))):
            try:
                if trickle:
                    sock = socks[i]
                    sock.send(trickle[sent[i] % len(trickle):sent[i] % len(trickle) + 1])
                    sent[i] += 1
                else:
                    if socks[i].recv(65536) == b'':
                        raise ConnectionResetError
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                socks[i].close()
                del socks[i], sent[i]
    for sock in socks:
        sock.close()


def tls_slow_hello(ctx, end):
    hold(ctx.port, 300, end, 0.5, trickle=client_hello())


def conn_exhaust(ctx, end):
    hold(ctx.port, 2 * CAP_CONNECTIONS + 100, end, 0.5, first=b'GET /small.jpg HTTP/1.1\r\n', trickle=b'X-a: b\r\n')


def tls_no_finish(ctx, end):
    hold(ctx.port, 300, end, 0.5, first=client_hello())


def tls_handshakes(ctx, end):
    context = client_context()
    while time.monotonic() < end:
        try:
            with context.wrap_socket(socket.create_connection((HOST, ctx.port), timeout=5)):
                pass
        except OSError:
            pass


def slow_readers(ctx, end, tls=False):
    socks = []
    for _ in range(50):
        try:
            raw = socket.socket()
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            raw.settimeout(10)
            raw.connect((HOST, ctx.port))
            sock = client_context().wrap_socket(raw) if tls else raw
            sock.sendall(harness.request_bytes('big.bin'))
            socks.append(sock)
        except OSError:
            pass
    while time.monotonic() < end:
        for sock in socks:
            try:
                sock.settimeout(0.001)
                sock.recv(1)
            except OSError:
                pass
        time.sleep(1)
    for sock in socks:
        sock.close()


def tls_slow_readers(ctx, end):
    slow_readers(ctx, end, tls=True)


def pipeline(ctx, end, request, depth=200, conns=8, read=True, tls=False, shut=False):
    """conns connections each sending depth copies of request in one packet, then reading
    everything (if read) and again; else sending more as the server takes it."""
    socks = []
    data = request * depth
    while time.monotonic() < end:
        while len(socks) < conns:
            try:
                socks.append(connect(ctx.port, tls))
            except OSError:
                time.sleep(0.05)
        for sock in socks[:]:
            try:
                sock.settimeout(max(0.01, min(2.0, end - time.monotonic())))
                sock.sendall(data)
                if shut:
                    sock.shutdown(socket.SHUT_WR)
                if read:
                    while sock.recv(1 << 20):
                        if time.monotonic() > end:
                            break
                        sock.settimeout(0.05)
            except socket.timeout:
                pass
            except OSError:
                sock.close()
                socks.remove(sock)
            if shut:
                time.sleep(0.5)
    for sock in socks:
        sock.close()


def range_flood(ctx, end):
    ranges = ','.join('%d-%d' % (i * 600000, i * 600000 + 999) for i in range(16))
    pipeline(ctx, end, harness.request_bytes('big.bin', [('Range', 'bytes=' + ranges)]))


def head_flood(ctx, end):
    pipeline(ctx, end, harness.request_bytes('big.bin', [('Range', 'bytes=0-0,5-5,99-99')], method='HEAD'))


def zip_flood(ctx, end):
    pipeline(ctx, end, harness.request_bytes('many/?download=zip'), depth=1, conns=4)


def gallery_varying(ctx, end, sorts=('name', 'size')):
    counter = [0]

    def requests():
        out = []
        for _ in range(50):
            counter[0] += 1
            sort = random.choice(sorts)
            fmt = random.choice(['', '&format=json'])
            out.append(harness.request_bytes('many/?sort=%s%s&page=%d&v=%d' % (sort, fmt, counter[0] % 20 + 1, counter[0])))
        return b''.join(out)
    while time.monotonic() < end:
        pipeline(ctx, min(end, time.monotonic() + 1), requests(), depth=1)


def gallery_dates(ctx, end):
    gallery_varying(ctx, end, ('date',))


def thumb_flood(ctx, end):
    requests = b''.join(harness.request_bytes('photos/p%04d.png?thumb' % i) for i in range(ctx.photos))
    pipeline(ctx, end, requests, depth=1, conns=4)


def wrong_auth():
    return [('Authorization', 'Basic ' + base64.b64encode(b'alice:guess%d' % random.randrange(1 << 30)).decode())]


def auth_flood(ctx, end, sources=('127.0.0.1',)):
    index = 0
    while time.monotonic() < end:
        source = sources[index % len(sources)]
        index += 1
        try:
            with connect(ctx.port, source=source) as sock:
                sock.sendall(b''.join(harness.request_bytes('small.jpg', wrong_auth(), close=i == 3)
                                      for i in range(4)))
                sock.settimeout(2)
                while sock.recv(65536):
                    pass
        except OSError:
            pass


def auth_many_addr(ctx, end):
    auth_flood(ctx, end, ['127.0.%d.%d' % (i // 200 + 1, i % 200 + 2) for i in range(64)])


def share_tokens(ctx, end):
    token = lambda: '0-1-' + base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip('=')  # noqa: E731
    while time.monotonic() < end:
        pipeline(ctx, min(end, time.monotonic() + 1),
                 b''.join(harness.request_bytes('s/%s/many/' % token()) for _ in range(100)), depth=1)


def tiny_headers(ctx, end):
    headers = [('X-H%02d' % i, 'v' * 70) for i in range(99)]
    pipeline(ctx, end, harness.request_bytes('small.jpg', headers), depth=20)


def chunked_ones(ctx, end):
    body = b'1\r\nx\r\n' * (1 << 20) + b'0\r\n\r\n'
    pipeline(ctx, end, harness.request_bytes('small.jpg', [('Transfer-Encoding', 'chunked')]) + body, depth=1)


def expect_hold(ctx, end):
    first = harness.request_bytes('small.jpg', [('Expect', '100-continue'), ('Content-Length', '100000')])
    hold(ctx.port, 300, end, 0.5, first=first)


def half_closed(ctx, end):
    pipeline(ctx, end, harness.request_bytes('big.bin'), depth=50, read=False, shut=True)


def never_read(ctx, end):
    pipeline(ctx, end, harness.request_bytes('big.bin'), depth=50, read=False)


ATTACKS = [  # name, function, agent kind
    ('tls_slow_hello', tls_slow_hello, 'tls'), ('tls_no_finish', tls_no_finish, 'tls'),
    ('tls_handshakes', tls_handshakes, 'tls'), ('tls_slow_readers', tls_slow_readers, 'tls'),
    ('slow_readers', slow_readers, 'plain'), ('range_flood', range_flood, 'plain'),
    ('head_flood', head_flood, 'plain'), ('zip_flood', zip_flood, 'plain'),
    ('gallery_varying', gallery_varying, 'plain'), ('gallery_dates', gallery_dates, 'plain'),
    ('thumb_flood', thumb_flood, 'thumb'),
    ('auth_flood', auth_flood, 'auth'), ('auth_many_addr', auth_many_addr, 'auth'),
    ('share_tokens', share_tokens, 'share'), ('tiny_headers', tiny_headers, 'plain'),
    ('chunked_ones', chunked_ones, 'plain'), ('expect_hold', expect_hold, 'plain'),
    ('half_closed', half_closed, 'plain'), ('never_read', never_read, 'plain'),
    ('conn_exhaust', conn_exhaust, 'cap'),
]


class Context:
    def __init__(self, port, photos):
        self.port = port
        self.photos = photos


def agent_options(kind, directory):
    if kind == 'tls':
        cert, key = make_tls(directory)
        return ['--tls-cert', cert, '--tls-key', key]
    if kind == 'thumb':
        return ['--thumbnailer', 'convert']
    if kind == 'auth':
        path = os.path.join(directory, 'passwords')
        subprocess.run([sys.executable, harness.AGENT, '--auth', path, 'passwd', 'alice'],
                       input=PASSWORD + '\n', text=True, check=True, capture_output=True)
        return ['--auth', path, '--allow-plain-auth']
    if kind == 'cap':
        return ['--max-connections', str(CAP_CONNECTIONS)]
    if kind == 'share':
        return ['--share-key', os.path.join(directory, 'share.key')]
    return []


def run_attack(name, function, kind, root, args):
    directory = tempfile.mkdtemp(prefix='agent-probe-')
    attacker = None
    try:
        with harness.AgentProcess(root=root, options=agent_options(kind, directory), agent=args.agent) as agent:
            agent.start()
            if kind == 'thumb':     # the made thumbnails of an earlier round are not reused
                shutil.rmtree(os.path.join(agent.dir, 'thumbnails'), ignore_errors=True)
            headers = [('Authorization', 'Basic ' + base64.b64encode(('alice:' + PASSWORD).encode()).decode())] \
                if kind == 'auth' else []
            tls = kind == 'tls'
            victim(agent.port, 0.5, args.gap, tls, headers)         # warm the caches
            before = victim(agent.port, args.seconds, args.gap, tls, headers)
            attacker = multiprocessing.Process(target=function, args=(Context(agent.port, args.photos),
                                                                      time.monotonic() + args.seconds + 1))
            attacker.start()
            time.sleep(0.5)
            during = victim(agent.port, args.seconds, args.gap, tls, headers)
            bad = agent.bad_log_lines()
    finally:
        if attacker is not None:
            attacker.join(5)
            if attacker.is_alive():
                attacker.kill()
                attacker.join()
        shutil.rmtree(directory, ignore_errors=True)
    if args.agent:
        name = '%s (%s)' % (name, args.agent)
    print('%-16s fresh before %s' % (name, summary(before['fresh'])))
    print('%-16s fresh during %s' % ('', summary(during['fresh'])))
    print('%-16s kept  before %s' % ('', summary(before['kept'])))
    print('%-16s kept  during %s  failed %d%s' % ('', summary(during['kept']), during['failed'],
                                                  '  LOG: %s' % bad[:2] if bad else ''))
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--only', help='attacks to run, comma-separated (default: all)')
    parser.add_argument('--seconds', type=float, default=4.0, help='of baseline, then of attack')
    parser.add_argument('--gap', type=float, default=0.02, help='seconds between the client\'s requests')
    parser.add_argument('--photos', type=int, default=200, help='distinct pictures for ?thumb')
    parser.add_argument('--agent', help='the agent.py to probe (default: this checkout\'s); an older '
                        'commit\'s, with its daemon.py beside it, for a before and after')
    args = parser.parse_args()
    chosen = args.only.split(',') if args.only else [a[0] for a in ATTACKS]
    unknown = set(chosen) - {a[0] for a in ATTACKS}
    if unknown:
        parser.error('unknown attack(s): %s' % ', '.join(sorted(unknown)))
    with open('/proc/loadavg') as f:
        load = ' '.join(f.read().split()[:3])
    print('bench/probe_starve.py on %s, Python %s, load %s' % (cpu_model(), sys.version.split()[0], load))
    top = tempfile.mkdtemp(prefix='agent-probe-root-')
    try:
        root = make_root(top, args.photos if 'thumb_flood' in chosen else 0)
        for name, function, kind in ATTACKS:
            if name in chosen:
                run_attack(name, function, kind, root, args)
    finally:
        shutil.rmtree(top, ignore_errors=True)


if __name__ == '__main__':
    main()
