#!/usr/bin/env python3
"""Soak test for agent.py: minutes of mixed load with files changing underneath; nothing may leak.

What it proves
--------------
An agent is started here on 127.0.0.1 (--workers, default 2) over a tree of stable files and
two sets of "churn" files.  For --duration seconds (default 180; --quick: 30) wrk runs a Lua
script (generated into a temporary directory) with --connections connections, one per wrk
thread, so that each response is matched to the request that asked for it.  Each request picks
its kind at random:
    keep-alive GET of a stable file     200, body length = the file's size        (45 %)
    GET with `Connection: close`        200, the same length, and `Connection: close` back (17 %)
    Range (and If-Range) on a stable file   206 with the range's length, or 416 for a range
                                        past the end                              (17 %)
    GET of a missing file               404 (random names from 100000: the worker's path
                                        cache keeps filling up and starting over)  (12 %)
    GET of an "atomic" churn file       200 or 404, depending on the moment        (9 %)
A response counts as an error if its status (and, where it is known, its body length) is not
the one its kind expects; the intended 404s and 416s are counted apart, never as errors.
wrk's socket errors (connect, read, write, timeout) are errors too.

Conditional requests come from a client of our own (--cond-connections keep-alive
connections, up to --cond-rate a second): If-None-Match with each file's real ETag (read back
with HEAD; exact, W/, in a list) and If-Modified-Since with its Last-Modified; each must be a
304 with that ETag and no body, which wrk could not check.  (This is how the soak found that
the agent's 304 used to carry the 200's Content-Length, on which wrk's HTTP parser stalls
waiting for a body; the agent now sends validators only, as nginx does.)

Meanwhile:
  * a mutator thread, every --churn-interval seconds (default 0.5), changes a churn file:
    "atomic" files (which wrk also requests) are deleted, re-created or replaced with new
    content written to a temporary name and renamed over them; "in-place" files (requested by
    the checker only: a file truncated under a response in flight cannot be served whole, by
    any server) are rewritten with O_TRUNC, overwritten and truncated, deleted, re-created.
    Every change gives the file a new size;
  * a checker thread, right after each change (and a few times a second otherwise), asks for
    the file on a keep-alive connection held to *each* worker (found from /proc/net/tcp and
    /proc/PID/fd) and on a new connection with the previous ETag in If-None-Match, plus a
    Range of it: a deleted file must be 404 and a replaced one exactly its new bytes (206:
    exactly the slice); an earlier version, a 304 for the old ETag, or a 404 for a file that
    exists is a stale response.  The mutator waits while a check runs, so the expected
    content is exact;
  * every --sample-interval seconds (default 5; --quick: 2) each worker's open fd count
    (len(os.listdir('/proc/PID/fd'))), how many of those are client connections (sockets other
    than the listener), and VmRSS are sampled.
PASS means all of:
  * zero errors (socket errors, unexpected statuses or lengths, a `Connection: close` request
    answered without it, a conditional request not answered 304), and the checker saw zero
    stale or wrong responses and no failed request; the checker held a connection to every
    worker;
  * flat resources, comparing the first sample after --warmup seconds (default 20; --quick: 8)
    with the last one, per worker:
      - fds other than client connections within +-16 (--fd-tolerance).  They are the
        listener, pipes, epoll, logs (11) plus one per file in the worker's open-file cache:
        the served set is about 20 files, so a change of more than 16 means descriptors
        are leaking (or the cache forgot to close evicted files);
      - the client connections a worker holds never exceed what the clients have open
        (wrk's connections + the checker's), summed over the workers, at every sample.
        len(os.listdir()) is reported as such, and its drift is bounded by --fd-tolerance +
        --connections: connections move between workers as `Connection: close` requests
        reconnect, so the raw count swings by up to --connections on its own;
      - VmRSS within +-3 MB (--rss-tolerance-mb).  After the warm-up every cache is full (path
        and log-escape caches of 4096 entries, the 2 MiB small-file body budget), so a worker
        has no reason to grow; 3 MB over ~1M requests is 3 bytes a request, so any per-request
        leak shows, while allocator noise (a few hundred KB) does not;
  * no worker died (same pids before and after, no "died"/"respawning"/"Traceback" in the
    agent's log), and a clean GET still succeeds at the end.
A WARN line (not a failure) reports deleted churn files the workers still hold open at the end.

How to run
----------
  python3 bench/soak.py                      # 180 s (make soak)
  python3 bench/soak.py --quick              # 30 s
  python3 bench/soak.py --duration 600 --connections 32

Needs wrk (`apt-get install -y wrk`).  Loopback only; the agent it starts is stopped on exit,
on error and on Ctrl-C, and wrk is bounded by --duration + 60 s.  Exits 0 on PASS, 1 on FAIL,
with a one-line verdict last.  Standard library only.
"""

import argparse
import os
import queue
import random
import shutil
import socket
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import fetch  # noqa: E402

HOST = '127.0.0.1'
STABLE = {                                  # path under the root -> size
    's/1k.jpg': 1024, 's/20k.jpg': 20000, 's/31k.png': 31000,
    's/100k.jpg': 100000, 's/300k.webp': 300000, 's/index.html': 5000,
}
ATOMIC = ['a/a%02d.jpg' % i for i in range(8)]      # requested by wrk and by the checker
INPLACE = ['p/p%02d.png' % i for i in range(6)]     # requested by the checker only
CHURN_SIZES = (100, 60000)
MISSING_NAMES = 100000

# ---------------------------------------------------------------------------------------------
# /proc helpers (bench/chaos.py uses them too)
# ---------------------------------------------------------------------------------------------


def proc_sample(pid, listeners=1):
    """{'fds', 'conns', 'rss_kb', 'cpu'} of a process from /proc; None once it is gone.

    conns: its sockets minus the listening ones (the only sockets a worker has).  cpu: user +
    system time in clock ticks.
    """
    try:
        names = os.listdir('/proc/%d/fd' % pid)         # OSError once it is gone
        sockets = sum(target.startswith('socket:') for target in harness.open_fds(pid).values())
        rss = 0
        with open('/proc/%d/status' % pid) as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    rss = int(line.split()[1])
        with open('/proc/%d/stat' % pid, 'rb') as f:
            stat = f.read()
        fields = stat[stat.rindex(b')') + 2:].split()
        if fields[0] == b'Z':
            return None
        cpu = int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None
    return {'fds': len(names), 'conns': max(0, sockets - listeners), 'rss_kb': rss, 'cpu': cpu}


def alive(pid):
    """Alive and not a zombie (an orphan's zombie may wait a while for its reaper)."""
    try:
        with open('/proc/%d/stat' % pid, 'rb') as f:
            stat = f.read()
        return stat[stat.rindex(b')') + 2:][:1] != b'Z'
    except (OSError, ValueError):
        return False


def server_inode(agent_port, client_port):
    """The inode of the agent's end of our connection from client_port, from /proc/net/tcp."""
    try:
        with open('/proc/net/tcp') as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[1].rsplit(':', 1)[1], 16) == agent_port and \
                        int(fields[2].rsplit(':', 1)[1], 16) == client_port and fields[3] == '01':
                    return fields[9]
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    return None


def worker_of(sock, agent_port, workers):
    """Which worker holds the other end of this (already answered) connection, or None."""
    inode = server_inode(agent_port, sock.getsockname()[1])
    if inode is None:
        return None
    target = 'socket:[%s]' % inode
    for pid in workers:
        try:
            for name in os.listdir('/proc/%d/fd' % pid):
                try:
                    if os.readlink('/proc/%d/fd/%s' % (pid, name)) == target:
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    return None


# ---------------------------------------------------------------------------------------------
# The wrk script
# ---------------------------------------------------------------------------------------------


def lua_str(text):
    return '"%s"' % text.replace('\\', '\\\\').replace('"', '\\"')


def make_lua(etags):
    """The Lua for wrk: one connection per thread, so request() and response() alternate."""
    ka, ranges = [], []
    for path, size in sorted(STABLE.items()):
        etag = etags[path]
        ka.append('{%s, %d}' % (lua_str('/' + path), size))
        variants = [('bytes=0-99', 206, 100), ('bytes=-500', 206, 500),
                    ('bytes=%d-' % (size - 700), 206, 700), ('bytes=%d-%d' % (size // 2, size // 2), 206, 1),
                    ('bytes=%d-' % size, 416, -1)]
        for spec, status, length in variants:
            ranges.append('{%s, {Range = %s}, %d, %d}' % (lua_str('/' + path), lua_str(spec), status, length))
        ranges.append('{%s, {Range = "bytes=10-19", ["If-Range"] = %s}, 206, 10}'
                      % (lua_str('/' + path), lua_str(etag)))
    churn = ', '.join(lua_str('/' + path) for path in ATOMIC)
    return LUA % {'ka': ',\n  '.join(ka), 'ranges': ',\n  '.join(ranges), 'churn': churn,
                  'missing': MISSING_NAMES}


LUA = r'''-- generated by bench/soak.py: mixed requests, each checked against what its kind expects
local stable = {
  %(ka)s
}
local ranges = {
  %(ranges)s
}
local churn = {%(churn)s}
local threads = {}
local nthreads = 0

function setup(thread)
  nthreads = nthreads + 1
  thread:set("id", nthreads)
  table.insert(threads, thread)
end

local reqs = {}
local kind, want_status, want_len = nil, 0, -1

function init(args)
  counts = {}
  bad = 0
  badlist = {}
  math.randomseed(os.time() * 1000 + id * 7919)
  for i, f in ipairs(stable) do
    reqs["ka" .. i] = wrk.format("GET", f[1], {})
    reqs["close" .. i] = wrk.format("GET", f[1], {Connection = "close"})
  end
  for i, r in ipairs(ranges) do reqs["range" .. i] = wrk.format("GET", r[1], r[2]) end
  for i, p in ipairs(churn) do reqs["churn" .. i] = wrk.format("GET", p, {}) end
end

function request()
  local r = math.random(100)
  if r <= 45 then
    local i = math.random(#stable)
    kind, want_status, want_len = "keepalive", 200, stable[i][2]
    return reqs["ka" .. i]
  elseif r <= 62 then
    local i = math.random(#stable)
    kind, want_status, want_len = "close", 200, stable[i][2]
    return reqs["close" .. i]
  elseif r <= 79 then
    local i = math.random(#ranges)
    kind, want_status, want_len = "range", ranges[i][3], ranges[i][4]
    return reqs["range" .. i]
  elseif r <= 91 then
    kind, want_status, want_len = "missing", 404, -1
    return wrk.format("GET", string.format("/missing/m%%d.jpg", math.random(%(missing)d)), {})
  else
    local i = math.random(#churn)
    kind, want_status, want_len = "churn", 0, -1
    return reqs["churn" .. i]
  end
end

function response(status, headers, body)
  local key = kind .. " " .. status
  counts[key] = (counts[key] or 0) + 1
  local ok
  if kind == "churn" then
    ok = status == 200 or status == 404
  else
    ok = status == want_status and (want_len < 0 or #body == want_len)
  end
  if kind == "close" and headers["Connection"] ~= "close" then ok = false end
  if not ok then
    bad = bad + 1
    if #badlist < 5 then
      badlist[#badlist + 1] = string.format("%%s: status %%d, %%d body bytes, Connection %%s (expected %%d, %%d bytes)",
        kind, status, #body, tostring(headers["Connection"]), want_status, want_len)
    end
  end
end

function done(summary, latency, requests)
  for _, t in ipairs(threads) do
    for key, n in pairs(t:get("counts")) do io.write(string.format("SOAK count %%s %%d\n", key, n)) end
    io.write(string.format("SOAK bad %%d\n", t:get("bad")))
    for _, line in ipairs(t:get("badlist")) do io.write("SOAK sample " .. line .. "\n") end
  end
end
'''


def parse_lua_report(text):
    counts, bad, samples = {}, 0, []
    for line in text.splitlines():
        if line.startswith('SOAK count '):
            _, _, kind, status, n = line.split()
            counts[(kind, int(status))] = counts.get((kind, int(status)), 0) + int(n)
        elif line.startswith('SOAK bad '):
            bad += int(line.split()[2])
        elif line.startswith('SOAK sample '):
            samples.append(line[12:])
    return counts, bad, samples

# ---------------------------------------------------------------------------------------------
# Churn: a mutator and a checker share the expected state of every churn file
# ---------------------------------------------------------------------------------------------


class Churn:
    def __init__(self, root, port, seed):
        self.root, self.port = root, port
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.expected = {}              # path -> bytes, or None when deleted
        self.history = {}               # path -> earlier contents (for telling "stale")
        self.etags = {}                 # path -> the ETag of the previous version
        self.changes = queue.Queue()
        self.mutations = {}
        self.stop = threading.Event()
        self.checks = 0
        self.requests = 0
        self.stale = []
        self.wrong = []
        self.failures = []
        self.covered = set()
        self.error = None

    def content(self, path):
        old = self.expected.get(path)
        while True:
            size = self.rng.randint(*CHURN_SIZES)
            if old is None or size != len(old):
                break
        return os.urandom(size)

    def create_all(self):
        for path in ATOMIC + INPLACE:
            data = self.content(path)
            full = os.path.join(self.root, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, 'wb') as f:
                f.write(data)
            self.expected[path] = data
            self.history[path] = []

    # -- the mutator --

    def mutate_once(self):
        path = self.rng.choice(ATOMIC + INPLACE)
        full = os.path.join(self.root, path)
        with self.lock:
            old = self.expected[path]
            if old is None:
                action = 'create'
            elif path in ATOMIC:
                action = self.rng.choice(['delete', 'rename', 'rename'])
            else:
                action = self.rng.choice(['delete', 'truncate-write', 'overwrite-truncate'])
            new = None if action == 'delete' else self.content(path)
            if old is not None:
                try:
                    self.etags[path] = harness_etag(os.stat(full))
                except OSError:
                    pass
            if action == 'delete':
                os.unlink(full)
            elif action in ('create', 'rename'):
                temp = os.path.join(os.path.dirname(full), '.%s.tmp' % os.path.basename(full))
                with open(temp, 'wb') as f:
                    f.write(new)
                os.rename(temp, full)
            elif action == 'truncate-write':
                with open(full, 'wb') as f:         # O_TRUNC, then the new bytes
                    f.write(new)
            else:
                with open(full, 'r+b') as f:        # over the old bytes, then cut to size
                    f.write(new)
                    f.truncate(len(new))
            if old is not None:
                self.history[path].append(old)
                del self.history[path][:-5]
            self.expected[path] = new
            self.mutations[action] = self.mutations.get(action, 0) + 1
        self.changes.put(path)

    def run_mutator(self, interval):
        try:
            while not self.stop.wait(interval):
                self.mutate_once()
        except Exception as exc:
            self.error = 'mutator: %r' % exc
            self.stop.set()

    # -- the checker --

    def connect_each(self, workers, attempts=60):
        """Keep-alive connections, one held by each worker if possible: {pid: sock}."""
        held = {}
        for _ in range(attempts):
            if len(held) == len(workers):
                break
            sock = socket.create_connection((HOST, self.port), timeout=5)
            try:
                fetch(self.port, STABLE_PROBE, sock=sock)
            except (OSError, ValueError):
                sock.close()
                continue
            pid = worker_of(sock, self.port, workers)
            if pid is not None and pid not in held:
                held[pid] = sock
            else:
                sock.close()
        self.covered = set(held)
        return held

    def verdict(self, path, resp, expected, why, ranged=None):
        """Record a response that is not what the file on disk now says."""
        if expected is None:
            ok = resp.status == 404
        elif ranged is not None:
            ok = resp.status == 206 and resp.body == expected[ranged[0]:ranged[1] + 1]
        else:
            ok = resp.status == 200 and resp.body == expected
        if ok:
            return
        old = self.history.get(path, [])
        stale = (expected is None and resp.status in (200, 206)) or \
            (resp.status == 200 and resp.body in old) or resp.status == 304 or \
            (resp.status == 404 and expected is not None)
        note = '%s %s: status %d, %d bytes; expected %s' % (
            why, path, resp.status, len(resp.body),
            '404' if expected is None else '%d bytes' % len(expected))
        (self.stale if stale else self.wrong).append(note)

    def check(self, path, held):
        with self.lock:
            expected = self.expected[path]
            self.checks += 1
            for pid, sock in list(held.items()):
                try:
                    resp = fetch(self.port, path, sock=sock)
                    self.requests += 1
                except (OSError, ValueError) as exc:
                    self.failures.append('keep-alive request to worker %d for %s: %s' % (pid, path, exc))
                    sock.close()
                    del held[pid]
                    continue
                self.verdict(path, resp, expected, 'worker %d' % pid)
                if resp.closing:
                    self.failures.append('worker %d closed the checker connection' % pid)
                    sock.close()
                    del held[pid]
            headers = []
            if path in self.etags:
                headers.append(('If-None-Match', self.etags[path]))
            try:
                resp = fetch(self.port, path, headers)
                self.requests += 1
                self.verdict(path, resp, expected, 'new connection, If-None-Match old ETag,')
                if expected is not None and len(expected) > 100 and held:
                    first = self.rng.randint(0, len(expected) - 50)
                    last = first + self.rng.randint(0, 49)
                    sock = held[self.rng.choice(sorted(held))]
                    resp = fetch(self.port, path, [('Range', 'bytes=%d-%d' % (first, last))], sock=sock)
                    self.requests += 1
                    self.verdict(path, resp, expected, 'range %d-%d' % (first, last), (first, last))
            except (OSError, ValueError) as exc:
                self.failures.append('request for %s: %s' % (path, exc))

    def run_checker(self, workers):
        try:
            held = self.connect_each(workers)
            while not self.stop.is_set():
                try:
                    path = self.changes.get(timeout=0.25)
                except queue.Empty:
                    path = self.rng.choice(ATOMIC + INPLACE)
                self.check(path, held)
                if len(self.failures) > 20:
                    break
            for sock in held.values():
                sock.close()
        except Exception as exc:
            self.error = 'checker: %r' % exc


STABLE_PROBE = 's/1k.jpg'


class Conditional(threading.Thread):
    """304s from our own keep-alive connections, at --cond-rate a second.

    Each is checked for its status, its ETag and the absence of a body, which wrk cannot do.
    """

    def __init__(self, port, etags, last_modified, rate, connections, stop, seed):
        threading.Thread.__init__(self, name='conditional', daemon=True)
        self.port, self.rate, self.connections, self.stop = port, rate, connections, stop
        self.rng = random.Random(seed)
        self.variants = []
        for path, etag in sorted(etags.items()):
            for headers in ([('If-None-Match', etag)], [('If-None-Match', 'W/' + etag)],
                            [('If-None-Match', '"nope", ' + etag)],
                            [('If-Modified-Since', last_modified[path])]):
                self.variants.append((path, headers, etag))
        self.requests = 0
        self.errors = []
        self.statuses = {}

    def run(self):
        socks = [None] * self.connections
        batch = max(1, int(self.rate / 100))
        next_at = time.monotonic()
        n = 0
        while not self.stop.is_set() and len(self.errors) < 50:
            for _ in range(batch):
                i = n % self.connections
                n += 1
                path, headers, etag = self.rng.choice(self.variants)
                try:
                    if socks[i] is None:
                        socks[i] = socket.create_connection((HOST, self.port), timeout=5)
                    resp = fetch(self.port, path, headers, sock=socks[i])
                except (OSError, ValueError) as exc:
                    self.errors.append('%s %s: %s' % (path, headers, exc))
                    if socks[i] is not None:
                        socks[i].close()
                    socks[i] = None
                    continue
                self.requests += 1
                self.statuses[resp.status] = self.statuses.get(resp.status, 0) + 1
                if resp.status != 304 or resp.headers.get('etag') != etag or resp.closing:
                    self.errors.append('%s %s: status %d, ETag %s, Connection %s'
                                       % (path, headers, resp.status, resp.headers.get('etag'),
                                          resp.headers.get('connection')))
            next_at += 0.01
            pause = next_at - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            else:
                next_at = time.monotonic()
        for sock in socks:
            if sock is not None:
                sock.close()


def harness_etag(st):
    """The agent's ETag for a stat result (agent.make_etag, without importing the agent here)."""
    return '"%x-%x"' % (st.st_mtime_ns // 1000, st.st_size)

# ---------------------------------------------------------------------------------------------
# Resource sampling
# ---------------------------------------------------------------------------------------------


class Sampler(threading.Thread):
    def __init__(self, workers, interval, stop):
        threading.Thread.__init__(self, name='sampler', daemon=True)
        self.workers, self.interval, self.stop = workers, interval, stop
        self.samples = []               # (seconds since start, {pid: sample or None})
        self.started = time.monotonic()

    def take(self):
        self.samples.append((time.monotonic() - self.started,
                             {pid: proc_sample(pid) for pid in self.workers}))

    def run(self):
        self.take()
        while not self.stop.wait(self.interval):
            self.take()


def deleted_held(pid, root):
    """Files under root that a process still has open although they were deleted: [(fd, size)]."""
    found = []
    for fd, target in sorted(harness.open_fds(pid).items()):
        if target.startswith(root + '/') and target.endswith(' (deleted)'):
            try:
                found.append((fd, os.stat('/proc/%d/fd/%d' % (pid, fd)).st_size))
            except OSError:
                continue
    return found


def mb(kb):
    return kb / 1024.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--duration', type=float, default=180.0, help='seconds of load (default 180)')
    p.add_argument('--quick', action='store_true', help='30 s, warm-up 8 s, samples every 2 s')
    p.add_argument('--connections', type=int, default=16, help='wrk connections = threads (default 16)')
    p.add_argument('--workers', type=int, default=2, help='agent workers (default 2)')
    p.add_argument('--warmup', type=float, default=None, help='seconds before the first counted sample (default 20)')
    p.add_argument('--sample-interval', type=float, default=None, help='seconds between samples (default 5)')
    p.add_argument('--cond-rate', type=float, default=800.0,
                   help='conditional (304) requests a second from our own client, at most (default 800)')
    p.add_argument('--cond-connections', type=int, default=4, help='its keep-alive connections (default 4)')
    p.add_argument('--churn-interval', type=float, default=0.5, help='seconds between file changes (default 0.5)')
    p.add_argument('--fd-tolerance', type=int, default=16, help='allowed drift of non-connection fds (default 16)')
    p.add_argument('--rss-tolerance-mb', type=float, default=3.0, help='allowed RSS drift, MB (default 3)')
    p.add_argument('--seed', type=int, default=None, help='seed of the churn (default: random, printed)')
    p.add_argument('--keep', action='store_true', help="keep the agent's temporary directory")
    p.add_argument('--agent', help='the agent.py to start (default: the one beside bench/)')
    args = p.parse_args(argv)
    if args.quick and args.duration == 180.0:
        args.duration = 30.0
    warmup = args.warmup if args.warmup is not None else (8.0 if args.quick else 20.0)
    interval = args.sample_interval or (2.0 if args.quick else 5.0)
    if warmup >= args.duration - interval:
        warmup = max(0.0, args.duration / 3)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    if not shutil.which('wrk'):
        print('FAIL: soak: wrk not found (apt-get install -y wrk)')
        return 1
    harness.raise_nofile(4096)

    server = harness.AgentProcess(workers=args.workers, keep=args.keep, agent=args.agent)
    work = tempfile.mkdtemp(prefix='agent-soak-')
    reasons = []
    stop = threading.Event()
    threads = []
    churn = None
    try:
        for path, size in STABLE.items():
            full = os.path.join(server.root, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, 'wb') as f:
                f.write(os.urandom(size))
        churn = Churn(server.root, None, seed)
        churn.create_all()
        server.start()
        port = churn.port = server.port
        workers = server.workers()
        etags, last_modified = {}, {}
        for path, size in STABLE.items():
            resp = fetch(port, path, method='HEAD')
            etags[path] = resp.headers.get('etag', '')
            last_modified[path] = resp.headers.get('last-modified', '')
            if resp.status != 200 or etags[path] != harness_etag(os.stat(os.path.join(server.root, path))):
                raise RuntimeError('HEAD /%s: status %d, ETag %r' % (path, resp.status, etags[path]))
        lua = os.path.join(work, 'soak.lua')
        with open(lua, 'w') as f:
            f.write(make_lua(etags))
        print('soak: agent on 127.0.0.1:%d, workers %s; wrk %d connections for %gs (warm-up %gs, samples '
              'every %gs); a churn file changes every %gs (seed %d)'
              % (port, workers, args.connections, args.duration, warmup, interval, args.churn_interval, seed),
              flush=True)

        sampler = Sampler(workers, interval, stop)
        conditional = Conditional(port, etags, last_modified, args.cond_rate, args.cond_connections, stop, seed)
        threads = [sampler, conditional,
                   threading.Thread(target=churn.run_mutator, args=(args.churn_interval,), name='mutator', daemon=True),
                   threading.Thread(target=churn.run_checker, args=(workers,), name='checker', daemon=True)]
        for thread in threads:
            thread.start()
        wrk = harness.run_wrk('http://%s:%d/' % (HOST, port), args.connections, args.duration,
                              threads=args.connections, script=lua, timeout=5)
        stop.set()
        churn.stop.set()
        for thread in threads:
            thread.join(15)
            if thread.is_alive():
                reasons.append('%s thread still running' % thread.name)

        # -- wrk --
        counts, bad, bad_samples = parse_lua_report(wrk.output)
        if not wrk.ok:
            reasons.append(harness.wrk_failure(wrk))
        requests = wrk.requests or 0
        socket_kinds = {k: n for k, n in wrk.error_detail.items() if k != 'non-2xx/3xx'}
        kinds = {}
        for (kind, status), n in sorted(counts.items()):
            kinds.setdefault(kind, []).append('%d x%d' % (status, n))
        intended = sum(n for (kind, status), n in counts.items()
                       if (kind, status) in (('missing', 404), ('range', 416), ('churn', 404)))
        print('wrk: %d requests in %.1fs (%.0f/s); socket errors %d %s; non-2xx/3xx %d, of them intended %d '
              '(404 missing %d, 416 range %d, 404 deleted churn file %d)'
              % (requests, wrk.seconds or 0, requests / max(1e-9, wrk.seconds or 1),
                 wrk.socket_errors, socket_kinds, wrk.non2xx, intended,
                 counts.get(('missing', 404), 0), counts.get(('range', 416), 0), counts.get(('churn', 404), 0)))
        for kind in ('keepalive', 'close', 'range', 'missing', 'churn'):
            print('  %-12s %s' % (kind, ', '.join(kinds.get(kind, ['none']))))
        matched = sum(counts.values())
        errors = wrk.socket_errors + bad
        print('errors: %d (socket %d, unexpected status/length %d); responses matched by the script %d'
              % (errors, wrk.socket_errors, bad, matched))
        for line in bad_samples:
            print('  unexpected: ' + line)
        if errors:
            reasons.append('%d errors (socket %d, unexpected responses %d)' % (errors, wrk.socket_errors, bad))
        if requests and matched < requests - args.connections:
            reasons.append('the script matched %d responses of %d requests' % (matched, requests))
        print('conditional (own client, %d keep-alive connections): %d requests (%.0f/s), statuses %s, errors %d'
              % (args.cond_connections, conditional.requests, conditional.requests / max(1.0, args.duration),
                 conditional.statuses, len(conditional.errors)))
        for line in conditional.errors[:5]:
            print('  ' + line)
        if conditional.errors:
            reasons.append('%d conditional requests failed' % len(conditional.errors))
        if not conditional.statuses.get(304):
            reasons.append('no 304 was answered')

        # -- churn --
        print('churn: %d changes %s; %d checks, %d checker requests on connections to workers %s; '
              'stale %d, wrong %d, failed requests %d'
              % (sum(churn.mutations.values()), dict(sorted(churn.mutations.items())), churn.checks,
                 churn.requests, sorted(churn.covered), len(churn.stale), len(churn.wrong), len(churn.failures)))
        for note in (churn.stale + churn.wrong + churn.failures)[:10]:
            print('  ' + note)
        if churn.error:
            reasons.append(churn.error)
        if churn.stale:
            reasons.append('%d stale responses' % len(churn.stale))
        if churn.wrong:
            reasons.append('%d wrong responses' % len(churn.wrong))
        if churn.failures:
            reasons.append('%d checker requests failed' % len(churn.failures))
        if churn.covered != set(workers):
            reasons.append('the checker held connections to workers %s only, of %s' % (sorted(churn.covered), workers))
        if not churn.checks:
            reasons.append('no checks ran')

        # -- resources --
        samples = sampler.samples
        print('samples (t: per worker fds total/connections, RSS):')
        for t, per in samples:
            print('  %5.1fs  %s' % (t, '  '.join(
                '%d: %s' % (pid, 'gone' if s is None else '%3d/%-3d %6.1f MB' % (s['fds'], s['conns'], mb(s['rss_kb'])))
                for pid, s in sorted(per.items()))))
        counted = [(t, per) for t, per in samples if t >= warmup and t <= args.duration + 1]
        if len(counted) < 2:
            reasons.append('fewer than 2 samples after the warm-up')
        clients = args.connections + args.cond_connections + len(workers) + 1
        over = [(t, sum(s['conns'] for s in per.values() if s)) for t, per in samples
                if sum(s['conns'] for s in per.values() if s) > clients]
        if over:
            reasons.append('workers held %d connections at %.0fs, clients had at most %d open'
                           % (over[0][1], over[0][0], clients))
        drift_text = []
        for pid in workers:
            series = [per.get(pid) for _, per in counted]
            if not series or any(s is None for s in series):
                reasons.append('worker %d vanished during the soak' % pid)
                continue
            first, last = series[0], series[-1]
            fixed_first, fixed_last = first['fds'] - first['conns'], last['fds'] - last['conns']
            fd_drift, fixed_drift = last['fds'] - first['fds'], fixed_last - fixed_first
            rss_drift = mb(last['rss_kb'] - first['rss_kb'])
            print('worker %d: fds first %d last %d max %d (drift %+d; without connections %d -> %d, drift %+d); '
                  'RSS first %.1f MB last %.1f MB max %.1f MB (drift %+.2f MB)'
                  % (pid, first['fds'], last['fds'], max(s['fds'] for s in series), fd_drift, fixed_first, fixed_last,
                     fixed_drift, mb(first['rss_kb']), mb(last['rss_kb']), mb(max(s['rss_kb'] for s in series)),
                     rss_drift))
            drift_text.append('fds %+d (%+d w/o conns), RSS %+.2f MB' % (fd_drift, fixed_drift, rss_drift))
            if abs(fixed_drift) > args.fd_tolerance:
                reasons.append('worker %d: non-connection fds drifted %+d (> %d)'
                               % (pid, fixed_drift, args.fd_tolerance))
            if abs(fd_drift) > args.fd_tolerance + args.connections:
                reasons.append('worker %d: fds drifted %+d (> %d)'
                               % (pid, fd_drift, args.fd_tolerance + args.connections))
            if abs(rss_drift) > args.rss_tolerance_mb:
                reasons.append('worker %d: RSS drifted %+.2f MB (> %g)' % (pid, rss_drift, args.rss_tolerance_mb))

        # -- a finding, not a pass criterion: deleted files the workers keep open --
        held = {pid: deleted_held(pid, os.path.realpath(server.root)) for pid in workers}
        count = sum(len(v) for v in held.values())
        if count:
            print('WARN: the workers still hold %d deleted file(s) open (%d bytes): a 404 for a deleted file '
                  'does not drop its cached descriptor, so its disk space stays in use until the path is '
                  'served again, a reload replaces the worker, or 256 other files push it out of the cache'
                  % (count, sum(size for v in held.values() for _, size in v)))

        # -- health --
        try:
            resp = fetch(port, STABLE_PROBE)
            if resp.status != 200 or len(resp.body) != STABLE[STABLE_PROBE]:
                reasons.append('clean GET at the end: status %d, %d bytes' % (resp.status, len(resp.body)))
        except (OSError, ValueError) as exc:
            reasons.append('clean GET at the end: %s' % exc)
        reasons += server.health(workers)
    except Exception as exc:
        reasons.append('harness error: %s: %s' % (type(exc).__name__, exc))
    finally:
        stop.set()
        if churn is not None:
            churn.stop.set()
        server.stop()
        server.cleanup()
        shutil.rmtree(work, ignore_errors=True)

    if reasons:
        print('FAIL: soak: ' + '; '.join(reasons))
        return 1
    print('PASS: soak: %d requests in %gs (wrk %d, 304s %d, checker %d), 0 errors (%d intended 404/416); '
          '%d file changes, 0 stale; flat: %s'
          % (requests + conditional.requests + churn.requests, args.duration, requests,
             conditional.requests, churn.requests, intended, sum(churn.mutations.values()), '; '.join(drift_text)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
