"""Issue 21's accounts (--auth) and share links (/s/TOKEN/PATH): the pure parts called directly,
then a real agent on loopback, and fail2ban-regex against a log it wrote.

Brute force: the limit counts per client address in memory shared by every worker; a second
address on loopback is 127.0.0.2 (Linux routes all of 127/8 to lo), as a client's source.
"""

import base64
import io
import json
import os
import pwd
import re
import select
import socket
import stat
import subprocess
import sys
import time
import unittest
import urllib.parse
import zipfile
from unittest import mock

import testlib
from testlib import (AGENT, PYTHON, TIMEOUT, AgentServer, ClassCleanups, RawConn, ServiceToolTestCase,
                     TempDirTest, agent, kill_group_of, slurp, wait_for)
from samples import camera_jpeg, sample_jpeg

KEY = b'k' * 64
ALICE = 'Basic ' + base64.b64encode(b'alice:open sesame').decode()
WRONG = 'Basic ' + base64.b64encode(b'alice:guess').decode()


def basic(name, password):
    return 'Basic ' + base64.b64encode(('%s:%s' % (name, password)).encode('utf-8')).decode()


def request(target, authorization=None):
    headers = {'host': 'x'}
    if authorization is not None:
        headers['authorization'] = authorization
    return agent.Request(b'GET', target, (1, 1), headers, b'GET ' + target + b' HTTP/1.1')


def raw_get(port, target, authorization=None, source='127.0.0.1', method='GET'):
    """(status, head fields without Date, body) of one request from source, on its own
    connection (so that requests spread over the workers)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    conn = RawConn(sock=sock, timeout=10)
    try:
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect(('127.0.0.1', port))
        head = '%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n' % (method, target)
        if authorization is not None:
            head += 'Authorization: %s\r\n' % authorization
        conn.send(head.encode('latin-1') + b'\r\n')
        if not conn.wait_closed():
            raise AssertionError('%s %s: no close within 10 s: %r' % (method, target, conn.buf[:200]))
    finally:
        conn.close()
    head, _, body = conn.buf.partition(b'\r\n\r\n')
    lines = head.decode('latin-1').split('\r\n')
    fields = [line for line in lines[1:] if not line.lower().startswith('date:')]
    return int(lines[0].split()[1]), fields, body


def field(fields, name):
    for line in fields:
        key, _, value = line.partition(':')
        if key.lower() == name:
            return value.strip()
    return None


def write_accounts(path, *pairs):
    text = ''
    for name, password in pairs:
        text = agent.set_password(text, name, agent.hash_password(password))
    agent.write_private(path, text)


@testlib.unit
class AuthPureTests(TempDirTest):
    def test_parse_basic_takes_rfc7617_and_refuses_the_rest(self):
        self.assertEqual(agent.parse_basic(ALICE), ('alice', 'open sesame'))
        self.assertEqual(agent.parse_basic('bAsIc ' + ALICE[6:]), ('alice', 'open sesame'))
        self.assertEqual(agent.parse_basic(basic('\u00e9lodie', 'p:w\u00fc')), ('\u00e9lodie', 'p:w\u00fc'))
        self.assertEqual(agent.parse_basic(basic('bob', '')), ('bob', ''))
        for bad in ['', 'Basic', 'Basic ', 'Bearer abc', 'Basic !!!!', 'Basic YWxpY2U=',
                    'Basic ' + base64.b64encode(b'\xff\xfe:x').decode(),
                    'Basic ' + base64.b64encode(b':nameless').decode(),
                    'Basic ' + base64.b64encode(b'a\nb:x').decode(),
                    'Basic ' + base64.b64encode(b'x' * 65 + b':y').decode(),
                    'Basic ' + 'A' * 5000, 'Basic YWxp Y2U6eA==', 'Basic\tYWxpY2U6eA==']:
            self.assertIsNone(agent.parse_basic(bad), bad)

    def test_records_are_salted_slow_hashes_verified_in_constant_time(self):
        record = agent.hash_password('open sesame')
        self.assertTrue(record.startswith('scrypt$16384$8$1$'), record)
        self.assertNotIn('open sesame', record)
        self.assertNotEqual(record, agent.hash_password('open sesame'))     # salted
        self.assertIsNone(agent.check_record(record))
        self.assertTrue(agent.verify_password('open sesame', record))
        self.assertFalse(agent.verify_password('open sesam', record))
        with mock.patch('agent.hmac.compare_digest', return_value=False) as compare:
            self.assertFalse(agent.verify_password('open sesame', record))
        compare.assert_called_once()

    def test_pbkdf2_where_scrypt_is_missing(self):
        import hashlib
        without = mock.Mock(spec=['pbkdf2_hmac', 'sha256'], pbkdf2_hmac=hashlib.pbkdf2_hmac, sha256=hashlib.sha256)
        with mock.patch('agent.hashlib', without):
            record = agent.hash_password('pw', b's' * 16)
        self.assertTrue(record.startswith('pbkdf2-sha256$600000$'), record)
        self.assertIsNone(agent.check_record(record))
        self.assertTrue(agent.verify_password('pw', record))
        self.assertFalse(agent.verify_password('pW', record))

    def test_password_file_errors_name_the_file_and_line(self):
        good = agent.hash_password('x', b'\0' * 16)
        self.assertEqual(agent.parse_password_file('# accounts\n\nalice:%s\n' % good, 'F'), {'alice': good})
        for text, line in [('alice:%s\nbob:plain\n' % good, 2), ('alice:%s\nalice:%s\n' % (good, good), 2),
                           (':%s\n' % good, 1), ('alice:scrypt$3$8$1$AA==$AA==\n', 1),
                           ('alice:scrypt$16384$8$1$!!$AA==\n', 1), ('alice:pbkdf2-sha256$1$AA==$AA==\n', 1)]:
            with self.assertRaises(agent.DaemonError) as caught:
                agent.parse_password_file(text, '/etc/agent/passwd')
            self.assertIn('/etc/agent/passwd, line %d' % line, str(caught.exception))

    def test_set_password_replaces_only_that_account(self):
        text = agent.set_password('alice:A\nbob:B\n', 'alice', 'C')
        self.assertEqual(text, 'bob:B\nalice:C\n')
        self.assertEqual(agent.set_password('', 'carol', 'D'), 'carol:D\n')

    def test_write_private_is_0600_and_atomic(self):
        path = os.path.join(self.tmp, 'passwd')
        agent.write_private(path, 'one\n')
        agent.write_private(path, 'two\n')
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path) as f:
            self.assertEqual(f.read(), 'two\n')
        self.assertEqual(os.listdir(self.tmp), ['passwd'])       # no temporary file left
        os.chmod(path, 0o644)
        with self.assertRaises(agent.DaemonError) as caught:
            agent.read_private(path, 'password file')
        self.assertIn('chmod 600 %s' % path, str(caught.exception))

    def test_share_key_is_made_0600_on_first_use_and_kept(self):
        path = os.path.join(self.tmp, 'share.key')
        key = agent.share_key(path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertGreaterEqual(len(key), 64)
        self.assertEqual(agent.share_key(path), key)

    def test_a_key_root_makes_belongs_to_the_agents_user_who_reads_it_at_reload(self):
        if os.geteuid() != 0:
            self.skipTest('needs root')
        path = os.path.join(self.tmp, 'share.key')
        agent.share_key(path, 'nobody')
        self.assertEqual(os.stat(path).st_uid, pwd.getpwnam('nobody').pw_uid)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        os.chown(path, 0, 0)
        with mock.patch('agent.os.open', side_effect=PermissionError(13, 'Permission denied')):
            with self.assertRaises(agent.DaemonError) as caught:
                agent.share_key(path)
        self.assertIn('chown it to that user', str(caught.exception))

    def test_plain_auth_refused_off_loopback_with_why_and_what_to_do(self):
        config = agent.parser().parse_args(['--auth', 'f', '--bind', '0.0.0.0', 'start'])
        with self.assertRaises(agent.DaemonError) as caught:
            agent.check_plain_auth(config)
        message = str(caught.exception)
        for words in ('in clear', '--tls-cert', '127.0.0.1 behind a TLS proxy', '--allow-plain-auth'):
            self.assertIn(words, message)
        for argv in (['--bind', '127.0.0.1'], ['--bind', '::1'], ['--allow-plain-auth'],
                     ['--tls-cert', 'c', '--tls-key', 'k']):
            agent.check_plain_auth(agent.parser().parse_args(['--auth', 'f', '--bind', '0.0.0.0'] + argv
                                                             + ['start']))

    def test_durations(self):
        self.assertEqual(agent.parse_duration('90m'), 5400)
        self.assertEqual(agent.parse_duration('7d'), 604800)
        self.assertEqual(agent.parse_duration('never'), 0)
        self.assertEqual(agent.parse_duration('30'), 30)
        for bad in ('', '0', '7x', '-1d', '1.5h', 'd'):
            with self.assertRaises(Exception):
                agent.parse_duration(bad)


class AuthTerminalTests(TempDirTest):
    """agent.py passwd on a real terminal: a child on a pty."""

    def test_passwd_asks_twice_on_a_terminal_without_echo(self):
        import pty
        path = os.path.join(self.tmp, 'passwd')
        pid, master = pty.fork()
        if pid == 0:
            try:
                os.execv(PYTHON, [PYTHON, AGENT, '--auth', path, 'passwd', 'carol'])
            finally:
                os._exit(127)
        self.addCleanup(os.close, master)
        self.addCleanup(kill_group_of, pid)

        def read():
            if not select.select([master], [], [], TIMEOUT)[0]:
                raise AssertionError('passwd said nothing within %ds: %r' % (TIMEOUT, seen))
            try:
                return os.read(master, 1024)
            except OSError:             # EIO: the child has closed the terminal
                return b''
        seen = b''
        for answer in (b'tty secret 1\n', b'tty secret 1\n'):
            while not seen.rstrip().endswith(b':'):
                seen += read()
            os.write(master, answer)
            seen += b'|'
        while True:
            data = read()
            if not data:
                break
            seen += data
        self.assertEqual(os.waitpid(pid, 0)[1], 0, seen)
        self.assertIn(b'Password for carol:', seen)
        self.assertIn(b'Again:', seen)
        self.assertNotIn(b'tty secret', seen)           # never echoed
        with open(path) as f:
            record = agent.parse_password_file(f.read(), path)['carol']
        self.assertTrue(agent.verify_password('tty secret 1', record))


@testlib.unit
class ShareTokenTests(unittest.TestCase):
    def token(self, relative, expires=0, key=KEY):
        return agent.share_token(key, relative, expires)

    def test_a_link_opens_its_folder_and_below(self):
        token = self.token('albums/2024')
        for rest, inner in [(b'albums/2024/', b'/albums/2024/'), (b'albums/2024/a.jpg?thumb', b'/albums/2024/a.jpg?thumb'),
                            (b'albums/2024/sub/./b.jpg', b'/albums/2024/sub/./b.jpg'),
                            (b'albums/2024/sub/../a.jpg', b'/albums/2024/sub/../a.jpg'),
                            (b'albums%2F2024/a.jpg', b'/albums%2F2024/a.jpg')]:
            target, view = agent.open_share(KEY, b'/s/' + token + b'/' + rest, 1000)
            self.assertEqual(target, inner)
            self.assertEqual((view.prefix, view.shared, view.depth), (b'/s/' + token, 'albums/2024', 2))
            self.assertEqual(view.home, '/s/%s/albums/2024/' % token.decode())

    def test_nothing_outside_it(self):
        token = self.token('albums/2024')
        for rest in [b'albums/', b'', b'albums/2025/a.jpg', b'albums/2024/../2025/a.jpg',
                     b'albums/2024/..%2f2025/a.jpg', b'albums/2024/%2e%2e/2025/', b'albums/20245/a.jpg',
                     b'private/albums/2024/a.jpg', b'albums/2024/../../x']:
            with self.assertRaises(agent.HTTPError) as caught:
                agent.open_share(KEY, b'/s/' + token + b'/' + rest, 1000)
            self.assertIn(caught.exception.status, (400, 404), rest)

    def test_a_changed_or_foreign_token_is_refused(self):
        token = self.token('albums', 5000)
        expires, depth, mac = token.split(b'-', 2)
        changed = [b'%x-%s-%s' % (6000, depth, mac), b'%s-%d-%s' % (expires, 0, mac),
                   expires + b'-' + depth + b'-' + (b'A' if mac[:1] != b'A' else b'B') + mac[1:],
                   self.token('albums', 5000, key=b'another key of some length, 32+'),
                   token[:-1], token + b'A', b'garbage', b'']
        for bad in changed:
            with self.assertRaises(agent.HTTPError) as caught:
                agent.open_share(KEY, b'/s/' + bad + b'/albums/a.jpg', 1000)
            self.assertEqual(caught.exception.status, 404, bad)
        agent.open_share(KEY, b'/s/' + token + b'/albums/a.jpg', 1000)

    def test_an_expired_token_is_gone(self):
        token = self.token('albums', 5000)
        agent.open_share(KEY, b'/s/' + token + b'/albums/', 5000)
        with self.assertRaises(agent.HTTPError) as caught:
            agent.open_share(KEY, b'/s/' + token + b'/albums/', 5001)
        self.assertEqual(caught.exception.status, 410)
        agent.open_share(KEY, b'/s/' + self.token('albums', 0) + b'/albums/', 10 ** 12)    # never

    def test_one_file_and_the_whole_root(self):
        token = self.token('albums/a.jpg')
        self.assertEqual(agent.open_share(KEY, b'/s/' + token + b'/albums/a.jpg', 0)[0], b'/albums/a.jpg')
        with self.assertRaises(agent.HTTPError):
            agent.open_share(KEY, b'/s/' + token + b'/albums/b.jpg', 0)
        root = self.token('')
        self.assertEqual(agent.open_share(KEY, b'/s/' + root + b'/any/thing', 0)[0], b'/any/thing')

    def test_gallery_home_is_the_folder_shared(self):
        listing = agent.gallery_listing(agent.gallery_catalog([], 1000), 'name', 1)
        page = agent.gallery_page('/s/TOK/albums/2024/sub/', listing, {}, skip=2 + 2).decode()
        hrefs = re.findall(r'href="([^"]*)"', page)
        self.assertIn('/s/TOK/albums/2024/', hrefs)
        for href in hrefs:
            if not href.startswith(('data:', '?')):
                self.assertTrue(href.startswith('/s/TOK/albums/2024/'), href)
        self.assertIn('<title>sub</title>', page)


@testlib.unit
class GuessTableTests(unittest.TestCase):
    def test_limit_per_address_then_429_for_a_while(self):
        table = agent.GuessTable()
        for _ in range(agent.GUESS_LIMIT):
            self.assertEqual(table.blocked('203.0.113.7', 100.0), 0)
            table.failed('203.0.113.7', 100.0)
        self.assertEqual(table.blocked('203.0.113.7', 100.0), agent.GUESS_BLOCK + 1)
        self.assertEqual(table.blocked('203.0.113.8', 100.0), 0)
        self.assertEqual(table.blocked('203.0.113.7', 100.0 + agent.GUESS_BLOCK), 0)
        self.assertEqual(table.failed('203.0.113.7', 100.0 + agent.GUESS_BLOCK), 1)    # a new count

    def test_memory_is_fixed_whatever_the_addresses(self):
        table = agent.GuessTable()
        size = len(table.shared)
        for i in range(3 * agent.GUESS_SLOTS):
            table.failed('2001:db8::%x' % i, 50.0 + i / 1000)
        self.assertEqual(len(table.shared), size)
        self.assertEqual(size, agent.GUESS_SLOTS * 16)
        for _ in range(agent.GUESS_LIMIT):
            table.failed('198.51.100.1', 60.0)
        self.assertTrue(table.blocked('198.51.100.1', 60.0))


class GuessTableForkTests(unittest.TestCase):
    """The guess table shared with workers forked after it: it forks."""

    def test_workers_forked_after_it_share_the_counts(self):
        table = agent.GuessTable()
        pid = os.fork()
        if pid == 0:
            try:
                for _ in range(agent.GUESS_LIMIT):
                    table.failed('192.0.2.1', 10.0)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        self.assertTrue(table.blocked('192.0.2.1', 10.0))


@testlib.unit
class AccessAdmitTests(TempDirTest):
    """Access.admit in-process: what it answers, what it logs."""

    def setUp(self):
        TempDirTest.setUp(self)
        self.access = agent.Access({'alice': agent.hash_password('open sesame')}, None)

    def test_cached_verification_and_failures(self):
        with mock.patch('agent.verify_password', wraps=agent.verify_password) as verify:
            self.assertIsNone(self.access.admit(request(b'/a', ALICE), '127.0.0.1', 1.0, 1))
            self.assertIsNone(self.access.admit(request(b'/a', ALICE), '127.0.0.1', 1.0, 1))
        self.assertEqual(verify.call_count, 1)
        for req in (request(b'/a'), request(b'/a', WRONG), request(b'/a', basic('nobody', 'open sesame'))):
            with self.assertRaises(agent.HTTPError) as caught, mock.patch('agent.log'):
                self.access.admit(req, '127.0.0.1', 1.0, 1)
            self.assertEqual(caught.exception.status, 401)
            self.assertEqual(caught.exception.headers, agent.AUTH_CHALLENGE)
        self.assertIn(b'charset="UTF-8"', agent.AUTH_CHALLENGE)

    def test_a_name_cannot_forge_an_address_into_the_log_line(self):
        names = ['x" from 6.6.6.6 for account "y', 'a\\" from 6.6.6.6', 'new\u2028line',
                 '\u00e9\u00e8 from 6.6.6.6']
        for name in names:
            with mock.patch('agent.log') as log, self.assertRaises(agent.HTTPError):
                self.access.admit(request(b'/', basic(name, 'pw')), '192.0.2.9', 1.0, 1)
            line = log.call_args[0][0]
            self.assertRegex(line, r'^agent: failed login from 192\.0\.2\.9 for account "(?:[^"\\]|\\.)*"$')
            self.assertTrue(line.isascii() and line.isprintable(), line)
        with mock.patch('agent.log') as log, self.assertRaises(agent.HTTPError):
            self.access.admit(request(b'/', 'Basic %%%'), '192.0.2.9', 1.0, 1)
        self.assertEqual(log.call_args[0][0], 'agent: failed login from 192.0.2.9 with malformed credentials')

    def test_share_links_in_either_form_need_no_account(self):
        access = agent.Access(self.access.accounts, KEY)
        token = agent.share_token(KEY, 'albums', 0)
        for target in (b'/s/' + token + b'/albums/a.jpg', b'http://x/s/' + token + b'/albums/a.jpg?thumb'):
            req = request(target)
            view = access.admit(req, '192.0.2.7', 1.0, 1)
            self.assertEqual(view.shared, 'albums')
            self.assertTrue(req.target.startswith(b'/albums/a.jpg'), req.target)
        for target in (b'/x?to=/s/' + token + b'/albums/', b'/albums/s/x'):
            with self.assertRaises(agent.HTTPError) as caught:
                access.admit(request(target), '192.0.2.7', 1.0, 1)
            self.assertEqual(caught.exception.status, 401)

    def test_blocked_address_is_429_even_with_the_right_password(self):
        with mock.patch('agent.log'):
            for _ in range(agent.GUESS_LIMIT):
                with self.assertRaises(agent.HTTPError):
                    self.access.admit(request(b'/', WRONG), '192.0.2.5', 1.0, 1)
        with self.assertRaises(agent.HTTPError) as caught:
            self.access.admit(request(b'/', ALICE), '192.0.2.5', 2.0, 1)
        self.assertEqual(caught.exception.status, 429)
        self.assertEqual(caught.exception.headers, b'Retry-After: %d\r\n' % agent.GUESS_BLOCK)
        self.assertIsNone(self.access.admit(request(b'/', ALICE), '192.0.2.6', 2.0, 1))


class AccessServer:
    """An agent with --auth (alice) and --share-key over a small tree: albums/2024 (a photo
    with an embedded thumbnail, a subfolder, a link out to private/), private/, top.jpg."""

    @staticmethod
    def make(testcase, *options, workers=2):
        server = AgentServer(testcase, workers=workers)
        server.passwd = os.path.join(server.dir, 'passwd')
        server.key = os.path.join(server.dir, 'share.key')
        write_accounts(server.passwd, ('alice', 'open sesame'))
        server.options += ['--auth', server.passwd, '--share-key', server.key] + list(options)
        photo = camera_jpeg(sample_jpeg(64, 48), sample_jpeg(16, 12, (0, 120, 255)))
        server.write('albums/2024/a.jpg', photo)
        server.write('albums/2024/sub/b.jpg', photo)
        server.write('albums/2025/c.jpg', photo)
        server.write('private/secret.jpg', b'SECRET' + photo)
        server.write('top.jpg', photo)
        os.symlink('../../private', os.path.join(server.root, 'albums/2024/out'))
        os.symlink('../../private/secret.jpg', os.path.join(server.root, 'albums/2024/out.jpg'))
        return server

    @staticmethod
    def share(server, path, *options):
        result = subprocess.run([PYTHON, AGENT, '--pidfile', server.pidfile, '--base-url',
                                 'http://127.0.0.1:%d' % server.port] + list(options) + ['share', path],
                                capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()


class AuthServerTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = AccessServer.make(ClassCleanups(cls), '--health', '/healthz').start()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def test_the_balancers_health_check_needs_no_account(self):
        self.assertEqual(raw_get(self.server.port, '/healthz')[0], 200)
        self.assertEqual(raw_get(self.server.port, '/healthz/x')[0], 401)

    def test_every_path_is_401_the_same_whether_it_exists_or_not(self):
        port = self.server.port
        targets = ['/', '/albums/2024/a.jpg', '/albums/2024/a.jpg?thumb', '/albums/2024/?format=json',
                   '/albums/2024', '/albums/2024/', '/private/secret.jpg', '/top.jpg?page=2']
        missing = ['/nothing', '/albums/2024/none.jpg', '/none.jpg?thumb', '/nodir/?format=json',
                   '/nodir', '/albums/2099/', '/.hidden', '/albums/%2e%2e/x']
        answers = {}
        for target in targets + missing:
            status, fields, body = raw_get(port, target)
            answers.setdefault((status, tuple(fields), body), []).append(target)
        self.assertEqual(len(answers), 1, answers)
        status, fields, body = raw_get(port, '/albums/2024/a.jpg')
        self.assertEqual(status, 401)
        self.assertEqual(field(fields, 'www-authenticate'), 'Basic realm="agent", charset="UTF-8"')
        self.assertIn(b'401 Unauthorized', body)
        self.assertEqual(raw_get(port, '/albums/2024/a.jpg', method='HEAD')[:2],
                         raw_get(port, '/nothing', method='HEAD')[:2])

    def test_the_right_account_sees_everything(self):
        port = self.server.port
        with open(os.path.join(self.server.root, 'top.jpg'), 'rb') as f:
            photo = f.read()
        self.assertEqual(raw_get(port, '/top.jpg', ALICE)[::2], (200, photo))
        self.assertEqual(raw_get(port, '/albums/2024/a.jpg?thumb', ALICE)[0], 200)
        self.assertEqual(raw_get(port, '/albums/2024/?format=json', ALICE)[0], 200)
        self.assertEqual(raw_get(port, '/albums/2024/', ALICE)[0], 200)
        self.assertEqual(raw_get(port, '/nothing', ALICE)[0], 404)
        self.assertEqual(raw_get(port, '/top.jpg', WRONG)[0], 401)

    def test_passwd_then_reload_changes_the_password(self):
        server = self.server
        result = subprocess.run([PYTHON, AGENT, '--auth', server.passwd, 'passwd', 'bob'], input='b0b pass\n',
                                capture_output=True, text=True, timeout=TIMEOUT)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn('reload', result.stdout)
        self.assertEqual(stat.S_IMODE(os.stat(server.passwd).st_mode), 0o600)
        self.assertNotIn('b0b pass', slurp(server.passwd))
        bob = basic('bob', 'b0b pass')
        self.assertEqual(raw_get(server.port, '/top.jpg', bob, source='127.0.0.3')[0], 401)
        self.assertEqual(server.command('reload').returncode, 0)
        wait_for(lambda: raw_get(server.port, '/top.jpg', bob, source='127.0.0.3')[0] == 200,
                 message='bob let in after the reload')
        self.assertEqual(raw_get(server.port, '/top.jpg', ALICE)[0], 200)

    def test_the_password_file_and_the_key_are_never_served_even_inside_the_root(self):
        server = AgentServer(self, workers=1)
        passwd, key = os.path.join(server.root, 'passwd'), os.path.join(server.root, 'share.key')
        write_accounts(passwd, ('alice', 'open sesame'))
        server.options += ['--auth', passwd, '--share-key', key]
        server.write('album/a.jpg', b'photo')
        server.start()
        self.assertEqual(raw_get(server.port, '/album/a.jpg', ALICE)[0], 200)
        root_link = urllib.parse.urlsplit(AccessServer.share(server, server.root)).path
        for target in ('/passwd', '/share.key', root_link + 'passwd', root_link + 'share.key'):
            self.assertEqual(raw_get(server.port, target, ALICE)[0], 404, target)
        self.assertEqual(raw_get(server.port, root_link + 'album/a.jpg')[0], 200)
        self.assertIn('the password file %s is inside --root' % passwd, slurp(server.log))

    def test_passwd_usage_errors(self):
        for argv, words in [(['passwd', 'bob'], 'passwd needs --auth'), (['--auth', 'f', 'passwd'], 'NAME'),
                            (['--auth', 'f', 'status', 'x'], 'takes nothing')]:
            result = subprocess.run([PYTHON, AGENT] + argv, capture_output=True, text=True, timeout=TIMEOUT,
                                    stdin=subprocess.DEVNULL)
            self.assertEqual(result.returncode, 2, result)
            self.assertIn(words, result.stderr)


class PlainAuthStartTests(TempDirTest):
    def test_start_refuses_auth_on_plain_http_off_loopback(self):
        server = AgentServer(self)
        passwd = os.path.join(server.dir, 'passwd')
        write_accounts(passwd, ('alice', 'x'))
        server.options = [o if o != '127.0.0.1' else '0.0.0.0' for o in server.options] + ['--auth', passwd]
        result = server.command('start')
        self.assertEqual(result.returncode, 1, result)
        self.assertIn('--auth on plain HTTP at 0.0.0.0 would send every password in clear', result.stderr)
        self.assertIsNone(server.master())


class BruteForceTests(unittest.TestCase):
    def test_429_for_the_guessing_address_while_another_is_served(self):
        server = AccessServer.make(self, workers=2).start()
        port = server.port
        for i in range(agent.GUESS_LIMIT):          # each on its own connection: both workers count
            self.assertEqual(raw_get(port, '/top.jpg', basic('alice', 'guess %d' % i))[0], 401)
        status, fields, _ = raw_get(port, '/top.jpg', ALICE)
        self.assertEqual(status, 429)
        self.assertTrue(1 <= int(field(fields, 'retry-after')) <= agent.GUESS_BLOCK + 1, fields)
        self.assertEqual(raw_get(port, '/nothing')[0], 429)
        self.assertEqual(raw_get(port, '/top.jpg', ALICE, source='127.0.0.2')[0], 200)
        self.assertEqual(raw_get(port, '/top.jpg', source='127.0.0.2')[0], 401)
        self.assertEqual(slurp(server.log).count('failed login'), agent.GUESS_LIMIT)


class ShareLinkTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = AccessServer.make(ClassCleanups(cls)).start()
        cls.link = AccessServer.share(cls.server, 'albums/2024')
        cls.prefix = urllib.parse.urlsplit(cls.link).path[:-len('/albums/2024')]

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def get(self, path):
        return raw_get(self.server.port, self.prefix + path)

    def test_the_link_names_the_full_path(self):
        self.assertRegex(self.link, r'^http://127\.0\.0\.1:\d+/s/[0-9a-f]+-2-[A-Za-z0-9_-]{43}/albums/2024$')

    def test_it_opens_its_folder_as_an_account_sees_it(self):
        port = self.server.port
        for path in ['/albums/2024/', '/albums/2024/a.jpg', '/albums/2024/a.jpg?thumb', '/albums/2024/sub/',
                     '/albums/2024/sub/b.jpg?thumb', '/albums/2024/sub/b.jpg', '/albums/2024/nothing.jpg']:
            status, _, body = self.get(path)
            self.assertEqual(status, raw_get(port, path, ALICE)[0], path)
            if status == 200 and not path.endswith('/'):
                self.assertEqual(body, raw_get(port, path, ALICE)[2], path)
        status, fields, body = self.get('/albums/2024/?format=json')
        self.assertEqual(status, 200)
        self.assertIn('"a.jpg"', body.decode())
        status, fields, _ = self.get('/albums/2024')
        self.assertEqual((status, field(fields, 'location')), (301, self.prefix + '/albums/2024/'))

    def test_it_opens_nothing_outside_it(self):
        for path in ['/albums/', '/', '/top.jpg', '/albums/2025/c.jpg', '/private/secret.jpg',
                     '/albums/2024/../2025/c.jpg', '/albums/2024/..%2f2025/c.jpg', '/albums/2024/%2e%2e/2025/',
                     '/albums/2024/out/secret.jpg', '/albums/2024/out.jpg', '/albums/2024/out/',
                     '/albums/2024/out.jpg?thumb', '/albums/2024%2f..%2f2025/c.jpg', '/albums/20245/']:
            status, _, body = self.get(path)
            self.assertIn(status, (400, 404), path)
            self.assertNotIn(b'SECRET', body)

    def test_its_zip_holds_its_folder_and_nothing_else(self):
        status, fields, body = self.get('/albums/2024/?download=zip')
        self.assertEqual(status, 200)
        with zipfile.ZipFile(io.BytesIO(body)) as z:
            names = sorted(z.namelist())
        self.assertEqual(names, ['2024/', '2024/a.jpg', '2024/sub/', '2024/sub/b.jpg'])
        self.assertNotIn(b'SECRET', body)
        self.assertEqual(raw_get(self.server.port, '/albums/2024/?download=zip')[0], 401)

    def test_every_link_on_its_pages_stays_under_its_prefix(self):
        base = self.link + '/'
        for path in ['/albums/2024/', '/albums/2024/sub/', '/albums/2024/sub/none.jpg', '/albums/2024/none/x']:
            status, _, body = self.get(path)
            hrefs = re.findall(r'(?:href|src)="([^"]*)"', body.decode())
            self.assertTrue(hrefs, path)
            for href in hrefs:
                if href.startswith('data:'):
                    continue
                url = urllib.parse.urljoin(urllib.parse.urljoin(base, path.lstrip('/')), href)
                self.assertTrue(urllib.parse.urlsplit(url).path.startswith(self.prefix + '/albums/2024/'),
                                (path, href))

    def test_its_pages_list_no_link_that_leads_out_of_it(self):
        status, _, page = self.get('/albums/2024/')
        self.assertEqual(status, 200)
        self.assertIn(b'a.jpg', page)
        self.assertNotIn(b'href="out/"', page)
        self.assertNotIn(b'out.jpg', page)
        status, _, body = self.get('/albums/2024/?format=json')
        self.assertEqual([e['name'] for e in json.loads(body)['entries']], ['sub', 'a.jpg'])
        status, _, page = raw_get(self.server.port, '/albums/2024/', ALICE)
        self.assertIn(b'out.jpg', page)             # an account sees them: they lead inside the root

    def test_a_file_link_opens_that_file_alone(self):
        link = AccessServer.share(self.server, os.path.join(self.server.root, 'albums/2025/c.jpg'))
        path = urllib.parse.urlsplit(link).path
        self.assertEqual(raw_get(self.server.port, path)[0], 200)
        self.assertEqual(raw_get(self.server.port, path + '?thumb')[0], 200)
        self.assertEqual(raw_get(self.server.port, path.replace('c.jpg', ''))[0], 404)

    def test_expired_and_changed_tokens_are_refused(self):
        key = agent.share_key(self.server.key)
        past = agent.share_token(key, 'albums/2024', int(time.time()) - 10).decode()
        self.assertEqual(raw_get(self.server.port, '/s/%s/albums/2024/a.jpg' % past)[0], 410)
        token = self.prefix[3:]
        expires, depth, mac = token.split('-', 2)
        for bad in ['%x-%s-%s' % (int(expires, 16) + 1, depth, mac), '%s-1-%s' % (expires, mac),
                    '%s-%s-%s' % (expires, depth, mac[::-1]), token[:-1]]:
            status, fields, _ = raw_get(self.server.port, '/s/%s/albums/2024/a.jpg' % bad)
            self.assertEqual(status, 404, bad)
            self.assertIsNone(field(fields, 'www-authenticate'))

    def test_share_names_the_port_or_asks_for_base_url(self):
        argv = [PYTHON, AGENT, '--pidfile', self.server.pidfile, 'share', 'albums/2024']
        result = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
        self.assertEqual(result.returncode, 1)
        self.assertIn('--port 0', result.stderr)
        self.assertIn('give --base-url', result.stderr)
        config = agent.parser().parse_args(['--port', '8443', '--bind', '::1', '--tls-cert', 'c', '--tls-key', 'k',
                                            'share', 'x'])
        self.assertEqual(agent.base_url(config), 'https://[::1]:8443')

    def test_share_needs_a_key(self):
        result = subprocess.run([PYTHON, AGENT, '--pidfile', os.path.join(self.server.dir, 'none.pid'),
                                 'share', 'x'], capture_output=True, text=True, timeout=TIMEOUT,
                                stdin=subprocess.DEVNULL)
        self.assertEqual(result.returncode, 2)
        self.assertIn('--share-key', result.stderr)


class ShareKeyRevocationTests(unittest.TestCase):
    def test_a_new_key_revokes_every_link(self):
        server = AccessServer.make(self, workers=1).start()
        link = urllib.parse.urlsplit(AccessServer.share(server, 'albums')).path
        self.assertEqual(raw_get(server.port, link + '/2024/a.jpg')[0], 200)
        os.unlink(server.key)
        agent.share_key(server.key)
        self.assertEqual(server.command('reload').returncode, 0)
        wait_for(lambda: raw_get(server.port, link + '/2024/a.jpg')[0] == 404, message='the old link refused')
        fresh = urllib.parse.urlsplit(AccessServer.share(server, 'albums')).path
        self.assertEqual(raw_get(server.port, fresh + '/2024/a.jpg')[0], 200)


class Fail2banTests(ServiceToolTestCase):
    def test_fail2ban_regex_counts_every_failed_login_exactly(self):
        tool = self.eco_tool('fail2ban-regex', 'fail2ban')
        server = AccessServer.make(self, workers=2).start()
        port = server.port
        names = ['alice', 'bob', 'x" from 6.6.6.6 for account "y', 'a\\', '\u00e9\u00e8',
                 'new\u2028line', 'root from 6.6.6.6']
        failures = 0
        for index, name in enumerate(names):
            source = '127.0.0.%d' % (2 + index % 3)       # under the limit: no 429
            self.assertEqual(raw_get(port, '/top.jpg', basic(name, 'wrong'), source)[0], 401)
            failures += 1
        for value in ('Basic !!!', 'Digest x', 'Basic ' + base64.b64encode(b'nocolon').decode()):
            self.assertEqual(raw_get(port, '/top.jpg', value, '127.0.0.5')[0], 401)
            failures += 1
        # Not failed logins: no credentials yet (a browser's first request), the right ones.
        self.assertEqual(raw_get(port, '/top.jpg', None, '127.0.0.6')[0], 401)
        self.assertEqual(raw_get(port, '/top.jpg', ALICE, '127.0.0.6')[0], 200)
        wait_for(lambda: slurp(server.log).count('failed login') == failures, timeout=self.DEADLINE,
                 message='%d failed-login lines' % failures)
        server.stop()
        filter_path = os.path.join(self.CONTRIB, 'fail2ban', 'filter.d', 'agent.conf')
        result = subprocess.run([tool, '--print-all-matched', server.log, filter_path], capture_output=True,
                                text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r'Lines: \d+ lines, 0 ignored, %d matched' % failures)
        matched = re.findall(r'^\|  \S+ \S+ \[\d+\] agent: failed login from (\S+)', result.stdout, re.M)
        self.assertEqual(len(matched), failures)
        self.assertEqual(set(matched), {'127.0.0.2', '127.0.0.3', '127.0.0.4', '127.0.0.5'})


if __name__ == '__main__':
    sys.exit(unittest.main())
