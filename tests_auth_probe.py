"""Wrong passwords must not hold a worker's loop (bench/probe_starve.py auth_many_addr).

With --auth, each Authorization value not verified yet costs a scrypt check (16 MiB, 50-100 ms
of CPU).  It ran in the worker's loop: a prober with 64 addresses (each under GuessTable's
limit) took another client's p99 from ~1 ms to 150-310 ms.  The check runs off the loop now, in
a hashing thread of the worker, and the request waits for its verdict, parked, while the loop
serves the others.
"""

import base64
import os
import selectors
import socket
import tempfile
import threading
import time
import unittest
from unittest import mock

# testlib first: it puts the repository and bench/ on sys.path.
import testlib
from testlib import TIMEOUT, AgentServer, wait_for, write_file
import agent
import tests_probe
from harness import raw_request

PASSWORD = 'open sesame'
HOLD = 5.0          # the longest a test's stand-in hash lasts if nothing releases it


def basic(name, password):
    return 'Basic ' + base64.b64encode(('%s:%s' % (name, password)).encode('utf-8')).decode()


ALICE = basic('alice', PASSWORD)


@testlib.unit
class AuthOffLoopTests(unittest.TestCase):
    """A worker in this process, with --auth, its connections over socketpairs, driven a loop
    turn at a time.  verify_password is held by the test (a hash as long as it wants), so that
    what the loop does meanwhile is seen, not timed."""

    @classmethod
    def setUpClass(cls):
        cls.record = agent.hash_password(PASSWORD)

    def setUp(self):
        root = tempfile.mkdtemp(prefix='agent-unit-')
        self.addCleanup(testlib.remove_tree, root)
        write_file(root, 'a.jpg', b'a' * 10)
        config = agent.parser().parse_args(['run', '--root', root])
        config.root = os.path.realpath(root)
        lifeline_r, lifeline_w = os.pipe()
        self.addCleanup(os.close, lifeline_r)
        self.addCleanup(os.close, lifeline_w)
        self.access = agent.Access({'alice': self.record}, None)
        with mock.patch('sys.stderr'):
            self.worker = agent.Worker(config, [], None, lifeline_r, access=self.access)
        self.addCleanup(self.worker.responder.files.clear)
        self.addCleanup(self.worker.selector.close)
        self.release = threading.Event()
        self.addCleanup(self.release.set)           # no check stays held after a test
        self.checked = []                           # the passwords checked, in order
        verify = agent.verify_password

        def held_verify(password, record):
            self.checked.append(password)
            self.release.wait(HOLD)
            return verify(password, record)
        patcher = mock.patch('agent.verify_password', held_verify)
        patcher.start()
        self.addCleanup(patcher.stop)
        logger = mock.patch('agent.log')
        self.log = logger.start()
        self.addCleanup(logger.stop)

    connect = tests_probe.ClientTurnTests.connect         # (peer) -> (Connection, client socket)
    received = tests_probe.ClientTurnTests.received       # (client) -> the bytes come so far

    def ask(self, peer, authorization, target='/a.jpg'):
        conn, client = self.connect(peer)
        client.sendall(raw_request(target, 'Authorization: ' + authorization))
        self.event(conn)
        return conn, client

    def event(self, conn):
        """conn readable, in a loop turn of its own: its client has its TURN_TIME (ReadyList),
        whatever the turns before took on a loaded machine."""
        self.worker.run_deferred()
        conn.on_event(selectors.EVENT_READ)

    def loop_turn(self, timeout=0.05):
        """One turn of the worker's loop: its events (a verdict among them), its ready list."""
        for key, mask in self.worker.selector.select(timeout):
            key.data(mask)
        self.worker.run_deferred()

    def answer(self, client):
        """What client receives once the loop has turned until something came (TIMEOUT at most)."""
        got = b''
        deadline = time.monotonic() + TIMEOUT
        while not got and time.monotonic() < deadline:
            self.loop_turn()
            got = self.received(client)
        return got

    def test_a_visitor_already_verified_is_served_while_a_password_is_checked(self):
        self.access.verified.store(ALICE, 'alice')
        guess, guess_client = self.ask('192.0.2.1', basic('alice', 'guess'))
        self.assertEqual(self.received(guess_client), b'',
                         'the check of a wrong password held the loop until its verdict')
        visitor, visitor_client = self.ask('192.0.2.2', ALICE)
        self.assertTrue(self.received(visitor_client).startswith(b'HTTP/1.1 200 OK'))
        self.release.set()
        answer = self.answer(guess_client)
        self.assertTrue(answer.startswith(b'HTTP/1.1 401 '), answer[:80])
        self.assertIn(b'\r\nWWW-Authenticate: Basic realm="agent"', answer)
        self.assertEqual(self.checked, ['guess'])
        self.assertEqual(self.access.guesses.find('192.0.2.1')[2], 1)
        self.assertEqual(self.log.call_args[0][0], 'agent: failed login from 192.0.2.1 for account "alice"')

    def test_a_new_login_waits_for_its_verdict_then_is_remembered(self):
        conn, client = self.ask('192.0.2.3', ALICE)
        self.assertEqual(self.received(client), b'')
        self.release.set()
        self.assertTrue(self.answer(client).startswith(b'HTTP/1.1 200 OK'))
        client.sendall(raw_request('/a.jpg', 'Authorization: ' + ALICE))
        self.event(conn)
        self.assertTrue(self.received(client).startswith(b'HTTP/1.1 200 OK'))
        self.assertEqual(self.checked, [PASSWORD])

    def test_one_value_on_several_connections_is_one_check(self):
        clients = [self.ask('192.0.2.4', basic('alice', 'same guess'))[1] for _ in range(3)]
        self.release.set()
        for client in clients:
            self.assertTrue(self.answer(client).startswith(b'HTTP/1.1 401 '))
        self.assertEqual(self.checked, ['same guess'])
        self.assertEqual(self.access.guesses.find('192.0.2.4')[2], 3)      # each request a failed login
        # A value known to be wrong is not hashed again: it is refused at once, and counted.
        again = self.ask('192.0.2.4', basic('alice', 'same guess'))[1]
        self.assertTrue(self.received(again).startswith(b'HTTP/1.1 401 '))
        self.assertEqual(self.checked, ['same guess'])
        self.assertEqual(self.access.guesses.find('192.0.2.4')[2], 4)

    def test_the_checks_waiting_are_bounded_and_a_client_with_no_failures_goes_first(self):
        self.ask('203.0.113.1', basic('alice', 'first'))
        wait_for(lambda: self.checked, message='the first check begun')     # the one in progress
        now = self.worker.clock.now
        failing = []
        for i in range(agent.AUTH_QUEUE - agent.AUTH_FRESH + 1):
            address = '198.51.100.%d' % (i + 1)
            self.access.guesses.failed(address, now)        # a client that failed before
            failing.append(self.ask(address, basic('alice', 'guess %d' % i))[1])
        refused = self.received(failing.pop())
        self.assertTrue(refused.startswith(b'HTTP/1.1 503 '), refused[:80])
        self.assertIn(b'\r\nRetry-After: 1\r\n', refused)
        self.assertIn(b'try again', refused)
        self.assertNotIn(b'WWW-Authenticate', refused)
        for client in failing:
            self.assertEqual(self.received(client), b'')
        # A login from a client with no failure counted still has a place, and is checked next.
        fresh = self.ask('192.0.2.50', ALICE)[1]
        self.assertEqual(self.received(fresh), b'')
        self.release.set()
        self.assertTrue(self.answer(fresh).startswith(b'HTTP/1.1 200 OK'))
        self.assertEqual(self.checked[:2], ['first', PASSWORD])
        for client in failing:
            self.assertTrue(self.answer(client).startswith(b'HTTP/1.1 401 '))
        # The places are free again.
        self.assertEqual(self.received(self.ask('198.51.100.99', basic('alice', 'x'))[1]), b'')

    def test_a_parked_requests_header_timeout_still_runs(self):
        conn, client = self.ask('192.0.2.5', basic('alice', 'slow'))
        self.assertEqual(self.received(client), b'')
        self.worker.clock.now = conn.deadline + 1
        self.worker.tick()
        self.assertEqual(conn.state, agent.CLOSED)
        self.release.set()
        wait_for(lambda: self.loop_turn() or self.access.refused.data, message='the verdict')
        self.assertEqual(conn.state, agent.CLOSED)

    def test_a_client_that_ends_its_side_while_its_request_waits_still_gets_the_answer(self):
        """A half-close (shutdown(SHUT_WR), as `nc -N` does after its request) is no reason to
        drop a request that waits for its verdict: it is answered, then the connection closed."""
        conn, client = self.ask('192.0.2.7', basic('alice', 'half'))
        client.shutdown(socket.SHUT_WR)
        conn.on_event(selectors.EVENT_READ)             # the EOF, read
        self.assertNotEqual(conn.state, agent.CLOSED, 'closed with its request unanswered')
        self.release.set()
        answer = self.answer(client)
        self.assertTrue(answer.startswith(b'HTTP/1.1 401 '), answer[:80])
        wait_for(lambda: self.loop_turn() or conn.state == agent.CLOSED, message='the close after the answer')

    def test_a_check_that_fails_is_a_refusal_and_a_line_in_the_log_not_a_stuck_request(self):
        with mock.patch('agent.verify_password', side_effect=MemoryError('scrypt: 1 GiB')):
            conn, client = self.ask('192.0.2.8', ALICE)
            answer = self.answer(client)
        self.assertTrue(answer.startswith(b'HTTP/1.1 401 '), answer[:80])
        lines = [call[0][0] for call in self.log.call_args_list]
        self.assertIn('worker: cannot check the password of account "alice" (refused): scrypt: 1 GiB', lines)
        self.assertEqual(lines[-1], 'agent: failed login from 192.0.2.8 for account "alice"')

    def test_the_hashing_thread_starts_in_the_worker_at_its_first_check_niced(self):
        self.assertIsNone(self.access.checks.thread, 'a hashing thread before any check')
        self.ask('192.0.2.6', ALICE)
        wait_for(lambda: self.checked, message='the first check begun')
        thread = self.access.checks.thread
        self.assertEqual(thread.name, 'agent: password checks')
        self.assertTrue(thread.daemon)
        with open('/proc/self/task/%d/stat' % thread.native_id) as f:
            niceness = int(f.read().rpartition(')')[2].split()[16])
        self.assertEqual(niceness, min(19, os.getpriority(os.PRIO_PROCESS, 0) + agent.AUTH_NICE))
        with open('/proc/self/task/%d/status' % thread.native_id) as f:
            blocked = next(line for line in f if line.startswith('SigBlk:'))
        self.assertEqual(int(blocked.split()[1], 16) & (1 << (15 - 1)), 1 << (15 - 1),
                         'TERM is not blocked in the hashing thread: it is the loop\'s')


class AuthOffLoopServerTests(unittest.TestCase):
    """A real agent: the master never has the hashing thread (it forks again, at reload), a
    worker has it once it has checked a password, and logins work after a reload."""

    def test_the_master_stays_one_thread_and_reload_forks_working_workers(self):
        server = AgentServer(self, workers=1)
        passwd = os.path.join(server.dir, 'passwd')
        with open(passwd, 'w') as f:
            f.write('alice:%s\n' % agent.hash_password(PASSWORD))
        os.chmod(passwd, 0o600)
        server.options += ['--auth', passwd]
        server.write('a.jpg', b'photo')
        server.start()
        self.assertEqual(server.get('/a.jpg', {'Authorization': basic('alice', 'wrong')})[0], 401)
        self.assertEqual(server.get('/a.jpg', {'Authorization': ALICE})[::2], (200, b'photo'))
        master = server.master()
        self.assertEqual(os.listdir('/proc/%d/task' % master), [str(master)])
        workers = server.workers()
        self.assertEqual([len(os.listdir('/proc/%d/task' % pid)) for pid in workers], [2])
        self.assertEqual(server.command('reload').returncode, 0)
        wait_for(lambda: workers[0] not in server.workers(), message='the old worker gone after reload')
        self.assertEqual(server.get('/a.jpg', {'Authorization': ALICE})[::2], (200, b'photo'))
        self.assertEqual(os.listdir('/proc/%d/task' % master), [str(master)])
