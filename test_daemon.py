"""Tests for daemon.py and agent.py: the entry point, `python3 test_daemon.py` (`make test`).

The tests live beside this file in modules by area; this one imports every test class, so each
of these sees the whole suite, once:
  python3 test_daemon.py                 all classes in TEST_DAEMON_JOBS processes (default 4),
                                         a long class test by test (testrun.work_items),
                                         ending with one plain "N passed, N failed, N skipped"
  python3 test_daemon.py --unit          the unit part (`make unit`): the classes marked
                                         @testlib.unit, which start no process (no daemon, no
                                         agent.py, no tool): ~200 tests, 17 s here
  python3 test_daemon.py --integration   every other class (`make integration`): ~460 tests,
                                         about 2 minutes here (docs/testing.md)
                                         A class is integration unless marked; a marked class
                                         that starts a process fails, named (testrun.SpawnWatch)
  python3 test_daemon.py [-v] Class...   those classes (or Class.test_name), in this process
  python3 -m unittest test_daemon        python3 -m pytest [-n 4 --dist loadscope]

Modules (the shared fixtures are in testlib.py, the parallel runner in testrun.py):
  tests_daemon_unit.py     daemon.py in-process
  tests_daemon_steps.py    daemon.py's map, steps and pidfile: docs against code, odd pidfiles
  tests_daemon_process.py  daemon.py as a real daemon
  tests_daemon_probe.py    daemon.py under hostile conditions: odd pidfiles, full logs, interrupts
  tests_command_line.py    agent.py's command line and the daemon around the server
  tests_supervision.py     agent.py's master
  tests_http.py            agent.py's HTTP rules as pure functions
  tests_server.py          agent.py's HTTP rules over loopback
  tests_edges.py           agent.py at the edges
  tests_gallery.py         Images and the gallery
  tests_download.py        A folder as one download (?download=zip), and thumbnails made by a program
  tests_album.py           The album (issue 22): dates taken, videos' headers, covers; HEIC headers
  tests_tls.py             HTTPS (--tls-cert/--tls-key)
  tests_tools.py           The ecosystem, each tool run for real (skipped, naming it, when missing)
  tests_balancer.py        Behind a load balancer: node validators, PROXY protocol, proxies, health
  tests_access.py          Accounts (--auth), brute force, fail2ban, share links (issue 21)
  tests_architecture.py    The shape issue 20 asks of the product, as tests
  tests_runner.py          testrun.py, the parallel runner of `python3 test_daemon.py`
  tests_location.py        The location strip (issue 21): GPS and place names blanked in photos and videos
  tests_performance.py     What changes made for speed (issue 24) must keep: TLS resumption, own files
  tests_probe.py           Outside probing: one client must not starve the others (bench/probe_starve.py)
  tests_auth_probe.py      Wrong passwords must not hold a worker's loop: checks off the loop, bounded

Every test runs its daemons in a temporary directory, on 127.0.0.1 and a port the kernel picks
(--port 0; the agent's log names it), and stops them itself, on failure too (addCleanup kills
what is left by process group).  No test sleeps for a fixed time to pass: each polls for what it
waits for, with a hard deadline.
"""

import sys

import testrun
from tests_daemon_unit import (
    PureHelperTests, DaemonPublicApiTests, DaemonForAuthorsTests, ChannelTests,
    LauncherVerdictTests)  # noqa: F401
from tests_daemon_steps import DaemonMapTests, PidfileKindTests  # noqa: F401
from tests_daemon_process import (
    DaemonProcessTests, NoDescriptorsLeftTests, ClassicRecipeBugTests, ClosedStdStreamsTests,
    HostileFileTests, PidfileRemovedTests, PidfileProbeRaceTests, ConcurrentActionsTests,
    UnlockedPidfileWordingTests, HostileEnvironmentTests, ClassicVariantTests, HookErrorTests,
    OneChannelTests)  # noqa: F401
from tests_daemon_probe import (
    PidRangeUnitTests, PidRangeTests, WrongKindOfPathTests, InterruptedActionTests,
    FullLogTests, SecondStopSignalTests, SignalDuringStepsTests, ClosedOutputTests)  # noqa: F401
from tests_command_line import (
    AgentCommandLineTests, ReadmeTests, AgentLifecycleTests, NothingLeftBehindTests,
    FromBytecodeTests, DeprecatedCallTests, SafeDefaultsTests, OwnRotationTests,
    SystemDirectoryTests, HonestCommandLineTests, RootIdentityTests, CommonMistakeTests,
    DefaultPidfileTests)  # noqa: F401
from tests_supervision import (
    SupervisionTests, StopDuringReloadOrUpgradeTests, FailedUpgradeTests, WorkerInProcessTests,
    FuzzRegressionTests, FaultTests, ExhaustionTests)  # noqa: F401
from tests_http import (
    RequestParsingTests, HostileInputParsingTests, HostileInputParsingProcessTests, HeadRefusalTests,
    ChunkedBodyTests,
    PathMappingTests, RangeHeaderTests, NumericFieldTests, MultipleRangeTests,
    ConditionalRequestTests, ExtremeTimestampTests)  # noqa: F401
from tests_server import (
    AccessLogAndPageTests, HttpServerTests, FollowSymlinksTests, ConnectionTimeoutTests,
    PipelineFairnessTests, PipelineFairnessServerTests, ResponseHeadTests)  # noqa: F401
from tests_edges import (
    SymlinkSwapRaceTests, ByteStreamTests, RedirectHostAndFileChangeTests, UnreadableTreeTests,
    HousekeepingAndHeadTests, NoLateImportTests)  # noqa: F401
from tests_gallery import (
    ImageHeaderTests, ImageHeaderToolTests, GalleryPureTests, GalleryNamesServerTests,
    GalleryServerTests,
    GalleryValidatorServerTests, ErrorPageServerTests, HtmlPagePolicyTests, GalleryInProcessTests,
    PageEncodingPureTests, PageEncodingServerTests)  # noqa: F401
from tests_download import (
    ZipLayoutTests, ZipServerTests, ZipLimitTests, ZipOffTests, SparseZip64Tests, ZipOverTLSTests,
    ThumbnailerPureTests, ThumbnailerServerTests, ZipEntryGoneTests, ThumbnailerCacheGoneTests,
    HeifThumbnailerPureTests, HeifThumbnailerServerTests)  # noqa: F401
from tests_album import (
    AlbumDateTests, VideoHeaderTests, VideoHeaderToolTests, AlbumServerTests, AlbumInProcessTests,
    HeifHeaderTests, HeifLocationTests)  # noqa: F401
from tests_tls import (
    TLSFixtureTests, TLSServerTests, ClientHelloAlpnTests, TLSOwnAgentTests,
    TLSRedirectLocationTests, TLSPlainHTTPLineTests, TLSStartAndReloadTests)  # noqa: F401
from tests_tools import (
    JournalPriorityTests, SdNotifyTests, SocketActivationTests, LogrotateTests,
    StartStopDaemonTests, InitScriptTests, GoaccessTests, SystemdUnitTests,
    UpgradeUnderServiceManagerTests)  # noqa: F401
from tests_balancer import (
    NodeValidatorTests, NodeValidatorServerTests, ProxyHeaderParserTests, TrustedProxyWalkTests,
    ProxyProtocolServerTests, ProxyProtocolTLSTests, TrustedProxyServerTests, HealthAndGraceTests,
    BalancerOptionTests)  # noqa: F401
from tests_access import (
    AuthPureTests, AuthTerminalTests, ShareTokenTests, GuessTableTests, GuessTableForkTests,
    AccessAdmitTests, AuthServerTests,
    PlainAuthStartTests, BruteForceTests, ShareLinkTests, ShareKeyRevocationTests, Fail2banTests)  # noqa: F401
from tests_architecture import ComplexityCounterTests, IssueTwentyTargetTests  # noqa: F401
from tests_runner import RunnerBalanceTests, RunnerPartTests, RunnerSpawnWatchTests  # noqa: F401
from tests_location import (
    LocationPatchTests, LocationToolTests, LocationServerTests, KeepLocationServerTests,
    VideoLocationPatchTests, VideoLocationToolTests, VideoLocationServerTests,
    KeepVideoLocationServerTests, ZipLocationSourceTests, VideoZipServerTests, TiffXmpLocationPatchTests,
    TiffXmpLocationToolTests, TiffXmpLocationServerTests, HeifXmpLocationPatchTests,
    HeifXmpLocationToolTests)  # noqa: F401
from tests_performance import TLSTicketTests, RequestPathSyscallTests  # noqa: F401
from tests_probe import (
    ClientTurnTests, CostlyPageTests, ThumbnailerPriorityTests, GuessBlockTests, CrowdingClientTests,
    CrowdingOutOfDescriptorsTests)  # noqa: F401
from tests_auth_probe import AuthOffLoopTests, AuthOffLoopServerTests  # noqa: F401

if __name__ == '__main__':
    sys.exit(testrun.main(globals()))
