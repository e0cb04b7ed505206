"""Outside probing, round two (bench/probe_starve.py): one client must not starve the others,
however many connections it opens and whatever it asks for.
"""

import io
import os
import re
import selectors
import socket
import tempfile
import unittest
from unittest import mock

# testlib first: it puts the repository and bench/ on sys.path.
import testlib
from testlib import edge_worker, write_file
import agent
from harness import raw_request


@testlib.unit
class ClientTurnTests(unittest.TestCase):
    """A worker's loop turn is shared by clients, not by connections: a client's connections
    together get one turn's time (TURN_TIME) a loop turn, and a connection's turn ends at that
    time whatever it is doing, pieces of a response included (a zip of many small files).
    Before: each connection had its own turn, so four connections of one client pipelining
    gallery pages (bench/probe_starve.py gallery_varying) held a worker four times as long as
    one, and a zip of 5,000 small files went out in one turn (zip_flood: another client's p99
    0.99 s).  A worker in this process, connections over socketpairs, driven a turn at a time."""

    def setUp(self):
        self.worker, self.root = edge_worker(self)
        write_file(self.root, 'a.jpg', b'a' * 10)
        write_file(self.root, 'b.jpg', b'b' * 20)
        os.mkdir(os.path.join(self.root, 'many'))
        for i in range(50):
            write_file(self.root, 'many/p%02d.jpg' % i, b'x' * (i + 1))

    def connect(self, peer):
        server_end, client = socket.socketpair()
        for sock in (server_end, client):
            sock.setblocking(False)
            self.addCleanup(sock.close)
        conn = agent.Connection(server_end, peer, self.worker)
        self.worker.conns.add(conn)
        return conn, client

    def received(self, client):
        got = b''
        try:
            while True:
                chunk = client.recv(1 << 20)
                if not chunk:
                    break
                got += chunk
        except BlockingIOError:
            pass
        return got

    def test_a_clients_connections_share_one_turn_and_each_has_its_own_in_order(self):
        with mock.patch.object(agent, 'TURN_TIME', 0.0):       # every request fills a turn
            floods = [self.connect('192.0.2.1') for _ in range(4)]
            other, other_client = self.connect('192.0.2.2')
            for _, client in floods:
                client.sendall(raw_request('/a.jpg') * 3)
            other_client.sendall(raw_request('/b.jpg'))
            for conn, _ in floods:
                conn.on_event(selectors.EVENT_READ)
            other.on_event(selectors.EVENT_READ)
            answered = [self.received(client).count(b'HTTP/1.1 200 OK') for _, client in floods]
            self.assertEqual(sum(answered), 1, 'one client, four connections: %s answers in one turn' % answered)
            self.assertTrue(self.received(other_client).startswith(b'HTTP/1.1 200 OK'),
                            'another client waited for the first one')
            turns = 0
            first_answer = {0: 0} if answered[0] else {}
            while sum(answered) < 12 and turns < 40:
                turns += 1
                self.worker.run_deferred()
                got = [self.received(client).count(b'HTTP/1.1 200 OK') for _, client in floods]
                self.assertLessEqual(sum(got), 1, 'turn %d answered %s' % (turns, got))
                for i, count in enumerate(got):
                    if count:
                        first_answer.setdefault(i, turns)
                    answered[i] += count
            self.assertEqual(answered, [3, 3, 3, 3])
            # Round robin among the client's own connections: none waits for the others' ends.
            self.assertEqual(sorted(first_answer.values()), [0, 1, 2, 3])
            for conn, _ in floods:
                self.assertEqual((conn.state, conn.inbuf, conn.queued), (agent.READING, b'', False))

    def test_an_ipv6_client_is_its_64(self):
        """Four addresses of one /64 (one host's, RFC 6177) are one client; another /64 is not."""
        with mock.patch.object(agent, 'TURN_TIME', 0.0):
            floods = [self.connect('2001:db8:1:2::%x' % (i + 1)) for i in range(4)]
            other, other_client = self.connect('2001:db8:1:3::1')
            for conn, client in floods + [(other, other_client)]:
                client.sendall(raw_request('/a.jpg') * 2)
                conn.on_event(selectors.EVENT_READ)
            answered = [self.received(client).count(b'HTTP/1.1 200 OK') for _, client in floods]
            self.assertEqual(sum(answered), 1, 'one /64, four addresses: %s answers in one turn' % answered)
            self.assertEqual(self.received(other_client).count(b'HTTP/1.1 200 OK'), 1)

    def test_a_response_of_many_pieces_yields_within_its_turn(self):
        conn, client = self.connect('192.0.2.1')
        client.sendall(raw_request('/many/?download=zip'))
        with mock.patch.object(agent, 'TURN_TIME', 0.0):
            conn.on_event(selectors.EVENT_READ)
            first = self.received(client)
            self.assertTrue(first.startswith(b'HTTP/1.1 200 OK'), first[:80])
            self.assertTrue(conn.queued, 'a zip of 50 files went out in one turn')
            body = first.split(b'\r\n\r\n', 1)[1]
            length = int(re.search(rb'Content-Length: (\d+)', first).group(1))
            turns = 0
            while conn.state == agent.SENDING and turns < 1000:
                turns += 1
                self.worker.run_deferred()
                body += self.received(client)
        self.assertGreater(turns, 10)
        self.assertEqual(len(body), length)
        import io
        import zipfile
        names = zipfile.ZipFile(io.BytesIO(body)).namelist()
        self.assertEqual(len(names), 51)


@testlib.unit
class CostlyPageTests(unittest.TestCase):
    """A folder's pages sorted by size or date are cut from every entry's stat: kept PAGE_TTL,
    as the page itself is, so that a client asking for every sort and page of a large folder
    (bench/probe_starve.py gallery_varying) costs a stat of the folder a second, not one a
    request (75-100 ms a request for 5,000 files)."""

    def setUp(self):
        self.worker, self.root = edge_worker(self)
        self.folder = os.path.join(self.root, 'many')
        os.mkdir(self.folder)
        for i in range(3 * agent.GALLERY_PAGE_SIZE):
            write_file(self.folder, 'p%04d.jpg' % i, b'x' * (i % 50))

    def page(self, query):
        raw = b'GET /many/?%s HTTP/1.1\r\nHost: x\r\n\r\n' % query.encode()
        response = self.worker.responder.respond(agent.parse_request(raw)[0])
        self.assertEqual(response[0], 200, query)
        return response

    def test_pages_by_size_or_date_do_not_stat_the_folder_again_within_page_ttl(self):
        self.page('sort=size')
        with mock.patch.object(agent.os, 'stat', wraps=os.stat) as stat:
            def entries_stated():      # stat()s of entries by name in the folder (stat_entries)
                return sum(1 for call in stat.call_args_list if 'dir_fd' in call.kwargs)
            for query in ('sort=size&page=2', 'sort=size&page=3', 'sort=date', 'sort=date&page=2',
                          'sort=size&format=json', 'sort=size&page=2&v=1'):
                self.page(query)
            self.assertEqual(entries_stated(), 0, 'the folder stat()ed again')
            self.worker.clock.now += agent.PAGE_TTL
            self.page('sort=size&page=2')
            self.assertEqual(entries_stated(), 3 * agent.GALLERY_PAGE_SIZE)


class ThumbnailerPriorityTests(unittest.TestCase):
    """A thumbnailer run (?thumb of a picture with no embedded thumbnail) is a child of the
    worker that may take a whole CPU for seconds, THUMB_SLOTS of them at once: they run at a
    lower priority (THUMB_NICE), so that the workers' requests go first.  Before: at the
    workers' own, and a client asking for the ?thumb of 200 new pictures (bench/probe_starve.py
    thumb_flood) took another client's p99 from 2 to 33-120 ms on two CPUs."""

    def test_a_run_is_niced_below_its_worker(self):
        out = os.path.join(tempfile.mkdtemp(prefix='agent-nice-'), 'nice')
        self.addCleanup(testlib.remove_tree, os.path.dirname(out))
        # Field 19 of /proc/PID/stat is the nice value; the shell's is the run's (exec keeps it).
        pid = agent.spawn_limited(['/bin/sh', '-c', 'cut -d " " -f 19 /proc/$$/stat > %s' % out])
        _, status = os.waitpid(pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)
        with open(out) as f:
            niceness = int(f.read())
        worker = os.getpriority(os.PRIO_PROCESS, 0)
        self.assertGreater(niceness, worker, 'a thumbnailer run at its worker\'s priority')
        self.assertEqual(niceness, min(19, worker + agent.THUMB_NICE))


@testlib.unit
class GuessBlockTests(unittest.TestCase):
    """Failed logins are counted by client, and an IPv6 client is its /64 (the block one host
    or one subscriber line is given, RFC 6177): otherwise each of its 2^64 addresses had
    GUESS_LIMIT guesses of its own, each a scrypt check of 50-100 ms in a worker's loop
    (bench/probe_starve.py auth_many_addr, 64 addresses: another client's p99 0.9 -> 183 ms)."""

    def test_the_addresses_of_one_ipv6_64_share_a_count(self):
        table = agent.GuessTable()
        for i in range(agent.GUESS_LIMIT):
            table.failed('2001:db8:1:2::%x' % (i + 1), 100.0)
        self.assertEqual(table.blocked('2001:db8:1:2:ffff::9', 100.0), agent.GUESS_BLOCK + 1)
        self.assertEqual(table.blocked('2001:db8:1:3::1', 100.0), 0)            # another /64
        for i in range(agent.GUESS_LIMIT):
            table.failed('192.0.2.%d' % (i + 1), 100.0)
        self.assertEqual(table.blocked('192.0.2.99', 100.0), 0)                 # IPv4: by address
        self.assertEqual(table.blocked('192.0.2.1', 100.0), 0)
        for _ in range(agent.GUESS_LIMIT - 1):
            table.failed('192.0.2.1', 100.0)
        self.assertEqual(table.blocked('192.0.2.1', 100.0), agent.GUESS_BLOCK + 1)


class CrowdingClientTests(unittest.TestCase):
    """At the connection cap, a client holding more than half of it gives one up for a newcomer
    (its longest idle, else the one waiting longest for its head; never a response in flight):
    one client's slow heads (slowloris) no longer hold every place.  Before: with none idle,
    the worker paused accepting until one ended, so one client's 500 connections trickling
    their heads kept every other client out for --header-timeout, again and again
    (bench/probe_starve.py conn_exhaust: no fresh request answered in 4 s)."""

    def test_a_client_holding_the_cap_makes_room_for_another(self):
        server = testlib.AgentServer(self, '--max-connections', '4', '--header-timeout', '60', workers=1).start()
        server.write('c.jpg', b'C' * 100)
        slow = []
        for _ in range(6):                      # 4 accepted, 2 in the listen backlog
            sock = server.connect(timeout=20)
            self.addCleanup(sock.close)
            sock.sendall(b'GET /c.jpg HTTP/1.1\r\n')     # a head that never ends
            slow.append(sock)
        other = socket.create_connection(('127.0.0.1', server.port), timeout=20,
                                          source_address=('127.0.0.2', 0))
        self.addCleanup(other.close)
        other.sendall(raw_request('/c.jpg', 'Connection: close'))
        got = b''
        while True:
            data = other.recv(65536)            # a socket.timeout fails the test: kept out
            if not data:
                break
            got += data
        self.assertTrue(got.startswith(b'HTTP/1.1 200 OK'), got[:80])
        self.assertTrue(got.endswith(b'C' * 100))
        # Seven connections for four places: the crowding client gave up three, before the
        # other client's was accepted (its connections' closes came first).
        closed = 0
        for sock in slow:
            sock.setblocking(False)
            try:
                closed += sock.recv(1) == b''
            except BlockingIOError:
                pass
        self.assertEqual(closed, 3)
        for sock in slow:
            sock.close()                        # or stop waits for their heads
        server.stop()


@testlib.unit
class CrowdingOutOfDescriptorsTests(unittest.TestCase):
    """Out of descriptors before the cap (a hard RLIMIT_NOFILE below --max-connections), the
    same rule makes room: a client holding more than half of the connections gives one up.
    Before: only an idle connection could, so one client's slow heads took every descriptor
    and the worker paused accepting, a second at a time, until they ended."""

    def connection(self, worker, peer, data):
        """A Connection of worker from peer (a socketpair), which has read data once."""
        server_end, client = socket.socketpair()
        for sock in (server_end, client):
            sock.setblocking(False)
            self.addCleanup(sock.close)
        conn = agent.Connection(server_end, peer, worker)
        worker.conns.add(conn)
        client.sendall(data)
        conn.on_event(selectors.EVENT_READ)
        return conn

    def test_out_of_descriptors_a_crowding_client_makes_room(self):
        worker, root = edge_worker(self)
        conns = {i: self.connection(worker, peer, b'GET /a.jpg HTTP/1.1\r\n')     # mid-head: none is idle
                 for i, peer in enumerate(['192.0.2.1'] * 3 + ['192.0.2.2'])}
        with mock.patch('sys.stderr', new_callable=io.StringIO) as err:
            made = worker.acceptor.make_room(OSError(24, 'Too many open files'))
            self.assertTrue(made, 'no room made: accept pauses')
            closed = [i for i, conn in conns.items() if conn.state == agent.CLOSED]
            self.assertEqual(len(closed), 1)
            self.assertIn(closed[0], (0, 1, 2))
            self.assertLess(len(worker.conns), 4)
            # The operator learns it (LimitNOFILE too low, or an attack), once while it lasts:
            # each new connection may need room again, and a line each would bury the journal.
            self.assertTrue(worker.acceptor.make_room(OSError(24, 'Too many open files')))
        said = [line for line in err.getvalue().splitlines() if 'Too many open files' in line]
        self.assertEqual(len(said), 1, err.getvalue())
        self.assertIn('192.0.2.1', said[0])

    def test_a_response_in_flight_is_never_cut_for_room(self):
        """A client's responses being sent are never cut to make room, however many it holds:
        behind a load balancer that sends no PROXY header, every connection is one client's,
        and cutting a download in flight loses a visitor's bytes to let in another request of
        the same balancer.  With none idle and none waiting for its head, accepting waits, as
        nginx's does at worker_connections."""
        worker, root = edge_worker(self)
        with open(os.path.join(root, 'big.jpg'), 'wb') as f:
            f.write(b'\xff' * (8 << 20))
        conns = []
        for peer in ['192.0.2.1'] * 3 + ['192.0.2.2']:
            conn = self.connection(worker, peer, b'GET /big.jpg HTTP/1.1\r\nHost: x\r\n\r\n')   # never read
            for _ in range(100):                # its client's turn may be spent: the next ones
                if conn.state == agent.SENDING:
                    break
                worker.run_deferred()
            self.assertEqual(conn.state, agent.SENDING)
            conns.append(conn)
        self.assertIsNone(worker.crowding())
        with mock.patch('sys.stderr'):
            self.assertFalse(worker.acceptor.make_room(OSError(24, 'Too many open files')))
        self.assertEqual([conn.state for conn in conns], [agent.SENDING] * 4)


if __name__ == '__main__':
    unittest.main()
