"""agent.py's command line and the daemon around the server: the README's commands, safe defaults,
honest options, common mistakes.
"""

import http.client
import os
import pwd
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import unittest
from unittest import mock

# testlib first: it puts the repository and bench/ on sys.path.
import testlib
import testrun
from testlib import (
    AGENT, AGENT_LINE, AgentServer, HERE, PYTHON, TIMEOUT, kill_group_of, nobody_agent, nobody_user,
    proc_status, python_for, run, slurp, wait_for)
import agent
import daemon
from daemon import DaemonError
import harness
from harness import children_of, pid_alive, read_pid



# ---------------------------------------------------------------------------------------------
# agent.py: the command line and the daemon around the server
# ---------------------------------------------------------------------------------------------

class AgentCommandLineTests(unittest.TestCase):
    def test_defaults_match_the_original(self):
        config = agent.parser().parse_args(['start'])
        self.assertEqual((config.port, config.bind, config.root), (9085, '0.0.0.0', '.'))
        self.assertEqual((config.log, config.access_log), ('agent.log', 'access.log'))
        self.assertEqual(config.workers, os.cpu_count())
        # The pidfile is the one thing that is not the original's ./agent.pid: status and stop
        # must find the daemon from any directory (issue 10).
        self.assertIsNone(config.pidfile)

    def test_bad_options_are_refused_before_anything_starts(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(subprocess.run, ['rm', '-rf', tmp])
        for bad in (['--workers', '0'], ['--port', '70000'], ['--port', 'http'], ['--timeout', '-1'],
                    ['--stop-timeout', 'soon'], ['--max-header-size', '0'], ['frobnicate']):
            args = [*AGENT_LINE, '--pidfile', os.path.join(tmp, 'a.pid')] + bad
            if 'frobnicate' not in bad:
                args.append('start')
            result = run(args, cwd=tmp)
            self.assertEqual(result.returncode, 2, bad)
            self.assertIn('error:', result.stderr)
            self.assertNotIn('Traceback', result.stderr)
            self.assertFalse(os.path.exists(os.path.join(tmp, 'a.pid')))


def ast_literal(text):
    import ast
    return ast.literal_eval(text)


class ReadmeTests(unittest.TestCase):
    """README.md, docs/*.md and daemon.py's docstring tell a newcomer what to type and what they
    will see: their examples are run, and every option, action and exit code they name is
    checked against the code, so the documentation cannot drift from it."""

    FOREIGN_OPTIONS = {          # options of the other programs the README shows, by program
        'adduser': {'--system', '--group', '--no-create-home', '--home'},
        'systemctl': {'--now', '--kill-whom'},
        'certbot': {'--deploy-hook'},
        'rsync': {'--inplace'},
        'systemd-nspawn': {'--private-network'},
        'debootstrap': {'--variant'},
        'start-stop-daemon': {'--pidfile', '--retry'},
        'test_daemon.py': set(testrun.PARTS),
    }

    @classmethod
    def setUpClass(cls):
        with open(os.path.join(HERE, 'README.md')) as f:
            cls.readme = f.read()
        cls.help = run([*AGENT_LINE, '--help']).stdout

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='readme-test-')
        self.addCleanup(subprocess.run, ['rm', '-rf', self.tmp])

    def section(self, title):
        """The section under the heading `title`, in README.md or in the one docs/*.md page that
        has it."""
        found = [text for _, text in self.documents() if '\n' + title + '\n' in text]
        self.assertEqual(len(found), 1, '%r in %d documents' % (title, len(found)))
        start = found[0].index('\n' + title + '\n')
        end = found[0].find('\n#', start + 1)
        return found[0][start:end if end > 0 else None]

    def help_options(self):
        return set(re.findall(r'(?<![\w-])--[a-z][a-z-]*', self.help))

    def help_actions(self):
        listing = self.help.split('ACTION is one of:\n', 1)[1].split('\n\n', 1)[0]
        return {name for line in listing.splitlines()
                for name in line.split('  ')[1].strip().split(', ')}

    # -- the examples ------------------------------------------------------------------------

    # The example programs, by class: the log in the program's own directory, a line that
    # shows it runs, the line its reload adds, and whether it reopens that log on SIGUSR1.
    EXAMPLES = {'Ticker': ('ticker.log', 'tick', ': reloading (SIGHUP)', False),
                'Poller': ('poller.log', 'thread 1 polled', 'reloaded', False),
                'Indexer': ('indexer.log', 'INFO indexed', 'INFO reloaded', True),
                'Beacon': ('beacon.log', 'beacon', 'reloaded', False)}

    def examples(self):
        """(where, source) of every Python example: README's, the module docstring's, then
        those of docs/daemon.md."""
        found = [('README.md example %d' % (i + 1), block)
                 for i, block in enumerate(re.findall(r'```python\n(.*?)```', self.readme, re.S))]
        doc = daemon.__doc__.split('override run():\n', 1)[1].split('\nThen ', 1)[0]
        found.append(('daemon.py docstring', textwrap.dedent(doc)))
        with open(os.path.join(HERE, 'docs', 'daemon.md')) as f:
            found += [('docs/daemon.md example %d' % (i + 1), block)
                      for i, block in enumerate(re.findall(r'```python\n(.*?)```', f.read(), re.S))]
        return found

    def test_the_python_examples_run_as_told(self):
        """Each example, copied to a directory of its own: `start` there prints "NAME started
        (pid N)"; from another directory `status` finds it at its default pidfile, a second
        `start` finds it running, its log fills, `reload` reaches it (and SIGUSR1 reopens a log
        that was moved away), `stop` ends it; then, for README's, the exit codes of the
        command-line table, and --help.  Each class is renamed for the run (Ticker -> Ticker1_PID), so its default
        pidfile is the test's own, even as root (/run)."""
        examples = self.examples()
        self.assertEqual([where.split(' example')[0] for where, _ in examples].count('README.md'), 1,
                         'README.md holds one ```python example; the longer ones are in docs/daemon.md')
        self.assertGreaterEqual(len(examples), 5)
        elsewhere = os.path.join(self.tmp, 'elsewhere')
        os.mkdir(elsewhere)
        env = dict(os.environ, PYTHONPATH=HERE)
        started = []
        for n, (where, source) in enumerate(examples):
            classes = re.findall(r'^class (\w+)\(daemon\.Daemon\)', source, re.M)
            self.assertEqual(len(classes), 1, where)
            self.assertIn(classes[0], self.EXAMPLES, '%s: a new example needs its line in EXAMPLES' % where)
            log, running, reloaded, reopens = self.EXAMPLES[classes[0]]
            renamed = '%s%d_%d' % (classes[0], n, os.getpid())
            name = renamed.lower()
            pidfile = daemon.default_pidfile(name)
            if os.path.dirname(os.path.dirname(pidfile)) == '/tmp':     # a private directory
                self.addCleanup(subprocess.run, ['rm', '-rf', os.path.dirname(pidfile)])
            self.addCleanup(lambda path=pidfile: os.path.exists(path) and os.unlink(path))
            directory = os.path.join(self.tmp, 'example%d' % n)
            os.mkdir(directory)
            program = os.path.join(directory, classes[0].lower() + '.py')
            with open(program, 'w') as f:
                f.write(re.sub(r'\b%s\b' % classes[0], renamed, source))

            def action(name, cwd=elsewhere, program=program):
                return run([PYTHON, program, name], cwd=cwd, env=env)
            result = action('start', cwd=directory)
            self.assertEqual((result.returncode, result.stderr), (0, ''), where)
            match = re.fullmatch(r'%s started \(pid (\d+)\)\n' % name, result.stdout)
            self.assertTrue(match, '%s: start printed %r' % (where, result.stdout))
            pid = int(match.group(1))
            self.addCleanup(kill_group_of, pid)
            started.append((where, name, pid, pidfile, action, os.path.join(directory, log),
                            running, reloaded, reopens))
        for where, name, pid, pidfile, action, log, running, reloaded, reopens in started:
            result = action('status')
            self.assertEqual((result.returncode, result.stdout),
                             (daemon.STATUS_RUNNING, '%s is running (pid %d, pidfile %s)\n' % (name, pid, pidfile)),
                             where)
            result = action('start')
            self.assertEqual((result.returncode, result.stdout),
                             (0, '%s is already running (pid %d, pidfile %s)\n' % (name, pid, pidfile)), where)
            wait_for(lambda: running in slurp(log), message='%s: %r in %s' % (where, running, log))
            self.assertEqual(action('reload').returncode, daemon.EXIT_OK, where)
            wait_for(lambda: reloaded in slurp(log), message='%s: %r in %s' % (where, reloaded, log))
            if reopens:
                os.rename(log, log + '.1')
                os.kill(pid, signal.SIGUSR1)
                wait_for(lambda: running in slurp(log), message='%s: %s reopened' % (where, log))
            result = action('stop')
            self.assertEqual(result.returncode, daemon.EXIT_OK, where)
            self.assertTrue(result.stdout.startswith('%s stopped (pid %d, ' % (name, pid)), result.stdout)
            self.assertFalse(pid_alive(pid), '%s: the daemon is gone after stop' % where)
            self.assertFalse(os.path.exists(pidfile), where)
            self.assertNotIn('Traceback', slurp(log), where)
            if not where.startswith('README'):
                continue        # the rest is the same code for each: once is enough
            self.assertEqual(action('status').returncode, daemon.STATUS_STOPPED, where)
            self.assertEqual(action('reload').returncode, daemon.EXIT_NOT_RUNNING, where)
            self.assertEqual(action('stop').returncode, daemon.EXIT_OK, where)
            result = action('frobnicate')
            self.assertEqual(result.returncode, daemon.EXIT_USAGE, where)
            self.assertIn("unknown action 'frobnicate'", result.stderr, where)
            self.assertNotIn('Traceback', result.stderr)
            result = action('--help')
            self.assertEqual(result.returncode, daemon.EXIT_OK, where)
            self.assertIn('pidfile: %s' % pidfile, result.stdout, where)

    def test_the_first_commands_print_what_the_readme_shows(self):
        """The console session of "First commands", with a port and a pidfile of the test's."""
        block = self.readme.split('## First commands', 1)[1].split('```console\n', 1)[1].split('```', 1)[0]
        shown = [line for line in block.splitlines() if not line.startswith('$ ')]
        self.assertEqual(len(shown), 3, block)
        photos = os.path.join(self.tmp, 'photos')
        os.mkdir(photos)
        port = harness.free_port()
        pidfile = os.path.join(self.tmp, 'agent-%d.pid' % port)

        def expected(line):
            """The line as a pattern: the README's example values replaced by this run's."""
            values = (('/run/user/1000/agent-9085.pid', re.escape(pidfile)), ('/home/u/photos', re.escape(photos)),
                      ('9085', str(port)), ('4242', r'\d+'), ('0.12s', r'\d+\.\d\ds'))
            for n, (literal, _) in enumerate(values):
                self.assertIn(literal, block)
                line = line.replace(literal, '\0%d\0' % n)
            pattern = re.escape(line)
            for n, (_, replacement) in enumerate(values):
                pattern = pattern.replace(re.escape('\0%d\0' % n), replacement)
            return pattern

        options = ['--port', str(port), '--pidfile', pidfile, '--workers', '1']
        if os.geteuid() == 0:
            # The README's user is no root: as root, the start line would also say which user
            # the workers run as.  --user nobody is that user, and may read the photos.
            options += ['--user', 'nobody']
            os.chmod(self.tmp, 0o755)
        result = run(AGENT_LINE + options + ['start'], cwd=photos)
        pid = int(read_pid(pidfile) or 0)
        self.addCleanup(kill_group_of, pid)
        self.assertEqual((result.returncode, result.stderr), (0, ''))
        self.assertRegex(result.stdout, '^%s\n$' % expected(shown[0]))
        result = run(AGENT_LINE + options + ['status'], cwd=self.tmp)      # from any directory
        self.assertEqual(result.returncode, 0)
        self.assertRegex(result.stdout, '^%s\n$' % expected(shown[1]))
        result = run(AGENT_LINE + options + ['stop'], cwd=self.tmp)
        self.assertEqual(result.returncode, 0)
        self.assertRegex(result.stdout, '^%s\n$' % expected(shown[2]))
        self.assertEqual(sorted(os.listdir(photos)), ['access.log', 'agent.log'])

    # -- what the prose names ----------------------------------------------------------------

    def test_every_option_named_exists(self):
        """Every --option in README.md and docs/*.md is one of `agent.py --help`, or of the
        bench script or the other program named in the same paragraph or table row."""
        agent_options = self.help_options()
        bench = {}
        for name in os.listdir(os.path.join(HERE, 'bench')):
            if name.endswith('.py'):
                bench['bench/' + name] = slurp(os.path.join(HERE, 'bench', name))
        unknown = []
        for paragraph in re.split(r'\n\s*\n|\n(?=\|)', '\n\n'.join(text for _, text in self.documents())):
            for option in re.findall(r'(?<![\w-])--[a-z][a-z-]*', paragraph):
                if option in agent_options:
                    continue
                scripts = [text for path, text in bench.items() if path in paragraph]
                if 'make ' in paragraph:
                    scripts = list(bench.values())
                if any(repr(option) in text or '"%s"' % option in text for text in scripts):
                    continue
                if any(option in options and program in paragraph
                       for program, options in self.FOREIGN_OPTIONS.items()):
                    continue
                unknown.append('%s in: %s' % (option, paragraph.strip()[:120]))
        self.assertEqual(unknown, [])

    def test_the_readme_leads_to_agent_help(self):
        """The README's usage block, a copy of --help, is gone (issue 20: one source for each
        option and default): the README sends the reader to `agent.py --help`, which lists
        every action the agent has."""
        self.assertIn('Every option, with its default, is in `python3 agent.py --help`',
                      ' '.join(self.section('## Serve a folder').split()))
        # ... and to the paragraph of agent.py's docstring it names for the limits.
        self.assertIn('the `Limits` paragraph of agent.py\'s docstring', ' '.join(self.readme.split()))
        self.assertRegex(agent.__doc__, r'\nLimits\b')
        self.assertEqual(self.help_actions(), set(daemon.ACTIONS) | {'upgrade', 'passwd', 'share'})

    def test_every_action_named_exists(self):
        table = self.section('## Command line and exit codes')
        named = set()
        for row in table.splitlines():
            if row.startswith('| `'):
                named.update(re.findall(r'`([a-z-]+)`', row.split('|')[1]))
        self.assertEqual(named, set(daemon.ACTIONS))
        for where, text in (('README.md', self.readme), ('daemon.py', daemon.__doc__)):
            line = re.search(r'python3 ticker\.py ([a-z|-]+)', text)
            self.assertEqual(tuple(line.group(1).split('|')), tuple(daemon.ACTIONS), where)

    def test_every_exit_code_matches_the_constants(self):
        table = self.section('## Command line and exit codes')
        rows = {}
        for row in table.splitlines():
            if row.startswith('| `'):
                cells = row.split('|')
                rows[cells[1].strip()] = cells[3].strip()
        words = {'ready or already running': daemon.EXIT_OK, 'with the daemon\'s error': daemon.EXIT_FAILURE,
                 'stopped or not running': daemon.EXIT_OK, 'failure': daemon.EXIT_FAILURE,
                 'not running': daemon.EXIT_NOT_RUNNING, 'if the reload failed': daemon.EXIT_FAILURE}
        said = []
        for code, what in re.findall(r'(\d+) ([^;]+)', rows['`start`'] + '; ' + rows['`stop`']):
            said.append((int(code), [v for k, v in words.items() if what.startswith(k)]))
        reload = rows['`reload`, `force-reload`']
        self.assertTrue(reload.startswith('0;'), reload)
        said.append((int(re.search(r'(\d+) not running', reload).group(1)), [daemon.EXIT_NOT_RUNNING]))
        said.append((int(re.search(r'(\d+) if the reload failed', reload).group(1)), [daemon.EXIT_FAILURE]))
        for code, constants in said:
            self.assertEqual(constants[:1], [code], (code, rows))
        status = dict((what.split(',')[0].strip(), int(code))
                      for code, what in re.findall(r'(\d+) ([^;]+)', rows['`status`']))
        self.assertEqual(status, {'running': daemon.STATUS_RUNNING, 'dead': daemon.STATUS_DEAD,
                                  'not running': daemon.STATUS_STOPPED, 'unknown': daemon.STATUS_UNKNOWN})
        self.assertIn('Usage errors exit %d' % daemon.EXIT_USAGE, table)
        self.assertRegex(table, r'a missing permission \([^)]*\) exits %d' % daemon.EXIT_PRIVILEGE)
        # daemon.py's own table, and agent.py --help's epilog.
        doc = daemon.__doc__.split('Exit codes (LSB', 1)[1].split('\n\n', 1)[0]
        for code, name in ((daemon.EXIT_OK, 'success'), (daemon.EXIT_FAILURE, 'generic failure'),
                           (daemon.EXIT_USAGE, 'invalid argument'), (daemon.EXIT_PRIVILEGE, 'insufficient privilege'),
                           (daemon.EXIT_NOT_RUNNING, 'not running (reload)')):
            self.assertRegex(doc, r'\n  %d  %s' % (code, re.escape(name)))
        for code, name in ((daemon.STATUS_RUNNING, 'running'), (daemon.STATUS_DEAD, 'dead'),
                           (daemon.STATUS_STOPPED, 'not running'), (daemon.STATUS_UNKNOWN, 'unknown')):
            self.assertRegex(doc, r'status %d  %s' % (code, name))
        epilog = ' '.join(self.help.split('Exit codes:', 1)[1].split())
        self.assertEqual(epilog, '%d success, %d failure, %d usage, %d insufficient privilege, %d not running '
                         '(reload); status: %d running, %d dead with pidfile, %d not running, %d unknown.'
                         % (daemon.EXIT_OK, daemon.EXIT_FAILURE, daemon.EXIT_USAGE, daemon.EXIT_PRIVILEGE,
                            daemon.EXIT_NOT_RUNNING, daemon.STATUS_RUNNING, daemon.STATUS_DEAD,
                            daemon.STATUS_STOPPED, daemon.STATUS_UNKNOWN))

    def test_the_workers_default_and_bounds_are_the_helps(self):
        """--help says the default of --workers (the README no longer restates the defaults:
        test_no_default_is_restated), and its bounds are those of the help, 1-256."""
        config = agent.parser().parse_args(['start'])
        self.assertIn('worker processes, 1-256', ' '.join(self.help.split()))
        self.assertIn('(default: %d, the number of CPUs)' % os.cpu_count(), ' '.join(self.help.split()))
        self.assertEqual(config.workers, os.cpu_count())
        for bad in ('0', '257'):
            self.assertEqual(run([*AGENT_LINE, '--workers', bad, 'status']).returncode, daemon.EXIT_USAGE)

    # -- the page's shape, and the documents it leads to ------------------------------------

    TASKS = ('Serve a folder', 'HTTPS', 'systemd', 'Use daemon.py in your program', 'Test',
             'Performance in brief')
    DOCS = ('daemon.md', 'design.md', 'operations.md', 'performance.md', 'security.md')

    @staticmethod
    def prose(text):
        """The text without its fenced blocks, whose lines may begin with '#'."""
        return re.sub(r'^```.*?^```', '', text, flags=re.S | re.M)

    @staticmethod
    def anchor(heading):
        """The fragment GitHub gives a heading: lower case, punctuation dropped, '-' for ' '."""
        return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')

    def documents(self):
        """(path from the project's top, text) of README.md and of every docs/*.md."""
        found = [('README.md', self.readme)]
        for name in sorted(os.listdir(os.path.join(HERE, 'docs'))):
            if name.endswith('.md'):
                found.append(('docs/' + name, slurp(os.path.join(HERE, 'docs', name))))
        return found

    def test_the_readme_is_a_newcomers_page(self):
        """Issue 20: README.md is at most 300 lines and 3,500 words; a linked contents list comes
        first and names every section in order; then the first commands, and one section a
        task.  The long material is in docs/, each page linked from the README."""
        self.assertLessEqual(len(self.readme.splitlines()), 300)
        self.assertLessEqual(len(self.readme.split()), 3500)
        headings = re.findall(r'^## (.+)$', self.prose(self.readme), re.M)
        self.assertEqual(headings[:2], ['Contents', 'First commands'])
        listed = re.findall(r'^- \[([^]]+)\]\(#([^)]+)\)$', self.section('## Contents'), re.M)
        self.assertEqual([title for title, _ in listed], headings[1:])
        for title, fragment in listed:
            self.assertEqual(fragment, self.anchor(title))
        for task in self.TASKS:
            self.assertIn(task, headings)
        for name in self.DOCS:
            self.assertIn('](docs/%s' % name, self.readme, 'the README never leads to docs/' + name)

    def test_every_link_leads_somewhere(self):
        """Every relative link in README.md and docs/*.md names a file that exists and, after
        a '#', a heading of that file: a section that moves cannot leave a dead link behind."""
        headings = {}
        for path, text in self.documents():
            headings[path] = {self.anchor(h) for h in re.findall(r'^#+ (.+)$', self.prose(text), re.M)}
        dead = []
        for path, text in self.documents():
            for target in re.findall(r'\]\(([^)\s]+)\)', self.prose(text)):
                if re.match(r'[a-z]+:', target):
                    continue
                name, _, fragment = target.partition('#')
                linked = os.path.normpath(os.path.join(os.path.dirname(path), name)) if name else path
                if not os.path.exists(os.path.join(HERE, linked)):
                    dead.append('%s: %s (no such file)' % (path, target))
                elif fragment and fragment not in headings.get(linked, ()):
                    dead.append('%s: %s (no such heading)' % (path, target))
        self.assertEqual(dead, [])

    def test_every_test_named_exists(self):
        """docs/security.md proves each defence by naming its tests, and the other pages name
        some too: every `test_...` and `...Tests` named in README.md or docs/*.md is defined in
        a Python file of the project (`test_x_*` names a family), wherever the suite's modules
        put it."""
        defined = set()
        for top, dirs, files in os.walk(HERE):
            dirs[:] = [d for d in dirs if not d.startswith('.') and d != '__pycache__']
            for name in files:
                if name.endswith('.py'):
                    defined.update(re.findall(r'^\s*(?:def|class) (\w+)', slurp(os.path.join(top, name)), re.M))
        missing = []
        for path, text in self.documents():
            for name, family in re.findall(r'`(test_\w+|[A-Z]\w*Tests)(\*?)`', text):
                if not (any(d.startswith(name) for d in defined) if family else name in defined):
                    missing.append('%s: %s%s' % (path, name, family))
        self.assertEqual(missing, [])

    def test_no_default_is_restated(self):
        """One source for each default and limit: `agent.py --help`, which shows every default,
        and the code.  README.md and docs/*.md name an option and point there: an option
        followed by its default value, in words that would not change with it, is refused."""
        import argparse
        restated = []
        for action in agent.parser()._actions:
            if action.option_strings and action.help and action.default not in (None, argparse.SUPPRESS) \
                    and not isinstance(action.default, bool):
                self.assertIn('(default: ', ' '.join(action.help.split()), action.option_strings)
            if not action.option_strings or not isinstance(action.default, (int, float)) \
                    or isinstance(action.default, bool) or action.dest in ('port', 'workers'):
                continue
            value = ('%g' % action.default).replace('e+0', 'e')
            pattern = r'%s`?\s*\(?%s(?:\s*(?:s|KiB|seconds))?\)?(?=[\s,;.]|$)' % (
                re.escape(action.option_strings[-1]), re.escape(value))
            for path, text in self.documents():
                for match in re.finditer(pattern, ' '.join(text.split())):
                    restated.append('%s: %s' % (path, match.group(0)))
        for path, text in self.documents():
            for name in ('agent.log', 'access.log'):
                if '`./%s`' % name in text:
                    restated.append('%s: `./%s`' % (path, name))
        self.assertEqual(restated, [])

    def test_help_never_cuts_a_path_or_an_option(self):
        """`agent.py --help` wraps at spaces only: at any width, a path such as
        /tmp/agent-UID/agent-PORT.pid stays one word (it was cut after 'agent-')."""
        for columns in ('60', '80', '100'):
            text = run([*AGENT_LINE, '--help'], env=dict(os.environ, COLUMNS=columns)).stdout
            words = text.split()
            for whole in ('/tmp/agent-UID/agent-PORT.pid', '$XDG_RUNTIME_DIR/agent-PORT.pid',
                          '/run/agent-PORT.pid', 'in-flight', 'Strict-Transport-Security:'):
                self.assertTrue(any(whole in word for word in words),
                                'COLUMNS=%s: %s cut in --help' % (columns, whole))

    def test_the_constructor_options_said_are_the_signature(self):
        """"Options: `umask=0o022`, ..." names every keyword-only argument of Daemon(), with its
        default where it gives one."""
        import inspect
        line = re.search(r'- Options: (.*?)\.\n', self.section('## What the class does for you'), re.S)
        said = dict(item.split('=', 1) for item in re.findall(r'`([a-z_]+=[^`]*)`', line.group(1)))
        parameters = {name: parameter for name, parameter in
                      inspect.signature(daemon.Daemon.__init__).parameters.items()
                      if parameter.kind == parameter.KEYWORD_ONLY}
        self.assertEqual(sorted(said), sorted(parameters))
        for name, default in said.items():
            if default and not default.startswith(' '):
                self.assertEqual(ast_literal(default), parameters[name].default, name)

    def test_the_production_steps_match_contrib(self):
        """The systemd steps make what agent.service needs (its --root), copy files that exist,
        and the init script's stop schedule is the one docs/operations.md gives."""
        block = self.section('## systemd').split('```sh\n', 1)[1].split('```', 1)[0]
        with open(os.path.join(HERE, 'contrib', 'agent.service')) as f:
            unit = f.read()
        root = re.search(r'^ExecStart=.* --root (\S+)', unit, re.M).group(1)
        self.assertIn(root, block, 'the steps never make the --root of agent.service')
        for name in re.findall(r'contrib/(\S+)', block):
            self.assertTrue(os.path.exists(os.path.join(HERE, 'contrib', name)), name)
        with open(os.path.join(HERE, 'contrib', 'agent.init')) as f:
            init = f.read()
        stop_timeout = int(re.search(r'^STOP_TIMEOUT=\$\{STOP_TIMEOUT:-(\d+)\}', init, re.M).group(1))
        self.assertIn('--retry "TERM/$((STOP_TIMEOUT + 5))/KILL/5"', init)
        self.assertIn('`--retry TERM/%d/KILL/5`' % (stop_timeout + 5), self.section('## Without systemd: the LSB init script'))


class AgentLifecycleTests(unittest.TestCase):
    def assert_nothing_left(self, server):
        self.assertFalse(os.path.exists(server.pidfile), 'pidfile left behind')
        with open(server.log) as f:
            pids = set(map(int, re.findall(r'\[(\d+)\]', f.read())))
        self.assertEqual([p for p in pids if pid_alive(p)], [], 'processes left behind')

    def test_start_status_stop(self):
        server = AgentServer(self).start()
        self.assertEqual(server.command('status').returncode, 0)
        workers = server.workers()
        self.assertEqual(len(workers), 2)
        self.assertEqual(server.get('/missing.jpg')[0], 404)
        server.stop()
        self.assertEqual(server.command('status').returncode, 3)
        wait_for(lambda: not any(map(pid_alive, workers)), message='workers gone')
        self.assert_nothing_left(server)

    def test_port_in_use_is_a_clear_startup_error(self):
        with socket.socket() as taken:
            taken.bind(('127.0.0.1', 0))
            taken.listen(1)
            server = AgentServer(self)
            server.options[server.options.index('--port') + 1] = str(taken.getsockname()[1])
            result = server.command('start')
        self.assertEqual(result.returncode, 1)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn('Address already in use', result.stderr)
        self.assertIn('cannot listen on 127.0.0.1:', result.stderr)
        # The daemon's log says it too: the operator who reads it later (or a tool that started
        # it without looking at its stderr) learns why it is not running.
        self.assertIn('startup failed: ' + result.stderr.strip().split(': ', 1)[1], server.log_text())
        self.assert_nothing_left(server)

    def test_missing_root_is_a_clear_startup_error(self):
        server = AgentServer(self, root='/nonexistent/images')
        result = server.command('start')
        self.assertEqual(result.returncode, 1)
        self.assertIn('/nonexistent/images', result.stderr)
        self.assertIn('does not exist', result.stderr)
        self.assert_nothing_left(server)

    def test_bad_bind_address_is_a_usage_error(self):
        """Exit 2 with one line, as --port 70000: it was exit 1, found only once the daemon
        had forked; a host name says what to give instead."""
        server = AgentServer(self)
        for address, words in (('300.1.1.1', ()), ('localhost', ('127.0.0.1', '::1'))):
            server.options[server.options.index('--bind') + 1] = address
            for action in ('start', 'run'):
                with self.subTest(address=address, action=action):
                    result = server.command(action)
                    self.assertEqual(result.returncode, 2, result.stderr)
                    self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
                    for word in ("--bind", repr(address)) + words:
                        self.assertIn(word, result.stderr)
        self.assertEqual(os.listdir(server.dir), [os.path.basename(server.root)], 'nothing started, nothing written')

    def test_ipv6_loopback(self):
        if not socket.has_ipv6:
            self.skipTest('no IPv6')
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(('::1', 0))
        except OSError:
            self.skipTest('no ::1 here')
        server = AgentServer(self)
        server.options[server.options.index('--bind') + 1] = '::1'
        server.write('v6.jpg', b'six')
        result = server.command('start')
        self.assertEqual(result.returncode, 0, result.stderr)
        server.pids.append(server.master())
        port = harness.serving_port(result.stdout)
        conn = http.client.HTTPConnection('::1', port, timeout=10)
        conn.request('GET', '/v6.jpg')
        self.assertEqual(conn.getresponse().read(), b'six')
        conn.close()
        server.stop()

    def test_drops_privileges_after_binding(self):
        server, nobody = nobody_agent(self)
        server.write('p.jpg', b'pixels')
        server.start()
        for pid in [server.master()] + server.workers():
            uids = proc_status(pid, 'Uid').split()
            self.assertEqual(set(uids), {str(nobody.pw_uid)}, 'pid %d uids %s' % (pid, uids))
            self.assertNotIn('0', proc_status(pid, 'Groups').split())
        self.assertEqual(server.get('/p.jpg')[2], b'pixels')
        self.assertEqual(os.stat(server.access_log).st_uid, nobody.pw_uid)
        server.stop()
        self.assertEqual(server.command('status').returncode, 3)


class NothingLeftBehindTests(unittest.TestCase):
    """Every way an agent ends leaves no file of its own beside the pidfile (the pidfile, its
    PIDFILE.options), or leaves them only as a record that `status` reads right and the next
    start or stop clears: started as root with --user (the daemon may not unlink in the
    pidfile's root-owned directory), `run` ended by SIGTERM or SIGINT, a SIGKILLed master."""

    def user_agent(self):
        return nobody_agent(self)[0]

    def left(self, server):
        return sorted(name for name in os.listdir(server.dir)
                      if name.startswith(os.path.basename(server.pidfile)))

    def test_stop_of_an_agent_started_as_root_with_user_removes_everything(self):
        server = self.user_agent().start()
        self.assertEqual(self.left(server), ['agent.pid', 'agent.pid.options'])
        server.stop()
        self.assertEqual(self.left(server), [])
        self.assertEqual(server.command('status').returncode, 3)

    def run_until_signal(self, server, signum):
        err = os.path.join(server.dir, 'run.err')
        with open(err, 'wb') as stderr:
            proc = subprocess.Popen(AGENT_LINE + server.options + ['run'],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=stderr, start_new_session=True)
        self.addCleanup(kill_group_of, proc.pid)
        self.addCleanup(proc.wait, 10)
        wait_for(lambda: 'agent: serving' in slurp(err) or proc.poll() is not None,
                 message='the agent serving in the foreground')
        self.assertIsNone(proc.poll(), slurp(err))
        self.assertEqual(self.left(server), ['agent.pid', 'agent.pid.options'])
        os.kill(proc.pid, signum)
        self.assertEqual(proc.wait(TIMEOUT), 0, slurp(err))
        return slurp(err)

    def test_run_as_root_with_user_ended_by_a_signal_is_not_dead_and_leaves_nothing_after_stop(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            with self.subTest(signal=signum):
                server = self.user_agent()
                self.run_until_signal(server, signum)
                status = server.command('status')
                self.assertEqual(status.returncode, 3, status.stdout + status.stderr)
                result = server.command('stop')
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertEqual(self.left(server), [])

    def test_run_ended_by_a_signal_leaves_nothing(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            with self.subTest(signal=signum):
                server = AgentServer(self)
                self.run_until_signal(server, signum)
                self.assertEqual(self.left(server), [])
                self.assertEqual(server.command('status').returncode, 3)

    def test_a_killed_master_then_start_then_stop_leaves_nothing(self):
        server = AgentServer(self).start()
        master = server.master()
        kill_group_of(master)
        wait_for(lambda: not pid_alive(master), message='master gone')
        self.assertEqual(server.command('status').returncode, 1)
        server.start()
        restart = server.command('restart')
        self.assertEqual(restart.returncode, 0, restart.stderr)
        self.assertNotIn('not recorded', restart.stdout + restart.stderr)
        server.pids.append(server.master())
        server.stop()
        self.assertEqual(self.left(server), [])

    def test_a_killed_master_then_a_failed_start_leaves_nothing(self):
        server = AgentServer(self).start()
        master = server.master()
        kill_group_of(master)
        wait_for(lambda: not pid_alive(master), message='master gone')
        server.options[server.options.index('--root') + 1] = '/nonexistent/images'
        result = server.command('start')
        self.assertEqual(result.returncode, 1)
        self.assertEqual(self.left(server), [])


class FromBytecodeTests(unittest.TestCase):
    """`agent.py start|run` goes on as the imported module, from cached bytecode, in the same
    process; the current directory never joins the import path.  Python 3.9 has no
    sys.orig_argv, so there it runs on as the script (no exec, as run_from_bytecode() says):
    daemon.py's bytecode is cached, agent.py's never, and the tests check that instead."""

    EXECS = hasattr(sys, 'orig_argv')       # Python 3.10+

    def assert_agent_cached(self, where):
        """agent.py's own bytecode is in the cache from 3.10 on, and only there."""
        names = self.cached(where)
        self.assertTrue(any(name.startswith('daemon.') for name in names), names)
        self.assertEqual(any(name.startswith('agent.') for name in names), self.EXECS,
                         '%s on Python %s' % (names, sys.version.split()[0]))

    def setUp(self):
        # Python's default: the bytecode of imported modules is cached (this variable is set on
        # some machines and in many container images).
        patch = mock.patch.dict(os.environ)
        patch.start()
        self.addCleanup(patch.stop)
        os.environ.pop('PYTHONDONTWRITEBYTECODE', None)

    def copy_of_agent(self):
        where = tempfile.mkdtemp(prefix='agent-code-')
        self.addCleanup(subprocess.run, ['rm', '-rf', where])
        for name in ('agent.py', 'daemon.py'):
            with open(os.path.join(HERE, name), 'rb') as src, \
                    open(os.path.join(where, name), 'wb') as dst:
                dst.write(src.read())
        return where

    def cached(self, where):
        return sorted(os.listdir(os.path.join(where, '__pycache__')))

    def test_start_caches_and_runs_the_bytecode(self):
        where = self.copy_of_agent()
        server = AgentServer(self, script=os.path.join(where, 'agent.py'), via_script=True).start()
        self.assert_agent_cached(where)
        for pid in [server.master()] + server.workers():
            with open('/proc/%d/cmdline' % pid, 'rb') as f:
                self.assertIn(b'agent.py', f.read())
        self.assertEqual(server.get('/missing.jpg')[0], 404)
        server.stop()

    def test_run_keeps_its_pid(self):
        where = self.copy_of_agent()
        server = AgentServer(self, script=os.path.join(where, 'agent.py'))
        proc = subprocess.Popen([PYTHON, server.agent] + server.options + ['run'],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        self.addCleanup(proc.communicate, timeout=10)
        self.addCleanup(proc.kill)
        wait_for(lambda: read_pid(server.pidfile) == proc.pid, message='pidfile holds the pid run had')
        self.assert_agent_cached(where)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
        self.assertEqual(proc.returncode, 0, out)

    def test_current_directory_is_never_imported(self):
        where = self.copy_of_agent()
        cwd = tempfile.mkdtemp(prefix='agent-cwd-')
        self.addCleanup(subprocess.run, ['rm', '-rf', cwd])
        canary = os.path.join(cwd, 'imported')
        for name in ('agent', 'daemon', 'json', 'socket', 'selectors', 'mimetypes'):
            with open(os.path.join(cwd, name + '.py'), 'w') as f:
                f.write('open(%r, "a").write(__name__ + "\\n")\nraise SystemExit(99)\n' % canary)
        server = AgentServer(self, script=os.path.join(where, 'agent.py'))
        result = subprocess.run([PYTHON, server.agent] + server.options + ['start'], cwd=cwd,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=TIMEOUT)
        server.pids.append(server.master())
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertFalse(os.path.exists(canary), 'a module of the current directory was imported')
        server.stop()

    def test_interpreter_options_are_kept(self):
        where = self.copy_of_agent()
        server = AgentServer(self, script=os.path.join(where, 'agent.py'))
        result = subprocess.run([PYTHON, '-W', 'ignore', '-X', 'importtime', server.agent]
                                + server.options + ['start'], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=TIMEOUT)
        server.pids.append(server.master())
        self.assertEqual(result.returncode, 0, result.stderr)
        # -X importtime, kept through the exec, reports the import of the module agent (3.9:
        # no exec, the script imports daemon and is never imported itself).
        self.assertRegex(result.stderr, r'(?m)^import time:.*\| daemon$')
        if self.EXECS:
            self.assertRegex(result.stderr, r'(?m)^import time:.*\| agent$')
        else:
            self.assertNotRegex(result.stderr, r'(?m)^import time:.*\| agent$')
        server.stop()

    def test_started_through_a_symbolic_link(self):
        where = self.copy_of_agent()
        release = tempfile.mkdtemp(prefix='agent-link-')
        self.addCleanup(subprocess.run, ['rm', '-rf', release])
        os.symlink(os.path.join(where, 'agent.py'), os.path.join(release, 'agent.py'))
        server = AgentServer(self, script=os.path.join(release, 'agent.py'), via_script=True).start()
        self.assertEqual(server.get('/missing.jpg')[0], 404)
        with open('/proc/%d/cmdline' % server.master(), 'rb') as f:
            self.assertIn(os.path.join(release, 'agent.py').encode(), f.read())
        server.stop()

    def test_without_a_bytecode_cache_it_still_starts(self):
        where = self.copy_of_agent()
        server = AgentServer(self, script=os.path.join(where, 'agent.py'))
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE='1')
        result = subprocess.run([PYTHON, server.agent] + server.options + ['start'], env=env,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=TIMEOUT)
        server.pids.append(server.master())
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertFalse(os.path.exists(os.path.join(where, '__pycache__')))
        server.port = harness.serving_port(result.stdout)
        self.assertEqual(server.get('/missing.jpg')[0], 404)
        server.stop()


@testlib.unit
class DeprecatedCallTests(unittest.TestCase):
    """The product calls nothing that a Python from 3.12 on deprecates: a DeprecationWarning
    in a daemon's log (or an error under -W error) on Debian 13 or Fedora, and an API gone in a
    later release.  Read from the source, so that it is checked on every version (3.11 warns
    of none of these); bench/pythons.py -W error runs the suite under 3.13 and 3.14 for what
    only running finds."""

    # module.function: why it goes
    GONE = {
        'datetime.utcnow': 'deprecated in 3.12: datetime.now(timezone.utc)',
        'datetime.utcfromtimestamp': 'deprecated in 3.12: fromtimestamp(t, timezone.utc)',
        'ssl.wrap_socket': 'removed in 3.12: SSLContext.wrap_socket',
        'ssl.PROTOCOL_TLS': 'deprecated in 3.10: PROTOCOL_TLS_SERVER or _CLIENT',
        'ssl.PROTOCOL_SSLv23': 'deprecated in 3.10: PROTOCOL_TLS_SERVER or _CLIENT',
        'ssl.OP_NO_TLSv1': 'deprecated in 3.10: SSLContext.minimum_version',
        'ssl.OP_NO_TLSv1_1': 'deprecated in 3.10: SSLContext.minimum_version',
        'locale.getdefaultlocale': 'deprecated in 3.11',
    }
    # re's functions whose optional arguments are keyword-only from 3.13 on (positional: a
    # DeprecationWarning): the number of positional arguments they take.
    RE_POSITIONAL = {'split': 2, 'sub': 3, 'subn': 3}

    def offences(self, path):
        import ast
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                name = node.attr
                owner = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, 'id', '')
                why = self.GONE.get('%s.%s' % (owner, name))
                if why:
                    found.append('%s:%d: %s.%s (%s)' % (os.path.basename(path), node.lineno, owner, name, why))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in self.RE_POSITIONAL:
                owner = node.func.value
                limit = self.RE_POSITIONAL[node.func.attr]
                if not (isinstance(owner, ast.Name) and owner.id == 're'):
                    limit -= 1          # a compiled pattern's method: no pattern argument
                    if not (isinstance(owner, ast.Name) and owner.id.isupper()):
                        continue        # str.split and the like, not a pattern
                if len(node.args) > limit:
                    found.append('%s:%d: %s() with %d positional arguments (keyword-only from 3.13)'
                                 % (os.path.basename(path), node.lineno, node.func.attr, len(node.args)))
        return found

    def test_no_call_that_a_later_python_deprecates(self):
        self.assertEqual(self.offences(AGENT) + self.offences(os.path.join(HERE, 'daemon.py')), [])

    def test_the_check_finds_what_it_looks_for(self):
        """The check itself, on a sample of each kind of call (a check that finds nothing
        would pass forever)."""
        sample = tempfile.NamedTemporaryFile('w', suffix='.py', delete=False)
        self.addCleanup(os.unlink, sample.name)
        with sample:
            sample.write('import re, ssl, datetime\nWORD = re.compile("x")\n'
                         're.split(rb"[/?]", b"a/b", 1)\nre.sub("a", "b", "aa", 1)\nWORD.sub("b", "x", 1)\n'
                         'datetime.datetime.utcnow()\nssl.PROTOCOL_TLS\n'
                         're.split("/", "a/b", maxsplit=1)\n"a b".split(" ", 1)\nWORD.sub("b", "x")\n')
        found = self.offences(sample.name)
        self.assertEqual(sorted(int(line.split(':')[1]) for line in found), [3, 4, 5, 6, 7], found)


# ---------------------------------------------------------------------------------------------
# Issue 10: safe defaults and an honest command line
# ---------------------------------------------------------------------------------------------

def own_file_spellings(name):
    """Ways a client may spell /name: each must reach the same file, or none."""
    encoded = ''.join('%%%02X' % byte for byte in name.encode())
    return ['/' + name, '/' + encoded, '/' + encoded.lower(), '//' + name, '/./' + name,
            '/%2e/' + name, '/%2E/' + name, '/nowhere/../' + name, '/nowhere/%2e%2e/' + name,
            '/%2F' + name, '/' + name + '?x=1', '/' + name + '/', '/' + name.upper(),
            '/' + name[:-1] + '%%%02X' % ord(name[-1]), 'http://x/' + name, 'HTTP://x//' + name]


class OwnFilesTestMixin:
    def assert_never_served(self, port, names, secrets=(b'GET /', b'agent: ', b'"pid"')):
        for name in names:
            for target in own_file_spellings(name):
                for method, extra in (('GET', ''), ('HEAD', ''), ('GET', 'Range: bytes=0-\r\n')):
                    raw = ('%s %s HTTP/1.1\r\nHost: x\r\n%sConnection: close\r\n\r\n'
                           % (method, target, extra)).encode()
                    with socket.create_connection(('127.0.0.1', port), timeout=10) as sock:
                        sock.sendall(raw)
                        data = b''
                        while True:
                            chunk = sock.recv(65536)
                            if not chunk:
                                break
                            data += chunk
                    status = int(data.split(b' ', 2)[1])
                    self.assertIn(status, (400, 404), '%s %s gave %d' % (method, target, status))
                    for secret in secrets:
                        self.assertNotIn(secret, data, '%s %s leaked' % (method, target))

    def assert_not_listed(self, port, names):
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
        conn.request('GET', '/')
        response = conn.getresponse()
        page = response.read().decode()
        conn.close()
        self.assertEqual(response.status, 200)
        for name in names:
            self.assertNotIn('>%s<' % name, page)
            self.assertNotIn('"%s"' % name, page)
        return page


class SafeDefaultsTests(OwnFilesTestMixin, unittest.TestCase):
    """The agent started as a new user would: `cd ~/photos && python3 agent.py start`.

    As root, the commands run as the user nobody (a user with a login session of its own:
    XDG_RUNTIME_DIR in the test's directory), so the default pidfile lands there and not in
    /run, where concurrent runs of this suite would share it.
    """

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='agent-defaults-')
        self.addCleanup(subprocess.run, ['rm', '-rf', self.tmp])
        os.chmod(self.tmp, 0o755)
        self.www = os.path.join(self.tmp, 'photos')
        self.runtime = os.path.join(self.tmp, 'run')
        os.mkdir(self.www)
        os.mkdir(self.runtime, 0o700)
        self.preexec, self.python = None, PYTHON
        if os.geteuid() == 0:
            import pwd
            try:
                nobody = pwd.getpwnam('nobody')
            except KeyError:
                self.skipTest('no user nobody')
            for path in (self.www, self.runtime):
                os.chown(path, nobody.pw_uid, nobody.pw_gid)

            def become_nobody():
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
            self.preexec = become_nobody
            if not os.access(PYTHON, os.X_OK) or PYTHON.startswith('/root/'):
                self.python = '/usr/bin/python3'
            if not os.path.exists(self.python):
                self.skipTest('no python3 that nobody may run')
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ('NOTIFY_SOCKET', 'LISTEN_PID', 'LISTEN_FDS', 'LISTEN_FDNAMES')}
        self.env.update(XDG_RUNTIME_DIR=self.runtime, HOME=self.tmp)
        self.pidfile = os.path.join(self.runtime, 'agent-0.pid')
        self.addCleanup(lambda: kill_group_of(read_pid(self.pidfile)))

    def agent(self, *args, cwd=None):
        """agent.py with these arguments, as the test's user; loopback and any port, always."""
        result = run([self.python, *AGENT_LINE[1:], '--bind', '127.0.0.1', '--port', '0'] + list(args),
                     cwd=cwd or self.www, env=self.env, preexec_fn=self.preexec)
        self.assertNotIn('Traceback', result.stdout + result.stderr)
        self.assertNotIn('agent: agent:', result.stdout + result.stderr)
        return result

    def start(self, *args):
        result = self.agent(*(args + ('start',)))
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        match = re.search(r'at http://127\.0\.0\.1:(\d+)/, pid (\d+);', result.stdout)
        self.assertIsNotNone(match, result.stdout)
        return int(match.group(1)), int(match.group(2)), result.stdout

    def test_start_prints_one_line_and_status_stop_find_it_from_anywhere(self):
        port, pid, out = self.start()
        self.assertEqual(len(out.splitlines()), 1, out)
        log, access = os.path.join(self.www, 'agent.log'), os.path.join(self.www, 'access.log')
        self.assertEqual(out.strip(), 'agent serving %s at http://127.0.0.1:%d/, pid %d; log %s, access log %s; '
                                      'pidfile %s' % (self.www, port, pid, log, access, self.pidfile))
        self.assertEqual(read_pid(self.pidfile), pid)
        with open(log) as f:          # --port 0: the port printed is the port it took
            self.assertIn('on 127.0.0.1:%d with' % port, f.read())
        for cwd in (self.tmp, '/'):
            status = self.agent('status', cwd=cwd)
            self.assertEqual(status.returncode, 0, status.stdout + status.stderr)
            self.assertIn('is running (pid %d, pidfile %s)' % (pid, self.pidfile), status.stdout)
        stop = self.agent('stop', cwd='/')
        self.assertEqual(stop.returncode, 0, stop.stderr)
        self.assertIn('stopped (pid %d' % pid, stop.stdout)
        self.assertFalse(pid_alive(pid))
        status = self.agent('status', cwd='/')
        self.assertEqual(status.returncode, 3)
        self.assertIn('not running (no pidfile at %s)' % self.pidfile, status.stdout)

    def test_own_files_are_never_served_nor_listed_with_all_defaults(self):
        with open(os.path.join(self.www, 'cat.jpg'), 'wb') as f:
            f.write(b'a cat')
        port, pid, out = self.start()
        with open(os.path.join(self.www, 'agent.log')) as f:
            log = f.read()
        self.assertIn('the access log %s is inside --root %s' % (os.path.join(self.www, 'access.log'), self.www), log)
        self.assertEqual(log.count('is inside --root'), 2, log)     # the log and the access log, once
        # Links made by someone with write access to the root: neither reaches a log.
        os.symlink('access.log', os.path.join(self.www, 'visitors.txt'))
        os.link(os.path.join(self.www, 'agent.log'), os.path.join(self.www, 'hard.jpg'))
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
        conn.request('GET', '/cat.jpg', headers={'User-Agent': 'secret-agent', 'Referer': 'http://r/'})
        self.assertEqual(conn.getresponse().read(), b'a cat')
        conn.close()
        wait_for(lambda: 'secret-agent' in slurp(os.path.join(self.www, 'access.log')), message='an access line')
        own = ['agent.log', 'access.log', 'visitors.txt', 'hard.jpg']
        self.assert_never_served(port, own, secrets=(b'secret-agent', b'agent: serving'))
        page = self.assert_not_listed(port, own)
        self.assertNotIn('.pid', page)
        self.assertIn('cat.jpg', page)

    def test_errors_name_cause_and_fix_without_a_traceback(self):
        if os.geteuid() != 0 and self.preexec is None and can_bind_as_user(80):
            self.skipTest('this user may bind port 80')
        low = self.agent('--port', '80', 'start')      # the later --port wins
        self.assertEqual(low.returncode, daemon.EXIT_PRIVILEGE, low.stderr)
        self.assertIn('port 80 needs root', low.stderr)
        other = self.agent('--user', 'root', 'start')
        self.assertEqual(other.returncode, daemon.EXIT_PRIVILEGE, other.stderr)
        self.assertIn('switching to root needs root', other.stderr)
        locked = os.path.join(self.tmp, 'locked')
        os.mkdir(locked, 0o755)             # root's, or this user's with no write bit
        if os.geteuid() != 0:
            os.chmod(locked, 0o555)
        for option, kind in (('--log', 'log'), ('--pidfile', 'pidfile'), ('--access-log', None)):
            result = self.agent(option, os.path.join(locked, 'x'), 'start')
            self.assertNotEqual(result.returncode, 0, option)
            self.assertIn(os.path.join(locked, 'x'), result.stderr, option)
            self.assertRegex(result.stderr, r'(user|by) \w+ \(uid \d+\)', option)
            self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
            if kind:
                self.assertEqual(result.returncode, daemon.EXIT_PRIVILEGE, option)
                self.assertIn('cannot write the %s' % kind, result.stderr)
        self.assertFalse(os.path.exists(self.pidfile))
        # A pidfile this user may not even read: every action is status 4, with a message.
        os.chmod(locked, 0o700 if os.geteuid() == 0 else 0o000)
        self.addCleanup(os.chmod, locked, 0o755)
        for action in ('status', 'stop', 'reload', 'restart', 'upgrade'):
            result = self.agent('--pidfile', os.path.join(locked, 'a.pid'), action)
            if action == 'upgrade' and result.returncode != daemon.EXIT_PRIVILEGE:
                continue                    # issue 13 reworks upgrade's messages and codes
            self.assertEqual(result.returncode, daemon.EXIT_PRIVILEGE, action + result.stdout + result.stderr)
            self.assertIn(os.path.join(locked, 'a.pid'), result.stderr, action)


class OwnRotationTests(OwnFilesTestMixin, unittest.TestCase):
    """The logs' rotations are own files too, whatever logrotate made of them (issue 26, item 8).

    logrotate's `compress` writes access.log.2.gz as a new file (an inode the agent never
    opened) and removes the old one; a hard link to it put in the root, under any name, must
    not publish the visitors' addresses.  And an upgrade must not forget a rotation the old
    image knew: the old access log renamed out of its directory (logrotate's olddir)."""

    ROTATIONS = ('access.log.2.gz', 'access.log-20261206.gz', 'access.log.3.xz', 'access.log.4.bz2',
                 'access.log.5.zst', 'access.log-20261206', 'access.log.1', 'agent.log.2.gz')

    def rotate(self, server, names, secret):
        """Rotations next to the logs, new files, each linked into the root under another
        name (access.log.2.gz as link-access_log_2_gz.gz); the names of the links."""
        links = []
        for name in names:
            path = os.path.join(server.dir, name)
            with open(path, 'wb') as f:
                f.write(secret + b' ' + name.encode() + b'\n')
            links.append('link-%s.gz' % name.replace('.', '_'))
            os.link(path, os.path.join(server.root, links[-1]))
        return links

    def test_hard_links_to_compressed_rotations_are_never_served_nor_listed(self):
        server = AgentServer(self).start()
        server.write('cat.jpg', b'a cat')
        self.assertEqual(server.get('/cat.jpg')[2], b'a cat')      # the workers have looked before
        links = self.rotate(server, self.ROTATIONS, b'secret-rotation')
        self.assert_never_served(server.port, links, secrets=(b'secret-rotation',))
        page = self.assert_not_listed(server.port, links)
        self.assertIn('cat.jpg', page)
        server.stop()

    def test_an_upgrade_keeps_what_the_old_image_knew(self):
        server = AgentServer(self).start()
        server.write('cat.jpg', b'a cat')
        self.assertEqual(server.get('/cat.jpg', headers={'User-Agent': 'secret-visitor'})[2], b'a cat')
        wait_for(lambda: 'secret-visitor' in slurp(server.access_log), message='an access line')
        before = self.rotate(server, self.ROTATIONS[:2], b'secret-rotation')
        # logrotate with `olddir old`: the log the agent opened is renamed out of its directory,
        # and linked into the root.
        os.mkdir(os.path.join(server.dir, 'old'))
        os.rename(server.access_log, os.path.join(server.dir, 'old', 'access.log.1'))
        os.link(os.path.join(server.dir, 'old', 'access.log.1'), os.path.join(server.root, 'visits.txt'))
        own = before + ['visits.txt']
        self.assert_never_served(server.port, own, secrets=(b'secret-rotation', b'secret-visitor'))
        self.assert_not_listed(server.port, own)
        result = server.command('upgrade')
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        after = self.rotate(server, self.ROTATIONS[2:4], b'secret-rotation')
        own += after
        self.assert_never_served(server.port, own, secrets=(b'secret-rotation', b'secret-visitor'))
        page = self.assert_not_listed(server.port, own)
        self.assertIn('cat.jpg', page)
        server.stop()


class SystemDirectoryTests(unittest.TestCase):
    """No system directory served by accident: without --root, start, restart and run refuse
    a current directory that is / or a system one; --root naming it is allowed.  And restart
    when nothing runs starts with the last agent's options."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='agent-sysdir-')
        self.addCleanup(subprocess.run, ['rm', '-rf', self.tmp])
        os.chmod(self.tmp, 0o755)
        self.www = os.path.join(self.tmp, 'www')
        os.mkdir(self.www)
        self.pidfile = os.path.join(self.tmp, 'agent.pid')
        self.log = os.path.join(self.tmp, 'agent.log')
        self.addCleanup(lambda: kill_group_of(read_pid(self.pidfile)))

    def agent(self, *args, cwd):
        return run([*AGENT_LINE, '--bind', '127.0.0.1', '--port', '0', '--pidfile', self.pidfile,
                    '--log', self.log, '--access-log', 'off', '--workers', '1'] + list(args), cwd=cwd)

    def test_system_directories_are_refused_as_the_default_root(self):
        homes = {pw.pw_dir for pw in pwd.getpwall() if pw.pw_dir not in ('/', '') and os.path.isdir(pw.pw_dir)}
        for cwd in ['/', '/etc', '/usr', '/root'] + sorted(homes - {'/root'})[:1]:
            if not os.path.isdir(cwd) or not os.access(cwd, os.X_OK):
                continue                    # (an ordinary user may not enter /root)
            for action in ('start', 'restart', 'run'):
                result = self.agent(action, cwd=cwd)
                self.assertNotEqual(result.returncode, 0, (cwd, action, result.stdout))
                self.assertIn('--root', result.stderr, (cwd, action))
                self.assertIn(cwd, result.stderr, (cwd, action))
                self.assertNotIn('Traceback', result.stderr)
                self.assertIsNone(read_pid(self.pidfile), (cwd, action))
        if os.geteuid() != 0:
            return
        # As an ordinary user too (nobody, its pidfile in a directory of its own).
        nobody = nobody_user(self)
        python = python_for(self, nobody)
        own = os.path.join(self.tmp, 'nobody')
        os.mkdir(own)
        os.chown(own, nobody.pw_uid, nobody.pw_gid)
        for cwd in ('/', '/etc'):
            result = run([python, *AGENT_LINE[1:], '--bind', '127.0.0.1', '--port', '0', '--pidfile',
                          os.path.join(own, 'a.pid'), '--log', os.path.join(own, 'a.log'),
                          '--access-log', 'off', '--workers', '1', 'start'], cwd=cwd,
                         user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[])
            self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
            self.assertIn('the current directory %s is a system directory' % cwd, result.stderr)
            self.assertIn('--root', result.stderr)

    def test_a_system_directory_named_by_root_is_allowed(self):
        result = self.agent('--root', '/etc', '--user', 'nobody' if os.geteuid() == 0 else
                            pwd.getpwuid(os.geteuid()).pw_name, 'start', cwd='/')
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        port = harness.serving_port(result.stdout)
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
        conn.request('GET', '/shadow')
        response = conn.getresponse()
        self.assertIn(response.status, (403, 404))
        self.assertNotIn(b'root:', response.read())
        conn.close()
        self.assertEqual(self.agent('stop', cwd='/').returncode, 0)

    def test_restart_when_nothing_runs_uses_the_last_agents_options(self):
        with open(os.path.join(self.www, 'k.jpg'), 'wb') as f:
            f.write(b'kept')
        user = ('--user', 'root') if os.geteuid() == 0 else ()
        first = self.agent(*user, '--no-listing', 'start', cwd=self.www)
        self.assertEqual(first.returncode, 0, first.stdout + first.stderr)
        master = read_pid(self.pidfile)
        os.kill(master, signal.SIGKILL)     # a crash: its pidfile and options file remain
        wait_for(lambda: not pid_alive(master) and not children_of(master), message='the agent gone')
        # `restart` from / with nothing but the pidfile: the same agent again.
        # (--bind and --port again, the same: loopback even while this test fails)
        result = run([*AGENT_LINE, '--pidfile', self.pidfile, '--bind', '127.0.0.1', '--port', '0',
                      'restart'], cwd='/')
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn('nothing was running', result.stdout)
        self.assertIn('agent serving %s at' % self.www, result.stdout)
        port = harness.serving_port(result.stdout)
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
        conn.request('GET', '/')
        self.assertEqual(conn.getresponse().status, 403)        # --no-listing kept
        conn.close()
        self.assertEqual(self.agent('stop', cwd='/').returncode, 0)
        # After a clean stop nothing is left behind, options included: restart is a start.
        result = run([*AGENT_LINE, '--pidfile', self.pidfile, '--bind', '127.0.0.1', '--port', '0',
                      'restart'], cwd='/')
        self.assertNotEqual(result.returncode, 0, result.stdout)
        self.assertIn('nothing was running', result.stdout)
        self.assertIn('--root', result.stderr)

    def test_restart_with_no_last_options_is_a_start_and_says_so(self):
        user = ('--user', 'root') if os.geteuid() == 0 else ()
        result = self.agent(*user, 'restart', cwd=self.www)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn('nothing was running', result.stdout)
        self.assertIn('agent serving %s at' % self.www, result.stdout)
        self.assertEqual(self.agent('stop', cwd='/').returncode, 0)


def can_bind_as_user(port):
    try:
        with socket.socket() as s:
            s.bind(('127.0.0.1', port))
        return True
    except OSError:
        return False


class HonestCommandLineTests(OwnFilesTestMixin, unittest.TestCase):
    def test_own_files_stay_hidden_after_logrotate_renames(self):
        server = AgentServer(self, workers=2)
        server.root = server.dir                # the seed's layout: pidfile and logs in the root
        server.options[server.options.index('--root') + 1] = server.dir
        server.write('agent.logo.jpg', b'not ours')      # a prefix alone hides nothing
        server.start()
        self.assertEqual(server.get('/agent.logo.jpg')[2], b'not ours')
        old_access = os.stat(server.access_log).st_ino
        for name in ('access.log', 'agent.log'):
            os.rename(os.path.join(server.dir, name), os.path.join(server.dir, name + '.1'))
        with open(os.path.join(server.dir, 'access.log.2.gz'), 'wb') as f:   # a new inode
            f.write(b'compressed GET / lines')
        with open(os.path.join(server.dir, 'access.log-20250101'), 'wb') as f:
            f.write(b'dateext GET / lines')
        os.kill(server.master(), signal.SIGUSR1)
        wait_for(lambda: os.path.exists(server.access_log) and os.path.exists(server.log),
                 message='the logs reopened')
        self.assertNotEqual(os.stat(server.access_log).st_ino, old_access)
        wait_for(lambda: server.get('/agent.logo.jpg')[0] == 200 and 'agent.logo.jpg' in slurp(server.access_log),
                 message='a line in the new access log')
        own = ['agent.pid', 'agent.pid.options', 'agent.log', 'access.log', 'agent.log.1',
               'access.log.1', 'access.log.2.gz', 'access.log-20250101']
        self.assert_never_served(server.port, own)
        page = self.assert_not_listed(server.port, own)
        self.assertIn('agent.logo.jpg', page)
        server.stop()

    def test_port_taken_by_an_agent_names_it_and_how_to_stop_it(self):
        first = AgentServer(self).start()
        second = AgentServer(self)
        second.options[second.options.index('--port') + 1] = str(first.port)
        result = second.command('start')
        self.assertEqual(result.returncode, 1)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn('Address already in use (by agent pid %d, pidfile %s; stop it with: '
                      % (first.master(), first.pidfile), result.stderr)
        self.assertIn('--pidfile %s stop' % first.pidfile, result.stderr)
        first.stop()

    def test_restart_keeps_options_not_given_and_names_those_that_change(self):
        server = AgentServer(self, workers=2)
        server.write('k.jpg', b'kept')
        server.start()
        old = server.master()
        # From another directory, with nothing but the pidfile: the same agent comes back.
        result = run([*AGENT_LINE, '--pidfile', server.pidfile, 'restart'], cwd='/')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn('restart changes', result.stdout)
        self.assertIn('agent serving %s at http://127.0.0.1:' % server.root, result.stdout)
        server.pids.append(server.master())
        self.assertNotEqual(server.master(), old)
        server.port = harness.serving_port(result.stdout)
        self.assertEqual(server.get('/k.jpg')[2], b'kept')
        self.assertEqual(len(server.workers()), 2)
        result = run([*AGENT_LINE, '--pidfile', server.pidfile, '--workers', '1', '--no-listing',
                      'restart'], cwd='/')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn('agent: restart changes --no-listing off -> on, --workers 2 -> 1', result.stdout)
        server.pids.append(server.master())
        self.assertEqual(len(server.workers()), 1)
        server.stop()

    def test_ps_shows_master_and_workers_not_the_launching_action(self):
        server = AgentServer(self, workers=2).start()
        with open('/proc/%d/comm' % server.master()) as f:
            self.assertEqual(f.read().strip(), 'agent: master')
        for pid in server.workers():
            with open('/proc/%d/comm' % pid) as f:
                self.assertEqual(f.read().strip(), 'agent: worker')
        with open('/proc/%d/cmdline' % server.master(), 'rb') as f:
            words = f.read().replace(b'\0', b' ').split()
        self.assertEqual(words[:3], [b'agent:', b'master', AGENT.encode()])
        self.assertIn(server.pidfile.encode(), words)
        self.assertNotIn(b'start', words)
        ps = run(['ps', '-o', 'args=', '-p', str(server.master())])
        if ps.returncode == 0:
            self.assertTrue(ps.stdout.startswith('agent: master '), ps.stdout)
        server.stop()

    def test_max_age_no_listing_svgz_and_version(self):
        import gzip
        server = AgentServer(self, '--max-age', '3600', '--no-listing')
        server.write('a.jpg', b'jpeg')
        server.write('album/x.jpg', b'x')
        server.write('with-index/index.html', b'<p>index</p>')
        svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="1" height="1"/>'
        server.write('logo.svgz', gzip.compress(svg))
        server.start()
        status, headers, body = server.get('/a.jpg')
        self.assertEqual(headers['cache-control'], 'max-age=3600')
        status, headers, body = server.get('/a.jpg', {'If-None-Match': headers['etag']})
        self.assertEqual((status, headers['cache-control']), (304, 'max-age=3600'))
        self.assertEqual(server.get('/album/')[0], 403)
        self.assertEqual(server.get('/')[0], 403)
        self.assertEqual(server.get('/with-index/')[2], b'<p>index</p>')
        status, headers, body = server.get('/logo.svgz')
        self.assertEqual((headers['content-type'], headers['content-encoding']), ('image/svg+xml', 'gzip'))
        self.assertEqual(gzip.decompress(body), svg)
        self.assertNotIn('content-encoding', server.get('/a.jpg')[1])
        server.stop()
        default = AgentServer(self).start()
        default.write('d.jpg', b'd')
        self.assertEqual(default.get('/d.jpg')[1]['cache-control'], 'max-age=%d' % agent.DEFAULT_MAX_AGE)
        self.assertEqual(default.get('/')[0], 200)
        default.stop()
        version = run([*AGENT_LINE, '--version'])
        self.assertEqual(version.returncode, 0)
        self.assertEqual(version.stdout.split()[:2], ['agent.py', agent.__version__])


def worker_account():
    """The passwd entry the workers of an agent started as root without --user run as."""
    for name in ('agent', 'nobody'):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


def remove_files(*paths):
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def uid_of(pid):
    """The real uid of a process, from /proc/PID/status (readable whoever owns it)."""
    return int(proc_status(pid, 'Uid').split()[0])


class RootIdentityTests(unittest.TestCase):
    """Started as root: who the workers run as, what they may read, what ps shows after the
    drop, and what status and stop say about an agent of another user on the port."""

    def setUp(self):
        nobody_user(self, 'starts the agent as root')
        self.account = worker_account()
        self.tmp = tempfile.mkdtemp(prefix='agent-identity-')
        self.addCleanup(subprocess.run, ['rm', '-rf', self.tmp])
        os.chmod(self.tmp, 0o755)           # mkdtemp's 0700 would keep the workers out
        self.www = os.path.join(self.tmp, 'www')
        os.mkdir(self.www)
        with open(os.path.join(self.www, 'a.jpg'), 'wb') as f:
            f.write(b'jpeg')
        self.pidfile = os.path.join(self.tmp, 'agent.pid')
        self.log = os.path.join(self.tmp, 'agent.log')
        self.addCleanup(lambda: kill_group_of(read_pid(self.pidfile)))

    def agent(self, *args, cwd='/', root=None):
        return run([*AGENT_LINE, '--root', root or self.www, '--bind', '127.0.0.1', '--port', '0',
                    '--pidfile', self.pidfile, '--log', self.log, '--access-log', 'off',
                    '--workers', '2'] + list(args), cwd=cwd)

    def start(self, *args, root=None):
        result = self.agent(*(args + ('start',)), root=root)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertNotIn('Traceback', slurp(self.log))
        return harness.serving_port(result.stdout), read_pid(self.pidfile), result.stdout

    def get(self, port, path):
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
        try:
            conn.request('GET', path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


    def test_another_users_pidfile_cannot_hold_status(self):
        """status reads another user's pidfile (read_pid): a FIFO there, or a huge file, must
        neither block it nor be read whole."""
        fifo, big = os.path.join(self.tmp, 'fifo.pid'), os.path.join(self.tmp, 'big.pid')
        os.mkfifo(fifo)
        with open(big, 'w') as f:
            f.write('42\n' + 'x' * (1 << 20))
        program = 'import sys; sys.path.insert(0, %r); import agent; print(agent.read_pid(%r), ' \
                  'agent.read_pid(%r))' % (HERE, fifo, big)
        result = run([PYTHON, '-c', program], timeout=10)
        self.assertEqual(result.stdout.split(), ['None', '42'], result.stderr)
    def test_workers_drop_to_an_unprivileged_user_unless_told_root(self):
        port, master, out = self.start()
        self.assertIn('workers run as %s' % self.account.pw_name, out)
        pids = [master] + children_of(master)
        self.assertEqual(len(pids), 3)
        self.assertEqual({uid_of(pid) for pid in pids}, {self.account.pw_uid})
        self.assertEqual(self.get(port, '/a.jpg'), (200, b'jpeg'))
        # The log stays open, but a rotation's new file cannot be made in root's directory.
        self.assertIn('warning: %s (uid %d) cannot make the log %s again after a rotation'
                      % (self.account.pw_name, self.account.pw_uid, self.log), slurp(self.log))
        self.assertEqual(self.agent('stop').returncode, 0)
        # --user root is a choice, said on the start line and warned of in the log.
        port, master, out = self.start('--user', 'root')
        self.assertIn('workers run as root', out)
        self.assertEqual({uid_of(pid) for pid in [master] + children_of(master)}, {0})
        self.assertRegex(slurp(self.log), r'warning.*--user root')
        self.assertEqual(self.agent('stop').returncode, 0)

    def test_etc_shadow_is_never_served_even_with_root_slash_given(self):
        port, master, out = self.start(root='/')
        status, body = self.get(port, '/etc/shadow')
        self.assertIn(status, (403, 404), body)
        self.assertNotIn(b'root:', body)
        self.assertEqual(self.agent('stop', root='/').returncode, 0)

    def test_a_root_the_workers_cannot_read_is_a_start_error_naming_it(self):
        os.chmod(self.www, 0o700)
        result = self.agent('start')
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn(self.www, result.stderr)
        self.assertIn(self.account.pw_name, result.stderr)
        self.assertIn('--user', result.stderr)
        self.assertIsNone(read_pid(self.pidfile))

    def test_ps_titles_after_the_drop(self):
        for user in ((), ('--user', 'nobody')):
            port, master, out = self.start(*user)
            workers = children_of(master)
            self.assertEqual(len(workers), 2)
            for pid, title in [(master, b'agent: master')] + [(pid, b'agent: worker') for pid in workers]:
                with open('/proc/%d/comm' % pid, 'rb') as f:
                    self.assertEqual(f.read().strip(), title, user)
                with open('/proc/%d/cmdline' % pid, 'rb') as f:
                    self.assertTrue(f.read().startswith(title + b' '), user)
            self.assertEqual(self.agent('stop').returncode, 0)

    def test_status_and_stop_name_an_agent_of_another_user_on_the_port(self):
        nobody = nobody_user(self)
        python = python_for(self, nobody)
        port = harness.free_port()
        home = os.path.join(self.tmp, 'nobody')
        os.mkdir(home)
        os.chown(home, nobody.pw_uid, nobody.pw_gid)
        env = {k: v for k, v in os.environ.items() if k not in ('XDG_RUNTIME_DIR', 'NOTIFY_SOCKET',
                                                                 'LISTEN_PID', 'LISTEN_FDS', 'LISTEN_FDNAMES')}

        def as_user(uid, gid, *args):
            return run([python, *AGENT_LINE[1:], '--port', str(port)] + list(args), cwd='/', env=env,
                       user=uid, group=gid, extra_groups=[])
        theirs = '/tmp/agent-%d/agent-%d.pid' % (nobody.pw_uid, port)
        started = as_user(nobody.pw_uid, nobody.pw_gid, '--root', self.www, '--bind', '127.0.0.1',
                          '--log', os.path.join(home, 'agent.log'), '--access-log', 'off',
                          '--workers', '1', 'start')
        self.addCleanup(remove_files, theirs, theirs + '.options')      # after the kill below
        self.addCleanup(lambda: kill_group_of(read_pid(theirs)))
        self.assertEqual(started.returncode, 0, started.stdout + started.stderr)
        master = read_pid(theirs)
        for cwd in ('/', self.tmp):
            status = run([*AGENT_LINE, '--port', str(port), 'status'], cwd=cwd)
            self.assertEqual(status.returncode, 0, status.stdout + status.stderr)
            text = status.stdout + status.stderr
            self.assertIn('pid %d' % master, text)
            self.assertIn('nobody', text)
            self.assertIn(theirs, text)
            self.assertNotIn('not running', text)
        stop = run([*AGENT_LINE, '--port', str(port), 'stop'], cwd='/')
        self.assertEqual(stop.returncode, 1, stop.stdout + stop.stderr)
        self.assertIn('--pidfile %s stop' % theirs, stop.stdout + stop.stderr)
        self.assertTrue(pid_alive(master))
        self.assertEqual(self.get(port, '/a.jpg'), (200, b'jpeg'))
        # Another ordinary user may not read nobody's pidfile: unknown (4), never 3.
        other = as_user(54321, 54321, 'status')
        self.assertEqual(other.returncode, daemon.STATUS_UNKNOWN, other.stdout + other.stderr)
        self.assertIn('port %d' % port, other.stdout + other.stderr)
        self.assertNotIn('not running', other.stdout + other.stderr)
        self.assertEqual(as_user(nobody.pw_uid, nobody.pw_gid, 'stop').returncode, 0)
        # The reverse: root's agent on the port (its default pidfile in /run), asked by nobody.
        ours = '/run/agent-%d.pid' % port
        result = run([*AGENT_LINE, '--root', self.www, '--bind', '127.0.0.1', '--port', str(port),
                      '--log', self.log, '--access-log', 'off', '--workers', '1', 'start'], cwd='/')
        self.addCleanup(remove_files, ours, ours + '.options')
        self.addCleanup(lambda: kill_group_of(read_pid(ours)))
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        status = as_user(nobody.pw_uid, nobody.pw_gid, 'status')
        self.assertEqual(status.returncode, 0, status.stdout + status.stderr)
        self.assertIn('pid %d' % read_pid(ours), status.stdout)
        self.assertIn(ours, status.stdout)
        stop = as_user(nobody.pw_uid, nobody.pw_gid, 'stop')
        self.assertNotEqual(stop.returncode, 0, stop.stdout + stop.stderr)
        self.assertIn('--pidfile %s stop' % ours, stop.stdout + stop.stderr)
        self.assertEqual(run([*AGENT_LINE, '--port', str(port), 'stop'], cwd='/').returncode, 0)


class CommonMistakeTests(unittest.TestCase):
    """What a newcomer meets first: each mistake is one line that names the option, file or
    user, with the LSB exit code (2 usage, 1 failure), never a usage screen or a traceback."""

    def agent(self, *args):
        return run(AGENT_LINE + list(args))

    def assert_one_line(self, result, code, *words):
        self.assertEqual(result.returncode, code, result.stdout + result.stderr)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertNotIn('Traceback', result.stderr)
        for word in words:
            self.assertIn(word, lines[0])

    def test_usage_errors_are_one_line(self):
        tmp = tempfile.mkdtemp(prefix='agent-test-')
        self.addCleanup(subprocess.run, ['rm', '-rf', tmp])
        pidfile = os.path.join(tmp, 'a.pid')
        for value in ('0', '-1', 'x', '10000'):
            with self.subTest(workers=value):
                self.assert_one_line(self.agent('--pidfile', pidfile, '--root', tmp, '--bind', '127.0.0.1',
                                                '--port', '0', '--workers', value, 'start'),
                                     2, '--workers', repr(value))
        self.assert_one_line(self.agent('--pidfile', pidfile, 'frobnicate'), 2, 'frobnicate', 'start')
        self.assert_one_line(self.agent('--pidfile', pidfile), 2, 'ACTION')
        self.assert_one_line(self.agent('--tls-cert', 'c.pem', 'start'), 2, '--tls-key')
        # A mistyped option is named, with the option meant, whatever follows it (its value
        # was blamed instead: "argument ACTION: invalid choice: '80'").
        self.assert_one_line(self.agent('--pidfile', pidfile, '--prot', '80', 'start'), 2, "'--prot'", '--port')
        self.assert_one_line(self.agent('--pidfile', pidfile, '--rot=/srv', 'start'), 2, "'--rot'", '--root')
        self.assert_one_line(self.agent('--pidfile', pidfile, '--frobnicate', 'x', 'status'), 2, "'--frobnicate'")
        self.assertFalse(os.listdir(tmp))

    def test_files_the_user_may_not_write_exit_4(self):
        """A pidfile, log or access log in a directory this user may not write: one line naming
        the file and the user, exit 4 (LSB: insufficient privilege) for each of the three, from
        `start` in the launcher as from a foreground `run`; nothing is left running.  (The
        access log was opened only in the daemon: exit 1, a different message.)"""
        nobody = nobody_user(self)
        python = python_for(self, nobody)
        tmp = tempfile.mkdtemp(prefix='agent-test-')
        self.addCleanup(subprocess.run, ['rm', '-rf', tmp])
        os.chmod(tmp, 0o755)
        mine = os.path.join(tmp, 'mine')
        os.mkdir(mine)
        os.chown(mine, nobody.pw_uid, nobody.pw_gid)
        closed = os.path.join(tmp, 'closed')       # root's, 0755: nobody may not write in it
        os.mkdir(closed)
        base = {'--pidfile': os.path.join(mine, 'a.pid'), '--log': os.path.join(mine, 'a.log'),
                '--access-log': os.path.join(mine, 'access.log')}
        for option in sorted(base):
            for action in ('start', 'run'):
                options = dict(base, **{option: os.path.join(closed, 'x.log')})
                argv = [*AGENT_LINE, '--root', tmp, '--bind', '127.0.0.1', '--port', '0']
                for name, value in sorted(options.items()):
                    if not (action == 'run' and name == '--log'):
                        argv += [name, value]
                if action == 'run' and option == '--log':
                    continue
                with self.subTest(option=option, action=action):
                    result = run([python] + argv[1:] + [action], user=nobody.pw_uid,
                                 group=nobody.pw_gid, extra_groups=[], cwd=mine)
                    self.assert_one_line(result, 4, os.path.join(closed, 'x.log'), 'nobody')
                    self.assertFalse(os.path.exists(os.path.join(mine, 'a.pid')))
        self.assertEqual(os.listdir(closed), [])

    def test_actions_on_a_stale_pidfile(self):
        """A pidfile left by an agent that died (kill -9): each action says so in one line that
        names the pidfile, with its LSB code, and none claims it failed to remove the file when
        it did not try (reload said 'cannot remove it', which sent root looking for a
        permission problem)."""
        tmp = tempfile.mkdtemp(prefix='agent-test-')
        self.addCleanup(subprocess.run, ['rm', '-rf', tmp])
        pidfile = os.path.join(tmp, 'a.pid')
        dead = subprocess.Popen(['true'])
        dead.wait()
        for action, code in (('reload', 7), ('force-reload', 7), ('upgrade', 7), ('try-restart', 0),
                             ('status', 1), ('stop', 0)):
            with open(pidfile, 'w') as f:
                f.write('%d\n' % dead.pid)
            with self.subTest(action=action):
                result = self.agent('--pidfile', pidfile, '--root', tmp, action)
                self.assertEqual(result.returncode, code, result.stdout + result.stderr)
                out = (result.stdout + result.stderr).strip()
                self.assertEqual(len(out.splitlines()), 1, out)
                self.assertIn(pidfile, out)
                self.assertNotIn('Traceback', out)
                self.assertNotIn('cannot remove', out)

    def test_a_removed_current_directory(self):
        """Run from a directory removed since (a shell left in it): relative paths cannot be
        resolved, and the options that need one are named; the rest still works."""
        tmp = tempfile.mkdtemp(prefix='agent-test-')
        self.addCleanup(subprocess.run, ['rm', '-rf', tmp])
        gone = os.path.join(tmp, 'gone')
        os.mkdir(gone)
        pidfile = os.path.join(tmp, 'a.pid')

        def agent(*args):
            return subprocess.run(AGENT_LINE + list(args), cwd=gone, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=TIMEOUT,
                                  preexec_fn=lambda: os.rmdir(gone))
        result = agent('--pidfile', pidfile, 'status')
        self.assertEqual(result.returncode, 3, result.stderr)
        self.assertNotIn('Traceback', result.stderr)
        os.mkdir(gone)
        self.assert_one_line(agent('--pidfile', pidfile, '--port', '0', 'start'), 1,
                             '--root', 'current directory')
        os.mkdir(gone)
        self.assert_one_line(agent('--pidfile', 'rel.pid', 'status'), 4, '--pidfile', 'rel.pid')
        os.mkdir(gone)
        self.assert_one_line(agent('--pidfile', pidfile, '--root', tmp, '--port', '0',
                                   '--log', os.path.join(tmp, 'a.log'), 'start'), 1, '--access-log')
        self.assertFalse(os.path.exists(pidfile))
        # restart takes the options not given again from the running agent: all absolute.
        server = AgentServer(self).start()
        for action, code in (('status', 0), ('reload', 0), ('restart', 0), ('stop', 0)):
            os.mkdir(gone)
            result = agent('--pidfile', server.pidfile, action)
            with self.subTest(action=action):
                self.assertEqual(result.returncode, code, result.stderr)
                self.assertNotIn('Traceback', result.stderr)

    def test_root_that_is_a_file_or_unreadable_is_named_as_such(self):
        server = AgentServer(self)
        path = server.write('file.jpg', b'x')
        server.options[server.options.index('--root') + 1] = path
        self.assert_one_line(server.command('start'), 1, path, 'is not a directory')
        self.assertNotIn('does not exist', server.command('start').stderr)

    def test_root_unreadable_by_user_names_the_user(self):
        server = nobody_agent(self)[0]
        os.chmod(server.root, 0o700)
        self.assert_one_line(server.command('start'), 1, server.root, 'not readable', 'nobody')
        self.assertFalse(os.path.exists(server.pidfile))

    def test_pidfile_that_is_a_directory_is_named(self):
        server = AgentServer(self)
        server.options[server.options.index('--pidfile') + 1] = server.root
        self.assert_one_line(server.command('start'), 1, server.root, 'directory')

    def test_help_is_grouped_with_defaults(self):
        result = self.agent('--help')
        self.assertEqual(result.returncode, 0)
        text = result.stdout
        usage = text.split('\n\n')[0]
        self.assertLessEqual(len(usage.splitlines()), 2, usage)
        self.assertIn('ACTION is one of:', text)
        for heading in ('serving:', 'files and identity:', 'limits:', 'HTTPS:'):
            self.assertIn('\n' + heading, text)
        self.assertIn('(default: %d, the number of CPUs)' % min(os.cpu_count() or 1, agent.MAX_WORKERS),
                      ' '.join(text.split()))
        self.assertIn('4 insufficient privilege', ' '.join(text.split()))
        self.assertLessEqual(max(map(len, text.splitlines())), 100)


class DefaultPidfileTests(unittest.TestCase):
    def test_one_place_per_user_and_port(self):
        with mock.patch('os.geteuid', return_value=0):
            self.assertEqual(agent.default_pidfile(9085), '/run/agent-9085.pid')
        runtime = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, runtime)
        uid = os.geteuid() or 1000          # $XDG_RUNTIME_DIR is used only if it is the user's
        os.chown(runtime, uid, -1)
        with mock.patch('os.geteuid', return_value=uid), \
                mock.patch.dict(os.environ, {'XDG_RUNTIME_DIR': runtime}):
            self.assertEqual(agent.default_pidfile(80), os.path.join(runtime, 'agent-80.pid'))
        with mock.patch('os.geteuid', return_value=1000), mock.patch.dict(os.environ, {'XDG_RUNTIME_DIR': ''}):
            self.assertEqual(agent.default_pidfile(9085), '/tmp/agent-1000/agent-9085.pid')

    def test_private_directory_refuses_one_open_to_others(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(subprocess.run, ['rm', '-rf', tmp])
        path = os.path.join(tmp, 'agent-%d' % os.geteuid())
        agent.private_directory(path, create=False)        # absent: nothing to check yet
        agent.private_directory(path, create=True)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o700)
        os.chmod(path, 0o777)
        with self.assertRaises(DaemonError) as caught:
            agent.private_directory(path, create=True)
        self.assertTrue(caught.exception.privilege)
        os.rmdir(path)
        os.symlink(tmp, path)
        with self.assertRaises(DaemonError):
            agent.private_directory(path, create=True)

    def test_describe_changes(self):
        old = ['--root', '/a', '--workers', '2']
        self.assertEqual(agent.describe_changes(old, list(old)), '')
        self.assertEqual(agent.describe_changes(old, ['--root', '/b', '--workers', '2', '--no-listing']),
                         '--no-listing off -> on, --root /a -> /b')

    def test_given_options(self):
        self.assertEqual(agent.given_options(['--root', 'x', '--no-listing', 'restart']), {'root', 'listing'})
        self.assertEqual(agent.given_options(['status']), frozenset())
