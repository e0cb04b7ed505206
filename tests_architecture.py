"""The shape issue 20 asks of the product, as tests: sizes, complexity, names bound once.

Pure stdlib: the files are read as text and parsed with ast, nothing of them is run.  The McCabe
count is mccabe's (`python3 -m mccabe --min 16 FILE`, PyCQA): 1 for the function, 1 for each
if/elif, for, while and nested def, and for a try 1 more than its except clauses; boolean
operators, comprehensions and conditional expressions count nothing.  IssueTwentyTargetTests
checks the targets the restructure is to reach (each failure names the offenders and the
figure); hand-kept, not written by the split of the suite.
"""

import ast
import os
import re
import sys
import unittest

import testlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
PRODUCT = ('daemon.py', 'agent.py')
MAX_COMPLEXITY = 15
MAX_METHODS = MAX_ATTRIBUTES = 20
BANNER_RULE = re.compile(r'^# ([-=])\1{19,}$')


def source(name):
    with open(os.path.join(HERE, name), encoding='utf-8') as f:
        return f.read()


def complexity(function):
    """mccabe's cyclomatic complexity of a function (its nested defs and classes included)."""
    def decisions(statements):
        total = 0
        for node in statements:
            if isinstance(node, (ast.If, ast.For, ast.AsyncFor, ast.While)):
                total += 1 + decisions(node.body) + decisions(node.orelse)
            elif isinstance(node, ast.Try) or type(node).__name__ == 'TryStar':
                total += len(node.handlers) + 1 + decisions(node.body) + decisions(node.orelse)
                total += sum(decisions(handler.body) for handler in node.handlers)
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                total += decisions(node.body)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                total += 1 + decisions(node.body)
            elif isinstance(node, ast.ClassDef):
                total += decisions(node.body)
        return total
    return 1 + decisions(function.body)


def functions(tree, prefix=''):
    """(qualified name, node) of each module-level function and method, as mccabe names them."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
        elif isinstance(node, ast.ClassDef):
            yield from functions(node, prefix + node.name + '.')


def top_level_bindings(tree):
    """name -> line numbers where the module binds it (in top-level if/try blocks too)."""
    found = {}

    def visit(statements):
        for node in statements:
            names = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [(a.asname or a.name).split('.')[0] for a in node.names]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [sub.id for target in targets for sub in ast.walk(target)
                         if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store)]
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for block in ('body', 'orelse', 'finalbody'):
                    visit(getattr(node, block, []))
                for handler in getattr(node, 'handlers', []):
                    visit(handler.body)
            for name in names:
                found.setdefault(name, []).append(node.lineno)
    visit(tree.body)
    return found


def class_shapes(tree):
    """(class name, methods, attributes assigned as self.X) of each class, nested ones too."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        methods = [item for item in node.body
                   if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))]
        attributes = set()
        for method in methods:
            if not method.args.args:
                continue
            me = method.args.args[0].arg
            for sub in ast.walk(method):
                targets = []
                if isinstance(sub, ast.Assign):
                    targets = sub.targets
                elif isinstance(sub, (ast.AugAssign, ast.AnnAssign)):
                    targets = [sub.target]
                for target in targets:
                    for part in ast.walk(target):
                        if isinstance(part, ast.Attribute) and isinstance(part.value, ast.Name) \
                                and part.value.id == me:
                            attributes.add(part.attr)
        yield node.name, len(methods), len(attributes)


def core_lines(text):
    """The lines of text outside the sections whose banner says optional.

    A banner is a title between two rules of '#' and 20 or more '-' or '='.  An optional
    section runs to the next banner that is not optional, of its own rule or a heavier one
    ('=' ends a section of either; '-' only one of '-')."""
    lines = text.splitlines()
    count, optional, index = 0, None, 0
    while index < len(lines):
        rule = BANNER_RULE.match(lines[index])
        if rule and index + 1 < len(lines) and not BANNER_RULE.match(lines[index + 1]):
            end = index + 1
            while end < len(lines) and lines[end].startswith('#') and not BANNER_RULE.match(lines[end]):
                end += 1
            if end < len(lines) and BANNER_RULE.match(lines[end]):
                title = lines[index + 1].lower()
                kind = rule.group(1)
                if 'optional' in title:
                    optional = optional or kind
                elif optional and (kind == '=' or optional == '-'):
                    optional = None
                if not optional:
                    count += end - index + 1
                index = end + 1
                continue
        if not optional:
            count += 1
        index += 1
    return count


@testlib.unit
class ComplexityCounterTests(unittest.TestCase):
    """The counter itself, on small functions whose mccabe count is known."""

    def count(self, text):
        return complexity(ast.parse(text).body[0])

    def test_counts_as_mccabe_does(self):
        self.assertEqual(self.count('def f():\n    return 1\n'), 1)
        self.assertEqual(self.count('def f(a, b):\n    if a and b:\n        return 1\n'
                                    '    elif a:\n        return 2\n    return [x for x in b if x]\n'), 3)
        self.assertEqual(self.count('def f(a):\n    for x in a:\n        while x:\n'
                                    '            x -= 1\n    else:\n        pass\n'), 3)
        self.assertEqual(self.count('def f():\n    try:\n        g()\n    except OSError:\n'
                                    '        pass\n    except ValueError:\n        pass\n'), 4)
        self.assertEqual(self.count('def f():\n    def g():\n        if x:\n            pass\n'
                                    '    with h():\n        if y:\n            pass\n'), 4)

    def test_bindings_are_names_bound_not_objects_changed(self):
        tree = ast.parse('x = 1\nif y:\n    x = 2\nd = {}\nd["k"] = 3\nclass C: pass\n'
                         'C.a = 1\na, (b, c) = 1, (2, 3)\n')
        self.assertEqual(top_level_bindings(tree),
                         {'x': [1, 3], 'd': [4], 'C': [6], 'a': [8], 'b': [8], 'c': [8]})

    def test_core_lines_skip_optional_sections(self):
        rule, heavy = '# ' + '-' * 30, '# ' + '=' * 30
        text = '\n'.join(['a', rule, '# Core', rule, 'b', heavy, '# Optional: x', heavy, 'c',
                          rule, '# Inside x', rule, 'd', heavy, '# Optional: y', heavy, 'e'])
        self.assertEqual(core_lines(text), 5)       # a, the core banner (3 lines), b
        self.assertEqual(core_lines(text + '\n' + heavy + '\n# Core again\n' + heavy + '\nf'), 9)


@testlib.unit
class IssueTwentyTargetTests(unittest.TestCase):
    """Issue 20's "Must show": each test names what is over its limit, with the figures."""

    maxDiff = None          # the whole list of offenders

    def test_issue20_no_function_above_complexity_15(self):
        over = []
        for name in PRODUCT:
            for qualified, node in functions(ast.parse(source(name))):
                value = complexity(node)
                if value > MAX_COMPLEXITY:
                    over.append('%s:%d %s %d' % (name, node.lineno, qualified, value))
        self.assertEqual(over, [], '%d functions above complexity %d' % (len(over), MAX_COMPLEXITY))

    def test_issue20_no_top_level_name_bound_twice(self):
        twice = []
        for name in PRODUCT:
            for bound, lines in sorted(top_level_bindings(ast.parse(source(name))).items()):
                if len(lines) > 1:
                    twice.append('%s: %s at lines %s' % (name, bound, ', '.join(map(str, lines))))
        self.assertEqual(twice, [], '%d names bound more than once' % len(twice))

    def test_issue20_no_agent_class_over_20_methods_or_attributes(self):
        over = ['%s: %d methods, %d attributes' % shape
                for shape in class_shapes(ast.parse(source('agent.py')))
                if shape[1] > MAX_METHODS or shape[2] > MAX_ATTRIBUTES]
        self.assertEqual(over, [], 'agent.py classes over %d methods or %d attributes'
                         % (MAX_METHODS, MAX_ATTRIBUTES))

    # Not met yet (2,842 lines, a core of 2,216 on 2026-12-06; 2,264 and 1,394 on 2026-12-07):
    # issue 20 stays open for it.  An
    # expected failure, so that the day it is met the suite says so (an unexpected success
    # fails the run) and the marker goes.
    @unittest.expectedFailure
    def test_issue20_daemon_py_at_most_2000_lines(self):
        self.assertLessEqual(len(source('daemon.py').splitlines()), 2000)

    @unittest.expectedFailure
    def test_issue20_daemon_py_core_at_most_1100_lines(self):
        self.assertLessEqual(core_lines(source('daemon.py')), 1100,
                             'daemon.py outside the sections whose banner says optional')

    def test_issue20_daemon_all_at_most_25_names(self):
        import daemon      # what a caller sees, the optional sections' additions included
        self.assertLessEqual(len(daemon.__all__), 25, sorted(daemon.__all__))

    def test_issue20_readme_at_most_300_lines_and_3500_words(self):
        text = source('README.md')
        lines, words = len(text.splitlines()), len(text.split())
        self.assertTrue(lines <= 300 and words <= 3500,
                        'README.md: %d lines (at most 300), %d words (at most 3,500)' % (lines, words))

    def test_issue20_test_daemon_py_at_most_1500_lines(self):
        self.assertLessEqual(len(source('test_daemon.py').splitlines()), 1500)
