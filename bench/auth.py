#!/usr/bin/env python3
"""CPU cost of --auth on each request: Responder.respond for a 20 KB file on a cache hit,
without accounts (before) and with --auth and a right Authorization header (after): the
value is verified once with scrypt, then found in the worker's cache of verified values
(Access.verified), which is what every later request of a browser pays.  Also the cost of
one scrypt verification (what a request with a new or wrong password costs, and why the
cache and the brute-force limit exist), and of a share link's request (HMAC-SHA256 and the
check that the path stays inside the folder shared).

    python3 bench/auth.py                  # prints the CPU model, then us per request

Standard library only; touches nothing outside its temporary directory.
"""

import argparse
import base64
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import agent    # noqa: E402
from parsers import cpu_model   # noqa: E402  (bench/, beside this file)


def responder(root, access):
    config = agent.parser().parse_args(['run', '--root', root])
    config.root = os.path.realpath(root)
    return agent.Responder(config, agent.Clock(), agent.OwnFiles(), access=access)


def request(target, authorization=None):
    raw = b'GET ' + target + b' HTTP/1.1\r\nHost: x\r\n'
    if authorization:
        raw += b'Authorization: ' + authorization + b'\r\n'
    return agent.parse_request(raw + b'\r\n')[0]


def per_request(cases, count, rounds):
    """us of CPU (process time) a call of each (respond, req) of cases, best of rounds; the
    cases take turns within each round, so that a load that comes and goes (other work on the
    machine) weighs on all of them alike."""
    best = [None] * len(cases)
    for respond, req in cases:
        respond(req)                                # warm up: open, cache, verify
    for _ in range(rounds):
        for index, (respond, req) in enumerate(cases):
            started = time.process_time()
            for _ in range(count):
                respond(req)
            used = (time.process_time() - started) / count * 1e6
            best[index] = used if best[index] is None else min(best[index], used)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--requests', type=int, default=20000)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--quick', action='store_true', help='CI size: fewer requests')
    args = parser.parse_args()
    if args.quick:
        args.requests, args.rounds = 2000, 3
    root = tempfile.mkdtemp(prefix='agent-auth-bench-')
    try:
        os.makedirs(os.path.join(root, 'album'))
        with open(os.path.join(root, 'album', 'a.jpg'), 'wb') as f:
            f.write(os.urandom(20000))
        key = b'k' * 64
        access = agent.Access({'alice': agent.hash_password('correct horse')}, key)
        right = b'Basic ' + base64.b64encode(b'alice:correct horse')
        plain = responder(root, None)
        guarded = responder(root, access)
        token = agent.share_token(key, 'album', 0)
        target = b'/s/' + token + b'/album/a.jpg'

        def share(_):
            guarded.respond(request(target), True, False, '127.0.0.1')
        before, after, shared, parse_only = per_request([
            (lambda r: plain.respond(r, True, False, '127.0.0.1'), request(b'/album/a.jpg')),
            (lambda r: guarded.respond(r, True, False, '127.0.0.1'), request(b'/album/a.jpg', right)),
            (share, None), (lambda _: request(target), None)], args.requests, args.rounds)
        record = access.accounts['alice']
        started = time.process_time()
        agent.verify_password('correct horse', record)
        scrypt_ms = (time.process_time() - started) * 1e3
        print('bench/auth.py on %s (Python %s), 20 KB file, worker cache hit, best of %d x %d:'
              % (cpu_model(), sys.version.split()[0], args.rounds, args.requests))
        print('  without --auth (before):                %6.2f us/request' % before)
        print('  --auth, cached verification (after):   %6.2f us/request (+%.2f us)' % (after, after - before))
        print('  share link /s/TOKEN/ (HMAC, containment):%6.2f us/request (+%.2f us, request parsing '
              'excluded)' % (shared - parse_only, shared - parse_only - before))
        print('  one scrypt verification (new or wrong password): %.1f ms' % scrypt_ms)
    finally:
        shutil.rmtree(root)


if __name__ == '__main__':
    main()
