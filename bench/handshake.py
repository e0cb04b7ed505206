#!/usr/bin/env python3
"""The server's CPU for one full TLS handshake, in-process, by the number of session tickets.

A worker's SSLContext (agent.tls_context(), with a P-256 certificate made here) answers a
Python client over memory BIOs, so no socket, scheduler or other process is measured: only
the process time of the server's two do_handshake() calls (the first flight: ServerHello to
Finished; the finish: the client's Finished read, and the TLS 1.3 tickets written).  Rounds
interleave the ticket counts; the median and the fastest of each are printed.

    python3 bench/handshake.py                       # this repository's agent.py
    python3 bench/handshake.py --agent /old/agent.py --tickets 2 --tickets 1

Standard library and openssl only; touches nothing outside its temporary directory.
"""

import argparse
import os
import shutil
import ssl
import statistics
import subprocess
import tempfile
import time

from resolve import load_agent

HERE = os.path.dirname(os.path.abspath(__file__))


def handshake(server_context, client_context):
    """One full handshake: (process seconds of the first flight, of the finish)."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(client_in, client_out, server_hostname='localhost')
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    server_in.write(client_out.read())
    started = time.process_time()
    try:
        server.do_handshake()
    except ssl.SSLWantReadError:
        pass
    first = time.process_time() - started
    client_in.write(server_out.read())
    client.do_handshake()
    server_in.write(client_out.read())
    started = time.process_time()
    server.do_handshake()
    return first, time.process_time() - started


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--agent', default=os.path.join(HERE, '..', 'agent.py'))
    p.add_argument('--tickets', type=int, action='append',
                   help='a num_tickets to measure (repeatable; default: the agent\'s own, 2 and 0)')
    p.add_argument('--rounds', type=int, default=20)
    p.add_argument('--count', type=int, default=50, help='handshakes of each kind a round')
    args = p.parse_args()
    agent = load_agent(args.agent)
    work = tempfile.mkdtemp(prefix='handshake-')
    try:
        cert, key = os.path.join(work, 'cert.pem'), os.path.join(work, 'key.pem')
        subprocess.run(['openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256',
                        '-nodes', '-keyout', key, '-out', cert, '-days', '2', '-subj', '/CN=localhost'],
                       capture_output=True, check=True)
        os.chmod(key, 0o600)
        own = agent.tls_context(cert, key).num_tickets
        counts = args.tickets or [own] + [n for n in (2, 0) if n != own]
        contexts = {}
        for n in counts:
            contexts[n] = agent.tls_context(cert, key)
            contexts[n].num_tickets = n
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.load_verify_locations(cert)
        client.check_hostname = False
        times = {n: [] for n in counts}
        for _ in range(args.rounds):
            for n in counts:
                times[n] += [handshake(contexts[n], client) for _ in range(args.count)]
        print('server CPU of a full TLS 1.3 handshake (P-256), in-process, %d rounds of %d; '
              'the agent sends %d ticket(s); load %.1f' % (args.rounds, args.count, own, os.getloadavg()[0]))
        for n in counts:
            whole = [a + b for a, b in times[n]]
            finish = [b for _, b in times[n]]
            print('  %d ticket(s): %4.0f us a handshake (fastest %4.0f), of which the finish %4.0f (fastest %4.0f)'
                  % (n, statistics.median(whole) * 1e6, min(whole) * 1e6, statistics.median(finish) * 1e6,
                     min(finish) * 1e6))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
