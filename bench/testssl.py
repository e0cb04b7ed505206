#!/usr/bin/env python3
"""testssl.sh against an HTTPS agent: no finding of severity HIGH or CRITICAL may remain.

Starts agent.py on 127.0.0.1 with --tls-cert/--tls-key (a self-signed certificate made here
with openssl), runs `testssl` (Debian package testssl.sh) on it with a JSON report, and fails
on any HIGH or CRITICAL finding.  Findings about the certificate itself (self-signed, no
OCSP or CT, its lifetime) are the test certificate's, not the server's: they are listed with
the others but never fail the run.  Slow (a few minutes): `make tls`, not the unit suite.
Loopback only; the agent is stopped on exit.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

FAILING = {'HIGH', 'CRITICAL'}
CERTIFICATE_IDS = ('cert', 'chain_of_trust', 'OCSP', 'DNS_CAA', 'certificate_transparency',
                   'intermediate_cert')


def main():
    tool = shutil.which('testssl') or shutil.which('testssl.sh')
    if tool is None:
        print('testssl: not installed (Debian package testssl.sh)')
        return 2
    tls_dir = tempfile.mkdtemp(prefix='testssl-')
    try:
        cert, key = os.path.join(tls_dir, 'cert.pem'), os.path.join(tls_dir, 'key.pem')
        subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key,
                        '-out', cert, '-days', '365', '-subj', '/CN=localhost',
                        '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1'],
                       check=True, capture_output=True, stdin=subprocess.DEVNULL)
        report = os.path.join(tls_dir, 'report.json')
        with harness.AgentProcess(workers=2, options=['--tls-cert', cert, '--tls-key', key,
                                                      '--hsts', '31536000']) as server:
            server.start()
            result = subprocess.run([tool, '--quiet', '--color', '0', '--warnings', 'off',
                                     '--jsonfile', report, '--ip', '127.0.0.1',
                                     'https://localhost:%d/' % server.port],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, timeout=900)
            bad_log = server.bad_log_lines()
        try:
            with open(report) as f:
                findings = json.load(f)
        except (OSError, ValueError) as exc:
            print(result.stdout[-3000:])
            print('FAIL: testssl wrote no report (%s); exit status %d' % (exc, result.returncode))
            return 1
        failing, excused = [], []
        for item in findings:
            if item.get('severity') in FAILING:
                line = '%s %s: %s' % (item['severity'], item.get('id'), item.get('finding'))
                (excused if item.get('id', '').startswith(CERTIFICATE_IDS) else failing).append(line)
        counts = {}
        for item in findings:
            counts[item.get('severity')] = counts.get(item.get('severity'), 0) + 1
        print('testssl: %d findings by severity: %s' % (len(findings), ', '.join(
            '%s %d' % kv for kv in sorted(counts.items(), key=lambda kv: str(kv[0])))))
        for line in excused:
            print('  (the test certificate) ' + line)
        for line in failing:
            print('  ' + line)
        for line in bad_log:
            print('  LOG: ' + line)
        if failing or bad_log:
            print('FAIL: testssl: %d HIGH/CRITICAL finding(s), %d bad log line(s)' % (len(failing), len(bad_log)))
            return 1
        print('PASS: testssl: no HIGH or CRITICAL finding about the server')
        return 0
    finally:
        shutil.rmtree(tls_dir, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
