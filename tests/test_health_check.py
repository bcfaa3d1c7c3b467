"""`loadagg health` (the image's HEALTHCHECK) against a real aggregator: serving, stopped, draining, gone."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from conftest import ROOT, free_port

from loadagg.cli.health_check import check_health


def _health(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LOADAGG_")}
    return subprocess.run([sys.executable, "-m", "loadagg", "health", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**environ, **(env or {})})


def _wait_serving(port: int, timeout: float = 30.0) -> subprocess.CompletedProcess:
    deadline = time.monotonic() + timeout
    while True:
        result = _health("--target", f"127.0.0.1:{port}")
        if result.returncode == 0 or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


def test_health_command_follows_a_real_aggregator_process(processes):
    port = free_port()
    server = processes.start("loadagg", "serve", "--host", "127.0.0.1", "--port", str(port), "--dp-size", "2")
    target = f"127.0.0.1:{port}"

    ok = _wait_serving(port)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"loadagg health: SERVING: the server at {target}"

    # The default target is this host's LOADAGG_PORT: what the image's HEALTHCHECK relies on.
    by_env = _health(env={"LOADAGG_PORT": str(port)})
    assert by_env.returncode == 0 and "SERVING" in by_env.stdout

    named = _health("--target", target, "--service", "loadagg.v1.LoadAggregator")
    assert named.returncode == 0 and "service 'loadagg.v1.LoadAggregator'" in named.stdout

    unknown = _health("--target", target, "--service", "no.such.Service")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr and "--service" in unknown.stderr

    # A stopped (SIGSTOP) aggregator accepts the connection but never answers: the deadline says so.
    server.send_signal(signal.SIGSTOP)
    try:
        hung = _health("--target", target, "--timeout", "1")
        assert hung.returncode == 1 and "DEADLINE_EXCEEDED" in hung.stderr, hung.stderr
    finally:
        server.send_signal(signal.SIGCONT)
    assert _wait_serving(port).returncode == 0

    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=15) == 0
    gone = _health("--target", target)
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr and target in gone.stderr


async def test_draining_aggregator_reports_not_serving(start_aggregator):
    aggregator = await start_aggregator(dp_size=1)
    target = f"127.0.0.1:{aggregator.port}"
    assert (await asyncio.to_thread(check_health, target)).serving
    await aggregator.health.enter_graceful_shutdown()  # what SIGTERM does first
    result = await asyncio.to_thread(check_health, target)
    assert not result.serving and result.message.startswith("NOT_SERVING")


def test_health_check_inside_a_mutual_tls_aggregators_container(processes, tmp_path):
    """The image's HEALTHCHECK runs where LOADAGG_TLS_CERT/KEY are the server's own: `loadagg health` must not
    present them as its client certificate (a server certificate is refused as a client's)."""
    from certs import make_pki

    pki = make_pki(tmp_path)
    port = free_port()
    container_env = {  # what the aggregator's container would carry
        "LOADAGG_TLS_CERT": pki.server.cert, "LOADAGG_TLS_KEY": pki.server.key, "LOADAGG_TLS_CLIENT_CA": pki.ca,
        "LOADAGG_TLS_CA": pki.ca,  # (the test certificate names 127.0.0.1: no LOADAGG_TLS_SERVER_NAME)
        "LOADAGG_CLIENT_TLS_CERT": pki.client.cert, "LOADAGG_CLIENT_TLS_KEY": pki.client.key,
        "LOADAGG_PORT": str(port),
    }
    processes.start("loadagg", "serve", "--host", "127.0.0.1", "--dp-size", "1", env=container_env)
    deadline = time.monotonic() + 30
    while (result := _health(env=container_env)).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert result.returncode == 0 and "SERVING" in result.stdout, result.stderr
    without_client_cert = {k: v for k, v in container_env.items() if not k.startswith("LOADAGG_CLIENT_")}
    refused = _health(env=without_client_cert)  # mutual TLS: no client certificate, no answer
    assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr


def test_the_default_target_is_where_serve_binds(monkeypatch):
    from loadagg.cli.health_check import default_target

    for name in ("LOADAGG_TARGET", "LOADAGG_HOST", "LOADAGG_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert default_target() == "127.0.0.1:50051"
    monkeypatch.setenv("LOADAGG_PORT", "6000")
    for host, target in (("0.0.0.0", "127.0.0.1:6000"), ("::", "127.0.0.1:6000"), ("10.1.2.3", "10.1.2.3:6000"),
                         ("fd00::5", "[fd00::5]:6000")):
        monkeypatch.setenv("LOADAGG_HOST", host)
        assert default_target() == target, host
    monkeypatch.setenv("LOADAGG_TARGET", "agg:7000")
    assert default_target() == "agg:7000"
