#!/usr/bin/env python3
"""A/B of agent.py versions by the CPU one worker spends a request, interleaved in one run.

On a shared machine req/s follows the load of the other processes more than the code; the CPU
the worker itself spends a request follows it much less.  Each version runs as one agent with
one worker (access log on, as a new user gets it), all at once on their own ports; each round
runs `wrk -t1` against each in turn, and reads the worker's CPU (utime + stime, /proc/PID/stat)
before and after.

    python3 bench/cpu_ab.py --variant main=/src/main/agent.py --variant new=agent.py \\
        --only https-close --only 20k-close --only 20k --rounds 5

prints, per scenario and version, the median and the range of the rounds' us a request (and
req/s), then each version's median as a multiple of the first's.  Scenarios: 20k (keep-alive),
20k-close (Connection: close), https-close (a full TLS handshake a request; wrk does not
resume sessions), https-20k.  Needs wrk and openssl; touches nothing outside its temporary
directory, and stops its agents.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench import CLK_TCK, cpu_ticks  # noqa: E402
from harness import children_of, serving_ports  # noqa: E402

SCENARIOS = {               # name: (file, headers, TLS)
    '20k': ('20k.jpg', (), False),
    '20k-close': ('20k.jpg', ('Connection: close',), False),
    'https-close': ('20k.jpg', ('Connection: close',), True),
    'https-20k': ('20k.jpg', (), True),
}


def start_agent(script, workdir, root, tls):
    """Start one agent (one worker): (master pid, worker pid, port)."""
    os.makedirs(workdir)
    cmd = [sys.executable, script, '--root', root, '--bind', '127.0.0.1', '--port', '0',
           '--workers', '1', '--pidfile', os.path.join(workdir, 'agent.pid'),
           '--log', os.path.join(workdir, 'agent.log'),
           '--access-log', os.path.join(workdir, 'access.log')]
    if tls:
        cmd += ['--tls-cert', tls[0], '--tls-key', tls[1]]
    if os.geteuid() == 0:
        cmd += ['--user', 'root']
    out = subprocess.run(cmd + ['start'], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise SystemExit('%s would not start: %s' % (script, out.stderr.strip()))
    with open(os.path.join(workdir, 'agent.pid')) as f:
        master = int(f.read().split()[0])
    workers = []
    deadline = time.monotonic() + 10
    while not workers and time.monotonic() < deadline:
        workers = sorted(children_of(master))
        time.sleep(0.05)
    return master, workers[0], serving_ports(out.stdout)[0]


def stop_agent(script, workdir):
    subprocess.run([sys.executable, script, '--pidfile', os.path.join(workdir, 'agent.pid'), 'stop'],
                   capture_output=True, timeout=60)


def run_wrk(url, headers, duration, connections):
    """(requests, req/s) of one wrk run."""
    cmd = ['wrk', '-t1', '-c%d' % connections, '-d%ds' % duration]
    for header in headers:
        cmd += ['-H', header]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=duration + 30).stdout
    done = re.search(r'(\d+) requests in', out)
    rate = re.search(r'Requests/sec:\s+([\d.]+)', out)
    if not done or not rate:
        raise SystemExit('wrk gave no figures: %s' % out)
    return int(done.group(1)), float(rate.group(1))


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--variant', action='append', required=True, metavar='NAME=PATH',
                   help='an agent.py to measure (repeatable; the first is the reference)')
    p.add_argument('--only', action='append', choices=sorted(SCENARIOS), help='a scenario (repeatable)')
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--duration', type=int, default=4, help='seconds a wrk run (default 4)')
    p.add_argument('--connections', type=int, default=16, help='wrk connections (default 16)')
    args = p.parse_args()
    variants = [tuple(v.split('=', 1)) for v in args.variant]
    scenarios = args.only or ['https-close', '20k-close', '20k']
    if not shutil.which('wrk'):
        raise SystemExit('wrk is not installed (Debian package wrk)')
    work = tempfile.mkdtemp(prefix='cpu-ab-')
    started = []
    try:
        root = os.path.join(work, 'root')
        os.mkdir(root)
        with open(os.path.join(root, '20k.jpg'), 'wb') as f:
            f.write(os.urandom(20480))
        pair = (os.path.join(work, 'cert.pem'), os.path.join(work, 'key.pem'))
        subprocess.run(['openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256',
                        '-nodes', '-keyout', pair[1], '-out', pair[0], '-days', '2', '-subj', '/CN=localhost'],
                       capture_output=True, check=True)
        os.chmod(pair[1], 0o600)
        agents = {}
        for name, script in variants:
            for tls in (False, True):
                if any(SCENARIOS[s][2] == tls for s in scenarios):
                    workdir = os.path.join(work, '%s-%s' % (name, 'tls' if tls else 'plain'))
                    started.append((script, workdir))
                    agents[name, tls] = start_agent(os.path.abspath(script), workdir, root, pair if tls else None)
        with open('/proc/cpuinfo') as f:
            model = re.search(r'model name\s*:\s*(.*)', f.read())
        print('on %s, nproc %d; wrk -t1 -c%d, %d s a run, %d rounds; CPU of the one worker'
              % (model.group(1) if model else '?', os.cpu_count(), args.connections, args.duration, args.rounds))
        for scenario in scenarios:
            file, headers, tls = SCENARIOS[scenario]
            results = {name: [] for name, _ in variants}
            loads = []
            for _ in range(args.rounds):
                for name, _ in variants:
                    _, worker, port = agents[name, tls]
                    url = '%s://127.0.0.1:%d/%s' % ('https' if tls else 'http', port, file)
                    before = cpu_ticks([worker])
                    done, rate = run_wrk(url, headers, args.duration, args.connections)
                    used = (cpu_ticks([worker]) - before) / CLK_TCK
                    results[name].append((used / done * 1e6, rate))
                    loads.append(os.getloadavg()[0])
            print('%s (1-minute load %.1f-%.1f):' % (scenario, min(loads), max(loads)))
            reference = statistics.median(us for us, _ in results[variants[0][0]])
            for name, _ in variants:
                costs = [us for us, _ in results[name]]
                rates = [rate for _, rate in results[name]]
                print('  %-12s CPU %6.1f us/req (%.1f-%.1f), %7.0f req/s (%.0f-%.0f), %.3fx the first'
                      % (name, statistics.median(costs), min(costs), max(costs), statistics.median(rates),
                         min(rates), max(rates), statistics.median(costs) / reference))
            sys.stdout.flush()
    finally:
        for script, workdir in started:
            stop_agent(script, workdir)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
