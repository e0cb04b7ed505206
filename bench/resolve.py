#!/usr/bin/env python3
"""CPU cost of answering one request in a worker, without the network: the path from a parsed
request to its response (Responder.respond), for a cache hit and for a miss.

A hit is a file the worker has open already: one stat() and the checks that it is unchanged.
A miss opens the file: with agent.py's race-free resolution that is an O_PATH open, fstat, the
/proc/self/fd check and the reopen; the miss scenario cycles through more files than the
worker's cache holds, so every request is one.  Both run on 20 KB files in a temporary
directory, and report microseconds of CPU (process time) per request, best of --rounds.  The
worker's own log is in a directory of its own, as in an agent whose logs are not in its root.

    python3 bench/resolve.py                          # this repository's agent.py
    python3 bench/resolve.py --agent /old/agent.py    # another version, to compare

Standard library only; touches nothing outside its temporary directory.
"""

import argparse
import importlib.util
import os
import shutil
import socket
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


class NullConnection:
    """What an agent.py before Responder.respond returned its response needed of a connection:
    the response is queued, then dropped."""
    keep_alive = True
    redirect = False

    def start_response(self, *args, **kwargs):
        pass


def responder_call(worker):
    """respond(req) for the agent.py measured: Responder.respond(req, keep_alive) returns the
    response; an older one queued it on a connection, respond(conn, req)."""
    respond = worker.responder.respond
    if respond.__code__.co_varnames[1] == 'conn':
        conn = NullConnection()
        return lambda req: respond(conn, req)
    return lambda req: respond(req, True)


def load_agent(path):
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    spec = importlib.util.spec_from_file_location('agent_under_test', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(worker, requests, count):
    respond = responder_call(worker)
    started = time.process_time()
    for i in range(count):
        respond(requests[i % len(requests)])
    return (time.process_time() - started) / count * 1e6


def measure_connection(agent, worker, count, access_fd):
    """us of CPU a request for the whole path of a pipelined 20 KB keep-alive GET, as wrk sends
    it: Connection.process (framing, the repeated-head reuse), respond, the head, send() on a
    socketpair, the access-log line; the client side's recv() is included too."""
    # The access log's flush: an AccessLog of its own, or (an agent.py before it) the worker's.
    flush = worker.access_log.flush if hasattr(worker, 'acceptor') else worker.flush_access_log
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        b.setblocking(False)
        conn = agent.Connection(a, '127.0.0.1', worker)
        worker.conns.add(conn)
        raw = b'GET /d0/0.jpg HTTP/1.1\r\nHost: 127.0.0.1:9085\r\nUser-Agent: wrk\r\n\r\n'
        started = time.process_time()
        for i in range(count):
            conn.inbuf = raw
            conn.process()
            if i % 64 == 0:
                flush()
            try:
                while b.recv(1 << 20):
                    pass
            except BlockingIOError:
                pass
        used = time.process_time() - started
        worker.conns.discard(conn)
    return used / count * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--agent', default=os.path.join(os.path.dirname(HERE), 'agent.py'))
    parser.add_argument('--requests', type=int, default=20000)
    parser.add_argument('--rounds', type=int, default=5)
    args = parser.parse_args()
    agent = load_agent(args.agent)
    root = tempfile.mkdtemp(prefix='agent-resolve-')
    logs = tempfile.mkdtemp(prefix='agent-resolve-logs-')
    try:
        misses = agent.FILE_CACHE_SIZE * 4
        for i in range(misses):
            os.makedirs(os.path.join(root, 'd%d' % (i % 10)), exist_ok=True)
            with open(os.path.join(root, 'd%d' % (i % 10), '%d.jpg' % i), 'wb') as f:
                f.write(os.urandom(20000))
        config = agent.parser().parse_args(['run', '--root', root])
        config.root = os.path.realpath(root)
        lifeline_r, lifeline_w = os.pipe()
        access_fd = os.open(os.devnull, os.O_WRONLY)
        worker = agent.Worker(config, [], access_fd, lifeline_r)
        # The worker's own files (its log) in a directory of their own, as in any real agent:
        # the rotation rule looks at that directory (OwnFiles.refresh) when a file is opened.
        own = getattr(worker, 'responder', worker).own_files
        own.add(os.path.join(logs, 'access.log'))

        def request(i):
            raw = b'GET /d%d/%d.jpg HTTP/1.1\r\nHost: x\r\n\r\n' % (i % 10, i)
            return agent.parse_request(raw)[0]
        hit = [request(0)]
        miss = [request(i) for i in range(misses)]
        results = {}
        for name, requests in (('hit', hit), ('miss', miss)):
            measure(worker, requests, len(requests))            # warm up: open, cache, page in
            results[name] = min(measure(worker, requests, args.requests) for _ in range(args.rounds))
        results['whole'] = min(measure_connection(agent, worker, args.requests, access_fd)
                               for _ in range(args.rounds))
        print('%s: %.1f us/request on a cache hit, %.1f us/request on a miss (open and check); '
              '%.1f us/request for the whole keep-alive request path'
              % (args.agent, results['hit'], results['miss'], results['whole']))
        getattr(worker, 'responder', worker).files.clear()      # an agent.py before the Responder: the worker
    finally:
        shutil.rmtree(root)
        shutil.rmtree(logs)


if __name__ == '__main__':
    main()
