"""ServeConfig: flags win over DISCO_* variables, which win over the defaults; derived values."""
from __future__ import annotations

from dataclasses import fields

import pytest

from disco.service import config
from disco.service.config import _HELP, ServeConfig
from disco.service.server import child_argv


def test_flags_win_over_environment_over_defaults() -> None:
    assert ServeConfig.from_args([], env={}).max_batch == 64
    assert ServeConfig.from_args([], env={"DISCO_MAX_BATCH": "16"}).max_batch == 16
    assert ServeConfig.from_args(["--max-batch", "8"], env={"DISCO_MAX_BATCH": "16"}).max_batch == 8
    assert ServeConfig.from_args([], env={"DISCO_REUSE_PORT": "yes"}).reuse_port is True


def test_every_field_is_documented() -> None:
    assert {f.name for f in fields(ServeConfig)} == set(_HELP)


def test_help_never_shows_the_token(capsys: pytest.CaptureFixture[str]) -> None:
    """DISCO_AUTH_TOKEN keeps the token out of `ps`; --help printed it as the flag's default."""
    for env, shown in (({"DISCO_AUTH_TOKEN": "topsecret123"}, "default set"), ({}, "default unset")):
        with pytest.raises(SystemExit):
            ServeConfig.from_args(["--help"], env=env)
        out = " ".join(capsys.readouterr().out.split())
        assert "topsecret123" not in out and f"(env DISCO_AUTH_TOKEN, {shown})" in out
        assert "(env DISCO_MAX_BATCH, default 64)" in out  # the others still show theirs
    assert "topsecret123" not in repr(ServeConfig(auth_token="topsecret123"))  # a logged config would show it


def test_a_bare_ipv6_host_is_bound_as_one(tmp_path) -> None:  # noqa: ANN001
    """gRPC reads "::1:0" as host "::0.1.0.0", port 443 (it bound nothing, or the wrong thing)."""
    from disco.service.server import host_port

    assert [host_port(h, 5) for h in ("::", "::1", "[::1]", "0.0.0.0", "localhost")] == [
        "[::]:5", "[::1]:5", "[::1]:5", "0.0.0.0:5", "localhost:5"]


def test_workers_default_to_the_cores_of_the_affinity_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert ServeConfig.from_args([], env={}).worker_threads() == 3
    assert ServeConfig.from_args(["--workers", "2"], env={}).worker_threads() == 2
    assert ServeConfig.from_args([], env={"DISCO_WORKERS": "4"}).worker_threads() == 4


def test_processes_split_the_threads_and_their_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    argv = ["--processes", "2", "--workers", "6", "--metrics-port", "9000"]
    child = ServeConfig.from_args(child_argv(ServeConfig.from_args(argv, env={}), argv, 1), env={})
    assert (child.processes, child.reuse_port, child.workers, child.metrics_port) == (1, True, 3, 9001)
    assert child.port_processes == 2  # what ListModels tells clients
    auto = ServeConfig.from_args(child_argv(ServeConfig.from_args(["--processes", "2"], env={}), [], 0), env={})
    assert (auto.workers, auto.intra_op_threads) == (2, 1)  # 4 cores, 2 processes


def test_bad_values_are_refused_with_the_value(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in ((["--io-binding", "maybe"], "--io-binding 'maybe': expected auto, on or off"),
                          (["--workers", "-1"], "--workers -1: expected 0"),
                          (["--tls-cert", "a.pem"], "--tls-cert and --tls-key go together"),
                          (["--max-images-per-request", "2000000"], "--max-images-per-request 2000000: expected 1..1048576"),
                          (["--gather-turns", "-1"], "--gather-turns -1: expected an integer from 0 to 1024"),
                          (["--max-batch", "0"], "--max-batch 0: expected an integer from 1 to 1024"),
                          (["--batch-workers", "0"], "--batch-workers 0: expected an integer from 1 to 64"),
                          (["--max-queue", "0"], "--max-queue 0: expected an integer from 1 to 1048576"),
                          (["--max-delay-ms", "1e5"], "--max-delay-ms 100000.0: expected a number from 0 to 1000"),
                          (["--grace-s", "nan"], "--grace-s nan: expected 0 to"),
                          (["--keepalive-s", "1e300"], "--keepalive-s 1e+300: expected 0.001 to"),
                          (["--reload-interval-s", "-1"], "--reload-interval-s -1.0: expected 0 to 86400 seconds"),
                          (["--port", "70000"], "--port 70000: expected 0 to 65535"),
                          (["--metrics-port", "-1"], "--metrics-port -1: expected 0 to 65535"),
                          (["--health-port", "70000"], "--health-port 70000: expected 0 to 65535"),
                          (["--port", "5000", "--health-port", "5000"], "--health-port 5000 is also the --port"),
                          (["--metrics-port", "9000", "--processes", "2", "--port", "5000", "--health-port", "9001"],
                           "--health-port 9001 is also the metrics port"),
                          (["--metrics-port", "65535", "--processes", "2"], "the last process's port 65536 is past 65535"),
                          (["--processes", "0"], "--processes 0: expected 1 to 1024"),
                          (["--processes", "100000", "--metrics-port", "0"], "--processes 100000: expected 1 to 1024"),
                          (["--processes", "2", "--port", "0"], "--port 0 with --processes 2: the processes share one port"),
                          (["--auth-token", "a", "--auth-token-file", "t"], "are both set: give one"),
                          (["--max-message-bytes", "0"], "--max-message-bytes 0: expected 1024 to"),
                          (["--port-processes", "0"], "--port-processes 0: expected 1 to 1024"),
                          (["--port-processes", "5000000000"], "--port-processes 5000000000: expected 1 to 1024"),
                          (["--inter-op-threads", "0"], "--inter-op-threads 0: expected 1 to 1024"),
                          (["--decode-cache-mb", "1e308"], "--decode-cache-mb 1e+308: expected 0 (off) to 1073741824 MiB"),
                          (["--watchdog-s", "1"], "--watchdog-s 1.0: expected 0 (off) or at least 2 s"),
                          (["--watchdog-s", "nan"], "--watchdog-s nan: expected 0 to 86400 seconds"),
                          (["--heartbeat-fd", "-2"], "--heartbeat-fd -2: expected -1 (none) or a file descriptor"),
                          (["--intra-op-threads", "-2"], "--intra-op-threads -2: expected 1 to 1024"),
                          (["--intra-op-threads", "100000000000"], "--intra-op-threads 100000000000: expected 1 to"),
                          (["--max-pending-rpcs", "2147483648"], "--max-pending-rpcs 2147483648: expected 0 (gRPC's default) to 2147"),
                          (["--reload-interval-s", "0.001"], "--reload-interval-s 0.001: expected 0 (only on SIGHUP) or at least 1 s"),
                          (["--providers", ","], "--providers ',': names no provider"),
                          (["--max-queue", "100"], "--max-queue 100 is below --max-images-per-request 4096"),
                          (["--grace-s", "1e10"], "expected 0 to 2147483.647 seconds"),
                          (["--parent-pid", "-1"], "--parent-pid -1: expected 0 (none) or a process id"),
                          (["--auth-token="], "--auth-token is empty, which would turn token auth off"),
                          # a review: these failed only once models loaded, as "address already in use"
                          (["--port", "9000", "--metrics-port", "9000"], "--port 9000 is also the --metrics-port: give"),
                          (["--port", "9001", "--metrics-port", "9000", "--processes", "2"],
                           "--port 9001 is also the metrics port of process 1 (--metrics-port 9000 + i)"),
                          (["--port", "9000", "--metrics-port", "9000", "--host", "127.0.0.1", "--metrics-host", "::"],
                           "--port 9000 is also the --metrics-port"),
                          # names may resolve to the other address, and one address has many spellings (a review)
                          (["--port", "9000", "--metrics-port", "9000", "--host", "localhost", "--metrics-host",
                            "127.0.0.1"], "--port 9000 is also the --metrics-port"),
                          (["--port", "9000", "--metrics-port", "9000", "--host", "0:0:0:0:0:0:0:0", "--metrics-host",
                            "127.0.0.1"], "--port 9000 is also the --metrics-port")):
        with pytest.raises(SystemExit):
            ServeConfig.from_args(argv, env={})
        assert message in capsys.readouterr().err
    for env, message in (({"DISCO_PORT": "abc"}, "DISCO_PORT='abc': expected an integer"),
                         ({"DISCO_MAX_BATCH": ""}, "DISCO_MAX_BATCH='': expected an integer"),
                         ({"DISCO_GRACE_S": "soon"}, "DISCO_GRACE_S='soon': expected a number"),
                         ({"DISCO_REUSE_PORT": "maybe"}, "DISCO_REUSE_PORT='maybe': expected one of"),
                         ({"DISCO_GRACE_S": "-1"}, "--grace-s -1.0: expected 0 to 2147483.647 seconds (--grace-s "
                                                   "from DISCO_GRACE_S='-1'; no flag given)"),
                         # a message naming two settings says where each came from
                         ({"DISCO_MAX_IMAGES_PER_REQUEST": "100000"}, "(--max-images-per-request from "
                                                                      "DISCO_MAX_IMAGES_PER_REQUEST='100000'; no flag given)"),
                         ({"DISCO_PROVIDERS": "tpu"}, "--providers: unknown ['tpu'], expected a comma-separated list "
                                                      "of cuda and cpu (--providers from DISCO_PROVIDERS='tpu'"),
                         # a Secret with no value: the server started with no auth (or plaintext), and said nothing
                         ({"DISCO_AUTH_TOKEN": ""}, "--auth-token is empty, which would turn token auth off"),
                         ({"DISCO_AUTH_TOKEN_FILE": ""}, "--auth-token-file is empty, which would turn token auth off"),
                         ({"DISCO_TLS_CERT": "", "DISCO_TLS_KEY": ""}, "--tls-cert is empty, which would turn TLS off"),
                         ({"DISCO_TLS_CLIENT_CA": ""}, "--tls-client-ca is empty, which would turn mutual TLS off")):
        with pytest.raises(SystemExit):  # an argparse error naming the variable, not a traceback
            ServeConfig.from_args([], env=env)
        assert message in capsys.readouterr().err
    # A secret's value is never shown; a flag is given whole (an abbreviation would hide where a value came from)
    with pytest.raises(SystemExit):
        ServeConfig.from_args(["--auth-token-file", "t"], env={"DISCO_AUTH_TOKEN": "prod-s3cr3t"})
    err = capsys.readouterr().err
    assert "are both set" in err and "(--auth-token from DISCO_AUTH_TOKEN; no flag given)" in err and "s3cr3t" not in err
    with pytest.raises(SystemExit):  # a value that looks like a flag is not taken for one
        ServeConfig.from_args(["--providers", "cpu,--workers"], env={"DISCO_WORKERS": "2"})
    assert "DISCO_WORKERS" not in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ServeConfig.from_args(["--grace", "-1"], env={"DISCO_GRACE_S": "5"})
    assert "unrecognized arguments: --grace" in capsys.readouterr().err
    # An empty token setting beside the other, which turns auth on, changes nothing: not refused
    assert ServeConfig.from_args(["--auth-token-file", "t"], env={"DISCO_AUTH_TOKEN": ""}).auth_token_file == "t"
    assert ServeConfig.from_args([], env={"DISCO_AUTH_TOKEN_FILE": "", "DISCO_AUTH_TOKEN": "s"}).auth_token == "s"
    # A flag given overrides a variable that does not parse; --help still answers.
    assert ServeConfig.from_args(["--port", "7"], env={"DISCO_PORT": "abc"}).port == 7
    assert ServeConfig.from_args(["--reuse-port"], env={"DISCO_REUSE_PORT": "maybe"}).reuse_port
    with pytest.raises(SystemExit) as help_:
        ServeConfig.from_args(["--help"], env={"DISCO_PORT": "abc"})
    assert help_.value.code == 0 and "'abc' from DISCO_PORT, which does not parse" in capsys.readouterr().out


def test_the_metrics_may_take_the_grpc_port_number_on_another_address() -> None:
    """Two listeners on one port number, on different addresses, bind (a review: refused as the same port)."""
    cfg = ServeConfig.from_args(["--port", "9000", "--metrics-port", "9000", "--host", "127.0.0.1",
                                 "--metrics-host", "127.0.0.2"], env={})
    assert (cfg.port, cfg.metrics_port) == (9000, 9000)
    from disco.service.config import may_share

    assert [may_share(*pair) for pair in (("127.0.0.1", "127.0.0.2"), ("[::1]", "127.0.0.1"), ("0.0.0.0", "::1"),
                                          ("::ffff:127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.5"),
                                          ("[::]", "127.0.0.1"), ("localhost", "::1"))] == [False] * 3 + [True] * 4


def test_a_misspelled_variable_is_named_not_ignored(caplog: pytest.LogCaptureFixture) -> None:
    """DISCO_GRACE=30 (for DISCO_GRACE_S) was ignored without a word; the client commands' variables are not the
    server's business."""
    cfg = ServeConfig.from_args([], env={"DISCO_GRACE": "30", "DISCO_TARGET": "x:1", "DISCO_TOKEN": "t",
                                         "DISCO_PORT": "7"})
    assert cfg.port == 7 and cfg.grace_s == ServeConfig.grace_s
    said = [r.getMessage() for r in caplog.records if "ignoring environment" in r.getMessage()]
    assert said == ["ignoring environment variable(s) DISCO_GRACE: no such setting (disco serve --help lists them)"]
