#!/usr/bin/env python3
"""Slow clients against agent.py: slowloris and slow readers must not starve ordinary requests.

What it proves
--------------
An agent is started here on 127.0.0.1 (2 workers, --header-timeout 5 by default) with a
sparse 50 MB file and a 10 KB one.  For --duration seconds (default 20) it is held by:
  * --slowloris connections (default 300): each sends a request line and a Host header, then
    trickles further header bytes, one every --interval seconds (default 1), never ending the
    head.  When the agent cuts one, the slot reconnects, so the pressure stays on;
  * --slow-readers connections (default 20): each sets a small SO_RCVBUF (default 4096), asks
    for the 50 MB file and reads it at --read-rate bytes a second (default 1024).
Meanwhile one ordinary client GETs the 10 KB file every --latency-interval seconds, on a new
connection and on a keep-alive one in turn, and times each request (connect to last byte).
PASS means all of:
  * the ordinary requests all succeed (200, the right bytes) and their p99 < --p99-limit ms
    (default 250);
  * every slowloris connection is cut by the agent between header-timeout - 0.25 s and
    header-timeout + --slack s (default 2.5: the agent checks deadlines once a second) after
    its first byte; none lives on past that, and nearly all the slots were held at once;
  * every slow reader got a `HTTP/1.1 200` head and bytes kept arriving (how long each was
    held and whether the agent cut it is reported: a reader that drains slower than the
    socket buffers can empty counts as a stalled send for the agent's --timeout);
  * no worker died (same worker pids before and after, no "died"/"respawning"/"Traceback"
    in the agent's log), and a clean request still succeeds at the end.
Then, if `slowhttptest` is installed (Debian package slowhttptest) and --slowhttptest-length
is not 0, it runs `slowhttptest -c 500 -H -i 10 -r 200 -t GET -u URL -x 24 -p 3 -l 30`
(bounded by a timeout) against the same agent while the ordinary client keeps timing
requests; PASS also needs its last "service available" to be YES and the same p99 bound.

How to run
----------
  python3 bench/slow.py                                   # full size (make slow), ~60 s
  python3 bench/slow.py --quick                           # CI size (make slow-ci)
  python3 bench/slow.py --slowhttptest-length 0           # without slowhttptest

Raises its own RLIMIT_NOFILE soft limit to the hard one for the sockets.  Loopback only;
the agent it starts is stopped on exit, on error and on Ctrl-C.  Exits 0 on PASS, 1 on FAIL,
with a one-line verdict last.  Standard library only.
"""

import argparse
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

HOST = '127.0.0.1'
SMALL = 'small.jpg'
BIG = 'big.bin'
SMALL_BYTES = bytes(range(256)) * 40                    # 10240 bytes
ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')


# ---------------------------------------------------------------------------------------------
# Slowloris: one thread, one selector, --slowloris slots that reconnect when cut
# ---------------------------------------------------------------------------------------------


class Slowloris(threading.Thread):
    HEAD = b'GET /' + SMALL.encode() + b' HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slowloris\r\n'
    TRICKLE = b'X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n'

    def __init__(self, port, count, interval, stop_at):
        threading.Thread.__init__(self, name='slowloris', daemon=True)
        self.port, self.count, self.interval, self.stop_at = port, count, interval, stop_at
        self.selector = selectors.DefaultSelector()
        self.cut_after = []             # seconds from first byte to the agent's close
        self.answers = []               # bytes the agent sent before closing (should be none)
        self.connect_errors = 0
        self.open_now = 0
        self.peak_open = 0
        self.open_at_end = 0
        self.ages_at_end = []           # seconds since the first byte of those still open at the end
        self.error = None

    def open_slot(self, now):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect_ex((HOST, self.port))
        except OSError:
            sock.close()
            self.connect_errors += 1
            return
        # state: [sock, first byte time, next send time, bytes sent, bytes received]
        state = [sock, None, now, 0, b'']
        self.selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, state)

    def run(self):
        try:
            self.loop()
        except Exception as exc:          # reported as a failure by the main thread
            self.error = repr(exc)

    def loop(self):
        now = time.monotonic()
        for _ in range(self.count):
            self.open_slot(now)
        while True:
            now = time.monotonic()
            if now >= self.stop_at:
                break
            keys = list(self.selector.get_map().values())
            self.open_now = len(keys)
            self.peak_open = max(self.peak_open, sum(1 for k in keys if k.data[1] is not None))
            events = self.selector.select(min(0.1, self.stop_at - now))
            now = time.monotonic()
            for key, mask in events:
                state = key.data
                sock = state[0]
                if mask & selectors.EVENT_READ:
                    try:
                        data = sock.recv(4096)
                    except (BlockingIOError, InterruptedError):
                        data = None
                    except OSError:
                        data = b''
                    if data:
                        state[4] += data
                    elif data is not None:
                        self.closed(state, now)
                        continue
                if mask & selectors.EVENT_WRITE:
                    if state[1] is None:
                        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            self.connect_errors += 1
                            self.drop(state)
                            self.open_slot(now)
                            continue
                        try:
                            sock.send(self.HEAD)
                        except OSError:
                            self.connect_errors += 1
                            self.drop(state)
                            self.open_slot(now)
                            continue
                        state[1] = now
                        state[2] = now + self.interval
                    self.selector.modify(sock, selectors.EVENT_READ, state)
            # the trickle: one byte per interval on every connected slot
            for key in list(self.selector.get_map().values()):
                state = key.data
                if state[1] is not None and now >= state[2]:
                    byte = self.TRICKLE[state[3] % len(self.TRICKLE):][:1]
                    try:
                        state[0].send(byte)
                        state[3] += 1
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:
                        self.closed(state, now)
                        continue
                    state[2] = now + self.interval
        now = time.monotonic()
        self.open_at_end = len(self.selector.get_map())
        for key in list(self.selector.get_map().values()):
            if key.data[1] is not None:
                self.ages_at_end.append(now - key.data[1])
            self.drop(key.data)

    def closed(self, state, now):
        if state[1] is not None:
            self.cut_after.append(now - state[1])
        if state[4]:
            self.answers.append(state[4])
        self.drop(state)
        if now < self.stop_at:
            self.open_slot(now)

    def drop(self, state):
        try:
            self.selector.unregister(state[0])
        except (KeyError, ValueError):
            pass
        state[0].close()

# ---------------------------------------------------------------------------------------------
# Slow readers: one thread, small receive buffers, a few bytes a tick
# ---------------------------------------------------------------------------------------------


class SlowReaders(threading.Thread):
    TICK = 0.25

    def __init__(self, port, count, rate, rcvbuf, stop_at):
        threading.Thread.__init__(self, name='slow-readers', daemon=True)
        self.port, self.count, self.rate, self.rcvbuf, self.stop_at = port, count, rate, rcvbuf, stop_at
        self.readers = []               # dicts: sock, start, bytes, head, cut (seconds or None)
        self.error = None

    def run(self):
        try:
            self.loop()
        except Exception as exc:
            self.error = repr(exc)

    def loop(self):
        for _ in range(self.count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.settimeout(5)
            reader = {'sock': sock, 'start': time.monotonic(), 'bytes': 0, 'head': b'', 'cut': None,
                      'error': None, 'last_progress': None}
            try:
                sock.connect((HOST, self.port))
                sock.sendall(b'GET /' + BIG.encode() + b' HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n')
                sock.setblocking(False)
            except OSError as exc:
                reader['error'] = 'connect: %s' % exc
                sock.close()
                reader['sock'] = None
            self.readers.append(reader)
        per_tick = max(1, int(self.rate * self.TICK))
        while time.monotonic() < self.stop_at:
            time.sleep(self.TICK)
            now = time.monotonic()
            for reader in self.readers:
                sock = reader['sock']
                if sock is None:
                    continue
                try:
                    data = sock.recv(per_tick)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b''
                if not data:
                    reader['cut'] = now - reader['start']
                    sock.close()
                    reader['sock'] = None
                    continue
                if len(reader['head']) < 64:
                    reader['head'] += data[:64]
                reader['bytes'] += len(data)
                reader['last_progress'] = now - reader['start']
        for reader in self.readers:
            if reader['sock'] is not None:
                reader['sock'].close()
                reader['sock'] = None

# ---------------------------------------------------------------------------------------------
# The ordinary client
# ---------------------------------------------------------------------------------------------


class Latency(threading.Thread):
    """GETs of the small file, alternately on a new and on a kept-alive connection."""

    def __init__(self, port, interval, stop_at, timeout=5.0):
        threading.Thread.__init__(self, name='latency', daemon=True)
        self.port, self.interval, self.stop_at, self.timeout = port, interval, stop_at, timeout
        self.samples = []               # seconds
        self.errors = []

    def run(self):
        kept = None
        n = 0
        while time.monotonic() < self.stop_at:
            n += 1
            fresh = n % 2 == 1 or kept is None
            started = time.monotonic()
            deadline = started + self.timeout
            try:
                if fresh:
                    sock = socket.create_connection((HOST, self.port), timeout=self.timeout)
                    request = b'GET /' + SMALL.encode() + b' HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'
                else:
                    sock = kept
                    request = b'GET /' + SMALL.encode() + b' HTTP/1.1\r\nHost: x\r\n\r\n'
                sock.sendall(request)
                response = harness.read_response(sock, deadline)
                status, body, closing = response.status, response.body, response.closing
                elapsed = time.monotonic() - started
                if status != 200 or body != SMALL_BYTES:
                    self.errors.append('status %d, %d bytes' % (status, len(body)))
                else:
                    self.samples.append(elapsed)
                if fresh:
                    sock.close()
                    if kept is None:
                        kept = socket.create_connection((HOST, self.port), timeout=self.timeout)
                elif closing:
                    kept.close()
                    kept = None
            except (OSError, ValueError, IndexError) as exc:
                self.errors.append('%s request: %s' % ('new' if fresh else 'kept-alive', exc))
                if not fresh and kept is not None:
                    kept.close()
                    kept = None
            pause = self.interval - (time.monotonic() - started)
            if pause > 0:
                time.sleep(pause)
        if kept is not None:
            kept.close()

    def summary(self):
        if not self.samples:
            return None, None, None
        return (harness.percentile(self.samples, 0.50) * 1000, harness.percentile(self.samples, 0.99) * 1000,
                max(self.samples) * 1000)

# ---------------------------------------------------------------------------------------------
# slowhttptest
# ---------------------------------------------------------------------------------------------


def run_slowhttptest(binary, port, args):
    command = [binary, '-c', str(args.slowhttptest_connections), '-H', '-i', '10', '-r', '200',
               '-t', 'GET', '-u', 'http://%s:%d/%s' % (HOST, port, SMALL), '-x', '24', '-p', '3',
               '-l', str(args.slowhttptest_length)]
    print('slowhttptest: ' + ' '.join(command), flush=True)
    try:
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                timeout=args.slowhttptest_length + 30)
        out = result.stdout.decode('utf-8', 'replace') + result.stderr.decode('utf-8', 'replace')
        code = result.returncode
    except subprocess.TimeoutExpired as exc:       # subprocess.run has killed it
        out = (exc.stdout or b'').decode('utf-8', 'replace')
        code = 'timeout'
    text = ANSI.sub('', out)
    available = re.findall(r'service available:\s*(YES|NO)', text)
    ended = re.findall(r'Test ended on (\d+)\w* second', text)
    status = re.findall(r'Exit status:\s*(.+)', text)
    connected = [int(n) for n in re.findall(r'connected:\s*(\d+)', text)]

    return {'code': code, 'available': available, 'ended': ended[-1] if ended else '?',
            'status': status[-1].strip() if status else '?', 'peak_connected': max(connected or [0]),
            'tail': text.strip().splitlines()[-3:]}

# ---------------------------------------------------------------------------------------------


def clean_get(port):
    try:
        with socket.create_connection((HOST, port), timeout=5) as sock:
            sock.sendall(b'GET /' + SMALL.encode() + b' HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
            response = harness.read_response(sock, time.monotonic() + 5)
            status, body = response.status, response.body
        return None if status == 200 and body == SMALL_BYTES else 'status %d, %d bytes' % (status, len(body))
    except (OSError, ValueError, IndexError) as exc:
        return str(exc)


def fmt(values, unit='s', spec='%.2f'):
    if not values:
        return 'none'
    ordered = sorted(values)
    return ('n=%d min {0}%s p50 {0}%s max {0}%s'.format(spec)
            % (len(ordered), ordered[0], unit, harness.percentile(ordered, 0.5), unit, ordered[-1], unit))


# (option, full size for `make slow`, CI size for `make slow-ci` and --quick)
SIZES = [('slowloris', 300, 100), ('slow_readers', 20, 5), ('duration', 20.0, 8.0),
         ('slowhttptest_length', 30, 10)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true',
                   help='CI-sized: the defaults marked "--quick:" (about 25 s in all)')
    p.add_argument('--slowloris', type=int, default=None,
                   help='slowloris connections (default 300; --quick: 100)')
    p.add_argument('--interval', type=float, default=1.0, help='seconds between trickled bytes (default 1)')
    p.add_argument('--slow-readers', type=int, default=None, help='slow readers (default 20; --quick: 5)')
    p.add_argument('--read-rate', type=int, default=1024, help='bytes/s each slow reader reads (default 1024)')
    p.add_argument('--rcvbuf', type=int, default=4096, help="slow readers' SO_RCVBUF (default 4096)")
    p.add_argument('--big-mb', type=int, default=50, help='size of the sparse file they read, MB (default 50)')
    p.add_argument('--duration', type=float, default=None,
                   help='seconds the slow clients are held (default 20; --quick: 8)')
    p.add_argument('--header-timeout', type=float, default=5.0, help="the agent's --header-timeout (default 5)")
    p.add_argument('--agent-timeout', type=float, default=None,
                   help="the agent's --timeout (idle keep-alive, stalled send); default: the agent's own")
    p.add_argument('--slack', type=float, default=2.5,
                   help='how late after the header timeout a cut may come, s (default 2.5)')
    p.add_argument('--latency-interval', type=float, default=0.02,
                   help='seconds between ordinary requests (default 0.02)')
    p.add_argument('--p99-limit', type=float, default=250.0, help='ms (default 250)')
    p.add_argument('--min-held', type=float, default=0.9,
                   help='fraction of the slowloris slots that must be open at once (default 0.9)')
    p.add_argument('--workers', type=int, default=2, help='agent workers (default 2)')
    p.add_argument('--slowhttptest-length', type=int, default=None,
                   help='slowhttptest -l seconds; 0 skips it (default 30; --quick: 10)')
    p.add_argument('--slowhttptest-connections', type=int, default=500, help='slowhttptest -c (default 500)')
    p.add_argument('--keep', action='store_true', help="keep the agent's temporary directory")
    p.add_argument('--agent', help='the agent.py to start (default: the one beside bench/)')
    args = p.parse_args(argv)
    for name, full, quick in SIZES:
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)

    limit = harness.raise_nofile(args.slowloris + args.slow_readers + 200)
    needed = args.slowloris + args.slow_readers + 100
    if limit < needed:
        print('FAIL: slow: RLIMIT_NOFILE is %d, %d sockets need %d' % (limit, args.slowloris, needed))
        return 1
    options = ['--header-timeout', '%g' % args.header_timeout]
    if args.agent_timeout:
        options += ['--timeout', '%g' % args.agent_timeout]
    server = harness.AgentProcess(workers=args.workers, options=options, keep=args.keep, agent=args.agent)
    reasons = []
    try:
        with open(os.path.join(server.root, SMALL), 'wb') as f:
            f.write(SMALL_BYTES)
        with open(os.path.join(server.root, BIG), 'wb') as f:
            f.truncate(args.big_mb * 1000 * 1000)            # sparse: no disk used
        server.start()
        port = server.port
        workers_before = server.workers()
        print('slow: agent on 127.0.0.1:%d, workers %s, --header-timeout %g; %d slowloris, %d slow '
              'readers for %gs' % (port, workers_before, args.header_timeout, args.slowloris,
                                   args.slow_readers, args.duration), flush=True)

        # Phase 1: our own slow clients, with the ordinary client timing requests.
        start = time.monotonic()
        stop_at = start + args.duration
        loris = Slowloris(port, args.slowloris, args.interval, stop_at)
        readers = SlowReaders(port, args.slow_readers, args.read_rate, args.rcvbuf, stop_at)
        loris.start()
        readers.start()
        time.sleep(min(1.0, args.duration / 4))           # let the slow ones settle in first
        latency = Latency(port, args.latency_interval, stop_at)
        latency.start()
        bound = args.duration + 30
        for thread in (loris, readers, latency):
            thread.join(max(0.1, start + bound - time.monotonic()))
            if thread.is_alive():
                reasons.append('%s thread still running after %gs' % (thread.name, bound))
        for thread in (loris, readers):
            if thread.error:
                reasons.append('%s thread error: %s' % (thread.name, thread.error))

        p50, p99, worst = latency.summary()
        print('ordinary requests: %d ok, %d failed; p50 %s ms, p99 %s ms, max %s ms'
              % (len(latency.samples), len(latency.errors), '%.1f' % p50 if p50 is not None else '-',
                 '%.1f' % p99 if p99 is not None else '-', '%.1f' % worst if worst is not None else '-'))
        if latency.errors:
            reasons.append('%d ordinary request(s) failed, first: %s' % (len(latency.errors), latency.errors[0]))
        if p99 is None or p99 >= args.p99_limit:
            reasons.append('p99 %s ms >= %g ms' % ('-' if p99 is None else '%.1f' % p99, args.p99_limit))

        cuts = loris.cut_after
        early = [c for c in cuts if c < args.header_timeout - 0.25]
        late = [c for c in cuts + loris.ages_at_end if c > args.header_timeout + args.slack]
        print('slowloris: %d slots, peak %d held at once, %d cut by the agent (%s after the first '
              'byte), %d still open at the end (aged %s), %d connect errors'
              % (args.slowloris, loris.peak_open, len(cuts), fmt(cuts), loris.open_at_end,
                 fmt(loris.ages_at_end), loris.connect_errors))
        if args.duration > args.header_timeout + args.slack and not cuts:
            reasons.append('no slowloris connection was cut within %gs' % args.duration)
        if early:
            reasons.append('%d slowloris cut early (min %.2fs < %gs)' % (len(early), min(early), args.header_timeout))
        if late:
            reasons.append('%d slowloris cut late or never (max %.2fs > %gs + %gs)'
                           % (len(late), max(late), args.header_timeout, args.slack))
        if loris.peak_open < args.min_held * args.slowloris:
            reasons.append('only %d of %d slowloris slots held at once' % (loris.peak_open, args.slowloris))
        if loris.answers:
            print('slowloris: %d connection(s) got bytes before the close, first: %r'
                  % (len(loris.answers), loris.answers[0][:120]))
            for answer in loris.answers:
                if not answer.startswith(b'HTTP/1.1 408 '):
                    reasons.append('a slowloris connection got %r' % answer[:60])
                    break

        bad_head = [r for r in readers.readers if not r['head'].startswith(b'HTTP/1.1 200 ')]
        reader_errors = [r['error'] for r in readers.readers if r['error']]
        cut_readers = [r['cut'] for r in readers.readers if r['cut'] is not None]
        got = [r['bytes'] for r in readers.readers]
        rates = [r['bytes'] / max(1e-9, (r['cut'] or args.duration)) for r in readers.readers]
        print('slow readers: %d, %d held to the end, %d cut by the agent (%s); bytes read %s, '
              '%.0f B/s each on average'
              % (len(readers.readers), len(readers.readers) - len(cut_readers) - len(reader_errors),
                 len(cut_readers), fmt(cut_readers), fmt(got, ' B', '%d'), sum(rates) / max(1, len(rates))))
        if reader_errors:
            reasons.append('%d slow reader(s) failed: %s' % (len(reader_errors), reader_errors[0]))
        if bad_head:
            reasons.append('%d slow reader(s) got no 200 head, first %r' % (len(bad_head), bad_head[0]['head']))

        # Phase 2: slowhttptest, with the ordinary client timing requests again.
        binary = shutil.which('slowhttptest')
        if args.slowhttptest_length and binary:
            stop_at = time.monotonic() + args.slowhttptest_length + 30
            latency2 = Latency(port, args.latency_interval, stop_at)
            latency2.start()
            report = run_slowhttptest(binary, port, args)
            latency2.stop_at = 0                          # stop timing once slowhttptest is done
            latency2.join(10)
            q50, q99, qmax = latency2.summary()
            verdict = report['available'][-1] if report['available'] else '?'
            print('slowhttptest: service available at the end: %s (%d status reports, %d NO); '
                  'peak connected %d; test ended on second %s; exit status: %s; exit code %s'
                  % (verdict, len(report['available']), report['available'].count('NO'),
                     report['peak_connected'], report['ended'], report['status'], report['code']))
            print('ordinary requests during slowhttptest: %d ok, %d failed; p50 %s ms, p99 %s ms, max %s ms'
                  % (len(latency2.samples), len(latency2.errors), '%.1f' % q50 if q50 is not None else '-',
                     '%.1f' % q99 if q99 is not None else '-', '%.1f' % qmax if qmax is not None else '-'))
            if verdict != 'YES':
                reasons.append('slowhttptest: service available %s at the end (%s)'
                               % (verdict, ' / '.join(report['tail'])))
            if latency2.errors:
                reasons.append('%d ordinary request(s) failed during slowhttptest, first: %s'
                               % (len(latency2.errors), latency2.errors[0]))
            if q99 is not None and q99 >= args.p99_limit:
                reasons.append('p99 during slowhttptest %.1f ms >= %g ms' % (q99, args.p99_limit))
        elif args.slowhttptest_length:
            print('slowhttptest: not installed (apt-get install slowhttptest); skipped')

        problem = clean_get(port)
        if problem:
            reasons.append('clean request at the end: %s' % problem)
        reasons += server.health(workers_before)
    except Exception as exc:
        reasons.append('harness error: %s: %s' % (type(exc).__name__, exc))
    finally:
        server.stop()
        server.cleanup()

    if reasons:
        print('FAIL: slow: ' + '; '.join(reasons))
        return 1
    print('PASS: slow: %d slowloris (cut after %.2f-%.2fs, header timeout %gs) + %d slow readers for %gs; '
          'ordinary p99 %.1f ms < %g ms; no worker died'
          % (args.slowloris, min(cuts) if cuts else 0, max(cuts) if cuts else 0, args.header_timeout,
             args.slow_readers, args.duration, p99, args.p99_limit))
    return 0


if __name__ == '__main__':
    sys.exit(main())
