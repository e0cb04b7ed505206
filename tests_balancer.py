"""Behind a load balancer (issue 23): validators that agree across nodes, the PROXY protocol
(--proxy-protocol, on HTTPS listeners too), the client's address from trusted proxies
(--trusted-proxy), the health path and the stop's grace (--health, --stop-grace).

Pure tests call agent.py's functions; the server tests run one agent on loopback.  Clients
that must come from another address than 127.0.0.1 bind to 127.0.0.2 (all of 127/8 is
loopback on Linux).  The real HAProxy and nginx in front of three agents are bench/balancer.py
(make balancer-ci).
"""

import os
import socket
import ssl
import struct
import subprocess
import time
import unittest

# testlib first: it puts the repository and bench/ on sys.path.
import testlib
from testlib import (
    AGENT, PYTHON, AgentServer, FILE_A, FIXED_MTIME, RawConn, SharedAgentTestCase, TempDirTest,
    run, shutil_which, slurp, tls_client_context, tls_serve, wait_for, write_file)
import agent
from harness import raw_request

V2_SIGNATURE = b'\r\n\r\n\x00\r\nQUIT\n'
PROXY_ADDRESS = '127.0.0.2'         # the "balancer" of the server tests


def v1(source='192.0.2.7', dest='127.0.0.1', family='TCP4', sport=51000, dport=80):
    return ('PROXY %s %s %s %d %d\r\n' % (family, source, dest, sport, dport)).encode('ascii')


def v2(source='192.0.2.7', dest='127.0.0.1', command=1, family=0x11, tlvs=b'', length=None):
    """A PROXY protocol v2 header; family 0x11 TCP over IPv4, 0x21 TCP over IPv6."""
    if family >> 4 == 2:
        addresses = socket.inet_pton(socket.AF_INET6, source) + socket.inet_pton(socket.AF_INET6, dest)
    elif family >> 4 == 3:
        addresses = source.encode().ljust(108, b'\0') + dest.encode().ljust(108, b'\0')
    else:
        addresses = socket.inet_pton(socket.AF_INET, source) + socket.inet_pton(socket.AF_INET, dest)
    body = addresses + struct.pack('!HH', 51000, 80) + tlvs
    return V2_SIGNATURE + bytes([0x20 | command, family]) + \
        struct.pack('!H', len(body) if length is None else length) + body


def connect_from(address, port, timeout=5.0):
    """A RawConn to the agent from a chosen loopback address."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((address, 0))
        sock.settimeout(timeout)
        sock.connect(('127.0.0.1', port))
    except OSError:
        sock.close()
        raise
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return RawConn(sock=sock, timeout=timeout)


def logged_client(server, marker):
    """The address the access log gives to the (first) request whose line holds marker."""
    line = wait_for(lambda: next((l for l in server.access_lines() if marker in l), None),
                    timeout=10, message='the access-log line of %s' % marker)
    return line.split(' ', 1)[0]


def stat_like(ino, ctime_ns, mtime_ns=FIXED_MTIME * 10 ** 9, size=400, dev=1, directory=False):
    mode = (0o40755 if directory else 0o100644)
    return os.stat_result((mode, ino, dev, 1, 0, 0, size, mtime_ns // 10 ** 9, mtime_ns // 10 ** 9,
                           ctime_ns // 10 ** 9),
                          {'st_atime_ns': mtime_ns, 'st_mtime_ns': mtime_ns, 'st_ctime_ns': ctime_ns})


@testlib.unit
class NodeValidatorTests(unittest.TestCase):
    """Two nodes holding the same bytes send the same validators: the tag is mtime and size,
    not the inode or the ctime, which no copy keeps."""

    def test_a_copy_with_another_inode_and_ctime_has_the_same_etag(self):
        original = stat_like(ino=5, ctime_ns=1700000000 * 10 ** 9 + 1)
        copy = stat_like(ino=99, dev=7, ctime_ns=1760000000 * 10 ** 9 + 12345)
        self.assertEqual(agent.make_etag(original), agent.make_etag(copy))
        self.assertNotEqual(agent.make_etag(original), agent.make_etag(stat_like(5, 0, size=401)))
        self.assertNotEqual(agent.make_etag(original),
                            agent.make_etag(stat_like(5, 0, mtime_ns=FIXED_MTIME * 10 ** 9 + 1000)))
        self.assertEqual(agent.make_etag(original, '-t')[-3:], '-t"')

    def test_the_gallery_etag_of_a_copied_folder_is_the_same(self):
        def listing(base_ino, ctime_ns):
            return agent.gallery_listing([
                ('a.jpg', False, stat_like(base_ino, ctime_ns)),
                ('sub', True, stat_like(base_ino + 1, ctime_ns, size=4096 + base_ino, directory=True))])
        here = agent.gallery_etag(stat_like(1, 10 ** 18, directory=True), '/', listing(5, 10 ** 18), 'html')
        there = agent.gallery_etag(stat_like(77, 2 * 10 ** 18, dev=3, directory=True), '/',
                                   listing(900, 2 * 10 ** 18), 'html')
        self.assertEqual(here, there)
        changed = agent.gallery_listing([('a.jpg', False, stat_like(5, 0, size=1))])
        self.assertNotEqual(here, agent.gallery_etag(stat_like(1, 0, directory=True), '/', changed, 'html'))


class NodeValidatorServerTests(SharedAgentTestCase):
    """One agent serving a folder and its `cp -a` copy: the same ETag for the same bytes, and a
    file rewritten in place with its mtime put back is never served stale (the server's own
    caches key on the ctime)."""

    @classmethod
    def make_files(cls):
        root = cls.server.root
        write_file(root, 'one/a.jpg', FILE_A)
        write_file(root, 'one/b.txt', b'bee')
        time.sleep(0.01)                # another ctime for the copy, whatever the clock
        subprocess.run(['cp', '-a', os.path.join(root, 'one'), os.path.join(root, 'two')], check=True)

    def test_copies_have_the_same_etag(self):
        root = self.server.root
        self.assertNotEqual(os.stat(os.path.join(root, 'one/a.jpg')).st_ctime_ns,
                            os.stat(os.path.join(root, 'two/a.jpg')).st_ctime_ns)
        one, two = self.get('/one/a.jpg'), self.get('/two/a.jpg')
        self.assertEqual(one.headers['etag'], two.headers['etag'])
        # The other node's tag is one this node answers 304 and 206 for.
        self.assertEqual(self.get('/one/a.jpg', 'If-None-Match: ' + two.headers['etag']).status, 304)
        resumed = self.get('/one/a.jpg', 'Range: bytes=100-', 'If-Range: ' + two.headers['etag'])
        self.assertEqual((resumed.status, resumed.body), (206, FILE_A[100:]))

    def test_rewritten_with_mtime_put_back_is_served_fresh(self):
        """In place (rsync --inplace) or by a rename over it (rsync's default): the same size
        and mtime, another ctime; a keep-alive connection stays on one worker, whose FileCache
        holds the old file."""
        conn = self.conn()
        for way, name in (('in place', 'inplace.jpg'), ('renamed over', 'renamed.jpg')):
            path = write_file(self.server.root, 'one/' + name, b'first-version')
            conn.send(raw_request('/one/' + name))
            first = conn.response()
            write_file(self.server.root, 'one/.new', b'other-version')
            if way == 'in place':
                with open(path, 'r+b') as f:
                    f.write(b'other-version')
                os.utime(path, (FIXED_MTIME, FIXED_MTIME))
            else:
                os.rename(os.path.join(self.server.root, 'one/.new'), path)
            conn.send(raw_request('/one/' + name))
            again = conn.response()
            self.assertEqual((first.body, again.body), (b'first-version', b'other-version'), way)
            # The tag is mtime and size: a client holding the old bytes is told 304, as nginx
            # and Last-Modified tell it (docs/scale-out.md); the bytes served are the new ones.
            self.assertEqual(again.headers['etag'], first.headers['etag'], way)


@testlib.unit
class ProxyHeaderParserTests(unittest.TestCase):
    """parse_proxy_header: HAProxy's PROXY protocol, v1 (text) and v2 (binary), pure."""

    def test_version_1(self):
        request = raw_request('/')
        for header, source in ((v1(), '192.0.2.7'), (v1('2001:db8::1', '::1', 'TCP6'), '2001:db8::1'),
                               (b'PROXY UNKNOWN\r\n', None),
                               (b'PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n', None)):
            self.assertEqual(agent.parse_proxy_header(header + request), (source, len(header)), header)

    def test_version_2(self):
        request = raw_request('/')
        tlvs = b'\x01\x00\x08http/1.1' + b'\x04\x00\x00'            # ALPN, NOOP
        for header, source in ((v2(), '192.0.2.7'), (v2(tlvs=tlvs), '192.0.2.7'),
                               (v2('2001:db8::7', '::1', family=0x21), '2001:db8::7'),
                               (v2('::ffff:192.0.2.9', '::1', family=0x21), '192.0.2.9'),
                               (v2(command=0), None),               # LOCAL: a health check
                               (v2('/tmp/a', '/tmp/b', family=0x31), None),
                               (V2_SIGNATURE + b'\x20\x00\x00\x00', None)):     # LOCAL, UNSPEC
            self.assertEqual(agent.parse_proxy_header(header + request), (source, len(header)), header)

    def test_split_across_packets_waits_for_the_rest(self):
        for header in (v1(), v2(), v2(tlvs=b'\x04\x00\x10' + b'\0' * 16)):
            for cut in range(len(header)):
                self.assertIsNone(agent.parse_proxy_header(header[:cut]), (header, cut))

    def test_malformed_headers_are_refused(self):
        bad = [
            raw_request('/'),                                   # no header at all
            b'PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n',              # wrong family
            b'PROXY TCP4 2001:db8::1 ::1 1 2\r\n',              # the family's addresses differ
            b'PROXY TCP4 1.2.3.4 5.6.7.8 70000 2\r\n',          # port out of range
            b'PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n',             # leading zero
            b'PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n',                # a field missing
            b'PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n',             # two spaces
            b'PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n',                # LF alone
            b'PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n',             # not a canonical address
            b'PROXY ' + b'1' * 120,                             # oversized: no CRLF in 107 bytes
            v2(family=0x41),                                    # wrong family (0x4?)
            v2(family=0x13),                                    # wrong protocol (TCP, UDP only)
            v2(family=0x12),                                    # UDP over IPv4: not a connection
            v2(length=8),                                       # shorter than its addresses
            v2('2001:db8::1', '::1', family=0x21, length=20),
            v2(command=2),                                      # no such command
            V2_SIGNATURE + b'\x11\x11\x00\x0c' + b'\0' * 12,    # version 1 in a v2 header
            V2_SIGNATURE[:-1] + b'X',                           # a signature gone wrong
            V2_SIGNATURE + b'\x21\x11' + struct.pack('!H', agent.PROXY_V2_MAX),   # oversized
        ]
        for data in bad:
            with self.assertRaises(ValueError, msg=repr(data)):
                agent.parse_proxy_header(data + b'\0' * 300)


@testlib.unit
class TrustedProxyWalkTests(unittest.TestCase):
    """forwarded_client: the client's address from Forwarded or X-Forwarded-For, walked from
    the right past trusted hops, and only when the connection comes from a trusted proxy."""

    def setUp(self):
        self.trusted = agent.trusted_networks(['127.0.0.2/32', '10.0.0.0/8', 'fd00::/8'])

    def client(self, peer, **headers):
        return agent.forwarded_client(peer, {k.replace('_', '-'): v for k, v in headers.items()},
                                      self.trusted)

    def test_x_forwarded_for(self):
        self.assertEqual(self.client('127.0.0.2', x_forwarded_for='203.0.113.9'), '203.0.113.9')
        self.assertEqual(self.client('127.0.0.2', x_forwarded_for='6.6.6.6, 203.0.113.9, 10.1.1.1'),
                         '203.0.113.9')
        self.assertEqual(self.client('127.0.0.2', x_forwarded_for='10.0.0.5,10.0.0.6'), '10.0.0.5')
        self.assertEqual(self.client('127.0.0.2', x_forwarded_for=' ::ffff:203.0.113.9 '), '203.0.113.9')
        self.assertEqual(self.client('127.0.0.2', x_forwarded_for='2001:DB8::1'), '2001:db8::1')
        self.assertEqual(self.client('fd00::1', x_forwarded_for='203.0.113.9:4711'), '203.0.113.9')
        self.assertEqual(self.client('127.0.0.2', x_forwarded_for='[2001:db8::1]:80'), '2001:db8::1')

    def test_from_an_untrusted_address_the_headers_are_ignored(self):
        self.assertEqual(self.client('127.0.0.1', x_forwarded_for='203.0.113.9'), '127.0.0.1')
        self.assertEqual(self.client('198.51.100.1', forwarded='for=203.0.113.9'), '198.51.100.1')
        self.assertEqual(agent.forwarded_client('127.0.0.2', {'x-forwarded-for': '203.0.113.9'}, ()),
                         '127.0.0.2')

    def test_a_forged_or_garbled_hop_never_reaches_the_log(self):
        for value in ('"><script>', 'unknown', '1.2.3.4 5.6.7.8', '', ',', '1.2.3.4, ', '999.1.1.1',
                      '1.2.3.4\x00', 'x' * 5000):
            client = self.client('127.0.0.2', x_forwarded_for=value)
            self.assertIn(client, ('127.0.0.2', '1.2.3.4'), repr(value))
        # The walk stops at the first hop it cannot read: nothing left of it is believed.
        self.assertEqual(self.client('127.0.0.2', x_forwarded_for='6.6.6.6, garbage'), '127.0.0.2')
        self.assertEqual(self.client('127.0.0.2', x_forwarded_for='6.6.6.6, garbage, 10.0.0.1'), '10.0.0.1')

    def test_forwarded(self):
        self.assertEqual(self.client('127.0.0.2', forwarded='for=192.0.2.60;proto=http;by=203.0.113.43'),
                         '192.0.2.60')
        self.assertEqual(self.client('127.0.0.2', forwarded='For="[2001:db8:cafe::17]:4711"'),
                         '2001:db8:cafe::17')
        self.assertEqual(self.client('127.0.0.2', forwarded='for=192.0.2.43, for=10.0.0.9;proto=https'),
                         '192.0.2.43')
        self.assertEqual(self.client('127.0.0.2', forwarded='proto=https;for="_hidden"'), '127.0.0.2')
        self.assertEqual(self.client('127.0.0.2', forwarded='for=unknown'), '127.0.0.2')
        # X-Forwarded-For, which nginx, HAProxy and the cloud balancers write, comes first.
        self.assertEqual(self.client('127.0.0.2', forwarded='for=6.6.6.6', x_forwarded_for='192.0.2.1'),
                         '192.0.2.1')

    def test_trusted_networks_are_checked(self):
        for text in ('10.0.0.0/33', 'example.com', '', '1.2.3.4/8/8'):
            with self.assertRaises(ValueError, msg=text):
                agent.trusted_networks([text])
        self.assertTrue(agent.is_trusted('10.9.9.9', agent.trusted_networks(['10.1.2.3/8'])))
        self.assertFalse(agent.is_trusted('unix', self.trusted))


class ProxyProtocolServerTests(SharedAgentTestCase):
    """--proxy-protocol: a header before each connection's first request, from a trusted
    proxy only; its source address is the client's in the access log."""

    options = ('--proxy-protocol', '--trusted-proxy', PROXY_ADDRESS + '/32', '--header-timeout', '2')

    @classmethod
    def make_files(cls):
        write_file(cls.server.root, 'a.jpg', FILE_A)

    def proxied(self):
        conn = connect_from(PROXY_ADDRESS, self.server.port)
        self.addCleanup(conn.close)
        return conn

    def test_version_1_and_2_name_the_client(self):
        for header, source, marker in ((v1('198.51.100.4'), '198.51.100.4', 'v1'),
                                       (v2('198.51.100.5'), '198.51.100.5', 'v2'),
                                       (v2('2001:db8::5', '::1', family=0x21), '2001:db8::5', 'v6'),
                                       (v2(command=0), PROXY_ADDRESS, 'local')):
            conn = self.proxied()
            conn.send(header + raw_request('/a.jpg?' + marker))
            self.assertEqual(conn.response().status, 200)
            conn.send(raw_request('/a.jpg?%s-again' % marker))       # keep-alive: the same client
            self.assertEqual(conn.response().body, FILE_A)
            self.assertEqual(logged_client(self.server, '?%s ' % marker), source)
            self.assertEqual(logged_client(self.server, '?%s-again' % marker), source)

    def test_split_across_packets(self):
        conn = self.proxied()
        data = v2('198.51.100.6') + raw_request('/a.jpg?split')
        for cut in (3, 13, 17, 30):
            conn.send(data[:cut])
            data = data[cut:]
            time.sleep(0.05)
        conn.send(data)
        self.assertEqual(conn.response().status, 200)
        self.assertEqual(logged_client(self.server, '?split'), '198.51.100.6')

    def test_untrusted_or_malformed_is_a_400_and_a_close(self):
        conn = self.conn()                      # from 127.0.0.1: not a trusted proxy
        conn.send(v1('198.51.100.7') + raw_request('/a.jpg?untrusted'))
        self.assertEqual(conn.response().status, 400)
        self.assertTrue(conn.wait_closed())
        for data in (raw_request('/a.jpg?bare'), v2(family=0x41) + raw_request('/'),
                     b'PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n' + raw_request('/')):
            conn = self.proxied()
            conn.send(data)
            self.assertEqual(conn.response().status, 400, data)
            self.assertTrue(conn.wait_closed())
        self.assertNotIn('198.51.100.7', '\n'.join(self.server.access_lines()))

    def test_a_header_cut_short_is_closed_at_the_header_timeout(self):
        conn = self.proxied()
        conn.send(v2()[:20])
        self.assertTrue(conn.wait_closed(timeout=10))
        self.assert_serving_proxied()

    def assert_serving_proxied(self):
        conn = self.proxied()
        conn.send(v1() + raw_request('/a.jpg'))
        self.assertEqual(conn.response().body, FILE_A)


class ProxiedTLS:
    """A TLS client driven by hand (ssl.MemoryBIO) over a socket, as HAProxy in TCP mode with
    send-proxy-v2 is one: its ClientHello follows `first` (a PROXY header) in one write, or in
    the pieces that cuts say.  It has the socket methods that RawConn calls."""

    def __init__(self, sock, ca_cert, first=b'', cuts=()):
        self.raw = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = tls_client_context(ca_cert).wrap_bio(self.incoming, self.outgoing,
                                                        server_hostname='localhost')
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        data = first + self.outgoing.read()
        for cut in cuts:
            sock.sendall(data[:cut])
            data = data[cut:]
            time.sleep(0.05)        # each piece its own segment (TCP_NODELAY)
        sock.sendall(data)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.flush()
                self.pull()
        self.flush()

    def flush(self):
        self.raw.sendall(self.outgoing.read())

    def pull(self):
        data = self.raw.recv(65536)
        if not data:
            raise ConnectionResetError('closed by the server')
        self.incoming.write(data)

    def sendall(self, data):
        self.tls.write(data)
        self.flush()

    def recv(self, size):
        while True:
            try:
                return self.tls.read(size)
            except ssl.SSLWantReadError:
                try:
                    self.pull()
                except ConnectionResetError:
                    return b''
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b''

    def settimeout(self, timeout):
        self.raw.settimeout(timeout)

    def close(self):
        self.raw.close()


class ProxyProtocolTLSTests(SharedAgentTestCase):
    """--proxy-protocol on an HTTPS listener (HAProxy's mode tcp with send-proxy-v2, TLS passed
    through): the PROXY header comes before the ClientHello, often in the same packet; it is
    read from the raw socket, and the handshake gets the bytes after it.  From an untrusted
    address, or without a header, the connection is closed (no HTTP can answer before the
    handshake)."""

    options = ('--proxy-protocol', '--trusted-proxy', PROXY_ADDRESS + '/32')

    @classmethod
    def make_files(cls):
        if shutil_which('openssl') is None:
            raise unittest.SkipTest('openssl not installed (Debian package openssl)')
        write_file(cls.server.root, 'a.jpg', FILE_A)
        cls.ca = tls_serve(cls.server, 2301)

    def proxied(self, first, cuts=(), address=PROXY_ADDRESS):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind((address, 0))
        sock.settimeout(5)
        sock.connect(('127.0.0.1', self.server.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return RawConn(sock=ProxiedTLS(sock, self.ca[0], first, cuts), timeout=5)

    def test_a_header_and_the_hello_in_one_write(self):
        for header, source, marker in ((v2('198.51.100.21'), '198.51.100.21', 'v2'),
                                       (v1('198.51.100.22'), '198.51.100.22', 'v1'),
                                       (v2('2001:db8::23', '::1', family=0x21), '2001:db8::23', 'v6'),
                                       (v2(command=0), PROXY_ADDRESS, 'local')):
            conn = self.proxied(header)
            conn.send(raw_request('/a.jpg?tls-' + marker))
            self.assertEqual(conn.response().body, FILE_A)
            conn.send(raw_request('/a.jpg?tls-%s-again' % marker))     # keep-alive: the same client
            self.assertEqual(conn.response().body, FILE_A)
            self.assertEqual(logged_client(self.server, '?tls-%s ' % marker), source)
            self.assertEqual(logged_client(self.server, '?tls-%s-again' % marker), source)

    def test_split_across_packets(self):
        header = v2('198.51.100.24', tlvs=b'\x01\x00\x08http/1.1')      # an ALPN TLV, as HAProxy sends
        for cuts, marker in (((3, 13, 17), 'in-header'), ((len(header),), 'after-header'),
                             ((len(header) + 3,), 'in-hello'), ((20, len(header) + 7), 'both')):
            conn = self.proxied(header, cuts)
            conn.send(raw_request('/a.jpg?' + marker))
            self.assertEqual(conn.response().status, 200)
            self.assertEqual(logged_client(self.server, '?%s ' % marker), '198.51.100.24')
        conn = self.proxied(v1('198.51.100.25'), (5, 30))
        conn.send(raw_request('/a.jpg?v1-cut'))
        self.assertEqual(conn.response().status, 200)
        self.assertEqual(logged_client(self.server, '?v1-cut'), '198.51.100.25')

    def test_untrusted_missing_or_malformed_header_is_closed(self):
        for first, address in ((v2('198.51.100.26'), '127.0.0.1'),       # not a trusted proxy
                               (b'', PROXY_ADDRESS),                     # no header: the hello first
                               (v2(family=0x41), PROXY_ADDRESS),
                               (b'PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n', PROXY_ADDRESS)):
            with self.assertRaises(OSError) as caught:
                self.proxied(first, address=address)
            # Closed at once, not left to the header timeout (10 s, the client waits 5).
            self.assertNotIsInstance(caught.exception, socket.timeout, (first, address))
        self.assertNotIn('198.51.100.26', '\n'.join(self.server.access_lines()))
        def refusals():
            return [l for l in self.server.access_lines()
                    if '"(no PROXY header from a trusted proxy)" 400 -' in l]
        wait_for(lambda: len(refusals()) == 4, timeout=10, message='four refusals in the access log')
        self.assertEqual(sorted(l.split(' ', 1)[0] for l in refusals()), ['127.0.0.1'] + [PROXY_ADDRESS] * 3)
        conn = self.proxied(v1('198.51.100.27'))
        conn.send(raw_request('/a.jpg?after-refusals'))
        self.assertEqual(conn.response().body, FILE_A)
        self.assertNotIn('Traceback', slurp(self.server.log))
        self.assertNotIn('unexpected error', slurp(self.server.log))

    def test_a_header_cut_short_is_closed_at_the_header_timeout(self):
        conn = connect_from(PROXY_ADDRESS, self.server.port, timeout=20)     # --header-timeout 10
        self.addCleanup(conn.close)
        conn.send(v2()[:20])
        self.assertTrue(conn.wait_closed(timeout=20))
        self.assertEqual(conn.buf, b'')
        conn = self.proxied(v2('198.51.100.28'))
        conn.send(raw_request('/a.jpg?after-cut'))
        self.assertEqual(conn.response().body, FILE_A)


class TrustedProxyServerTests(SharedAgentTestCase):
    """--trusted-proxy without the PROXY protocol: X-Forwarded-For from the proxy names the
    client; the same header from anyone else is ignored, and logged as the sender."""

    options = ('--trusted-proxy', PROXY_ADDRESS + '/32')

    @classmethod
    def make_files(cls):
        write_file(cls.server.root, 'a.jpg', FILE_A)

    def test_from_the_proxy_the_header_names_the_client(self):
        conn = connect_from(PROXY_ADDRESS, self.server.port)
        self.addCleanup(conn.close)
        conn.send(raw_request('/a.jpg?via', 'X-Forwarded-For: 6.6.6.6, 203.0.113.50'))
        self.assertEqual(conn.response().status, 200)
        conn.send(raw_request('/a.jpg?via-forwarded', 'Forwarded: for="[2001:db8::50]:1234"'))
        self.assertEqual(conn.response().status, 200)
        conn.send(raw_request('/a.jpg?via-garbage', 'X-Forwarded-For: <script>'))
        self.assertEqual(conn.response().status, 200)
        self.assertEqual(logged_client(self.server, '?via '), '203.0.113.50')
        self.assertEqual(logged_client(self.server, '?via-forwarded'), '2001:db8::50')
        self.assertEqual(logged_client(self.server, '?via-garbage'), PROXY_ADDRESS)

    def test_a_client_that_forges_the_header_is_logged_as_itself(self):
        self.get('/a.jpg?forged', 'X-Forwarded-For: 203.0.113.51', 'Forwarded: for=203.0.113.52')
        self.assertEqual(logged_client(self.server, '?forged'), '127.0.0.1')
        self.assertNotIn('203.0.113.5', '\n'.join(self.server.access_lines()))


class HealthAndGraceTests(TempDirTest):
    """--health PATH answers 200 while the agent serves and 503 once a stop has begun; the
    agent then serves on (new connections too) for --stop-grace before it closes."""

    def test_health_turns_503_and_serving_goes_on_through_the_grace(self):
        server = AgentServer(self, '--health', '/healthz', '--stop-grace', '5')
        server.write('a.jpg', FILE_A)
        server.start()
        status, headers, body = server.get('/healthz')
        self.assertEqual((status, body), (200, b'ok\n'))
        self.assertIn('no-store', headers['cache-control'])
        self.assertEqual(server.get('/healthz?probe=1', method='HEAD')[0], 200)
        stop = subprocess.Popen([PYTHON, AGENT, '--pidfile', server.pidfile, 'stop'],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(stop.kill)
        wait_for(lambda: server.get('/healthz')[0] == 503, timeout=10, message='health 503')
        self.assertEqual(server.get('/healthz')[2], b'stopping\n')
        self.assertEqual(server.get('/a.jpg')[:3:2], (200, FILE_A))     # a new connection
        out, err = stop.communicate(timeout=30)
        self.assertEqual(stop.returncode, 0, err)
        with self.assertRaises(OSError):
            server.connect(timeout=2).close()
        self.assertIn('health', slurp(server.log))

    def test_a_second_stop_cuts_the_grace_short(self):
        # An operator's second `stop` (or Ctrl-C) during a grace of 60 s: the agent stops now,
        # and both stops return long before the grace would have ended (the bound: 30 s).
        server = AgentServer(self, '--health', '/healthz', '--stop-grace', '60', '--stop-timeout', '5')
        server.start()
        # With the agent's options: a stop that knows the grace waits for it (65 s, not 10).
        first = subprocess.Popen([PYTHON, AGENT] + server.options + ['stop'],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(first.kill)
        wait_for(lambda: server.get('/healthz')[0] == 503, timeout=10, message='health 503')
        second = server.command('stop', timeout=30)
        self.assertEqual(second.returncode, 0, second.stderr)
        out, err = first.communicate(timeout=30)
        self.assertEqual(first.returncode, 0, err)
        with self.assertRaises(OSError):
            server.connect(timeout=2).close()
        log = slurp(server.log)
        self.assertIn('cut short', log)
        self.assertNotIn('Traceback', log)

    def test_without_health_the_stop_has_no_grace_and_the_path_is_a_file(self):
        server = AgentServer(self)
        server.write('healthz', b'a file')
        server.start()
        self.assertEqual(server.get('/healthz')[2], b'a file')
        self.assertEqual(server.command('stop').returncode, 0)


class BalancerOptionTests(TempDirTest):
    """The options' mistakes are usage errors (exit 2) that name the option."""

    def test_mistakes(self):
        for args, words in ((['--proxy-protocol'], '--trusted-proxy'),
                            (['--trusted-proxy', '10.0.0.0/33'], '10.0.0.0/33'),
                            (['--trusted-proxy', 'lb.example'], 'lb.example'),
                            (['--health', 'healthz'], "'/'"),
                            (['--stop-grace', '-1'], '--stop-grace')):
            result = run([PYTHON, AGENT, '--root', self.tmp] + args + ['status'])
            self.assertEqual(result.returncode, 2, (args, result.stderr))
            self.assertIn(words, result.stderr)
            self.assertNotIn('Traceback', result.stderr)

    def test_restart_keeps_every_trusted_proxy(self):
        config = agent.parser().parse_args(['--trusted-proxy', '10.0.0.0/8', '--trusted-proxy',
                                            '::1', '--proxy-protocol', 'start'])
        argv = agent.option_argv(config, every=True)
        again = agent.parser().parse_args(argv + ['start'])
        self.assertEqual((again.trusted_proxy, again.proxy_protocol), (['10.0.0.0/8', '::1'], True))


if __name__ == '__main__':
    unittest.main()
