"""Resume across replicas behind a real proxy: two `asyncllm serve` processes (the tiny model, on
the CPU) behind nginx on loopback, configured by the very file the deploy kit ships
(ops/deploy/nginx/asyncllm.conf, rendered with this test's ports and a temporary prefix).

- Clients that reconnect mid-stream from other source addresses (127.0.0.2, 127.0.0.3, ...)
  reach the replica holding their session, because nginx hashes on the session key and the
  first connection already carried it (a proposed key): every chat's text is exact, every seq
  arrives once.
- asyncllm.client does it by default (it proposes its key, in the X-Asyncllm-Session header),
  through two connection cuts.
- nginx hashes on the key in any of its carriers: the header (asyncllm.client), the WebSocket
  subprotocol (the chat page: a browser cannot set headers) and `?session=` (older clients).
- A replica dying: its streams' sockets close; a reconnect reaches the live replica, which says
  the session is new (`resumed: false`), and resuming there is a clear `not_found`; new chats
  and HTTP requests go to the live replica.

Skipped when nginx is not installed (ops/ci/install_test_tools.sh installs it). Every wait is
bounded; everything listens on loopback.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest

from tests.fault_proxy import FaultProxy
from tests.gateway_helpers import WS

ROOT = Path(__file__).resolve().parent.parent
SITE_CONF = ROOT / "ops" / "deploy" / "nginx" / "asyncllm.conf"


def _nginx() -> str | None:
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


NGINX = _nginx()
pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx not installed (run ops/ci/install_test_tools.sh)"
)

PARAMS = {"max_tokens": 160, "temperature": 0, "ignore_eos": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def render_site(port: int, upstreams: list[int], access_log: Path) -> str:
    """The shipped site config with our listen port, replicas and log path."""
    site = SITE_CONF.read_text()
    lines = re.findall(r"^\s*server \d+\.\d+\.\d+\.\d+:\d+ (.*);$", site, flags=re.M)
    assert len(lines) == 2, "the shipped upstream lists two example replicas"
    site = re.sub(r"^\s*server \d+\.\d+\.\d+\.\d+:\d+ .*;\n", "", site, flags=re.M)
    servers = "".join(f"    server 127.0.0.1:{p} {lines[0]};\n" for p in upstreams)
    site = site.replace("    keepalive 32;", servers + "    keepalive 32;")
    assert "listen 80;" in site and "access_log /var/log/nginx/" in site
    site = site.replace("listen 80;", f"listen 127.0.0.1:{port};")
    return re.sub(r"access_log /var/log/nginx/\S+", f"access_log {access_log}", site)


def render_main(prefix: Path, site: Path) -> str:
    tmp = prefix / "tmp"
    temps = "\n".join(
        f"    {kind}_temp_path {tmp / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"daemon off;\nworker_processes 1;\npid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} info;\n"
        "events { worker_connections 512; }\n"
        f"http {{\n{temps}\n    include {site};\n}}\n"
    )


@dataclass
class Cluster:
    replicas: list[subprocess.Popen]
    ports: list[int]
    nginx: subprocess.Popen
    port: int
    access_log: Path

    def url(self, query: str = "") -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws" + (f"?{query}" if query else "")

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def upstream_port(self, ws: WS) -> int:
        return int(ws.conn.response.headers["X-Asyncllm-Upstream"].rsplit(":", 1)[1])


def _start_replica(model_dir: str, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "asyncllm.cli", "serve", model_dir, "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--device", "cpu", "--num-kv-blocks", "256"]
    cmd += ["--max-model-len", "256", "--no-ui", "--log-level", "warning", "--resume-ttl", "60"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)


def _healthy(base: str) -> bool:
    try:
        return httpx.get(base + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory) -> Iterator[Cluster]:
    """Two replicas and nginx. The last test of this module kills a replica."""
    prefix = tmp_path_factory.mktemp("nginx")
    (prefix / "tmp").mkdir()
    ports = [_free_port(), _free_port()]
    replicas = [_start_replica(tiny_model_dir, p, prefix / f"replica{p}.log") for p in ports]
    nginx = None
    try:
        for proc, p in zip(replicas, ports, strict=True):
            _wait(
                lambda proc=proc, p=p: (
                    proc.poll() is None
                    and _healthy(f"http://127.0.0.1:{p}")
                    or proc.poll() is not None
                ),
                120,
                "a replica to come up",
            )
            assert proc.poll() is None, (prefix / f"replica{p}.log").read_text()
        port = _free_port()
        site = prefix / "asyncllm.conf"
        site.write_text(render_site(port, ports, prefix / "access.log"))
        main = prefix / "nginx.conf"
        main.write_text(render_main(prefix, site))
        assert NGINX is not None
        nginx = subprocess.Popen(
            [NGINX, "-p", str(prefix), "-c", str(main), "-e", str(prefix / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait(
            lambda: nginx.poll() is not None or _healthy(f"http://127.0.0.1:{port}"),
            20,
            "nginx to listen",
        )
        assert nginx.poll() is None, nginx.stderr.read() if nginx.stderr else ""
        yield Cluster(replicas, ports, nginx, port, prefix / "access.log")
    finally:
        if nginx is not None and nginx.poll() is None:
            nginx.send_signal(signal.SIGQUIT)
            try:
                nginx.wait(10)
            except subprocess.TimeoutExpired:
                nginx.kill()
        for proc in replicas:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in replicas:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


class Addresses:
    """A new loopback source address for every connection: 127.0.0.2, 127.0.0.3, ..."""

    def __init__(self) -> None:
        self.n = 1

    def connect(self, cluster: Cluster, key: str, carrier: str = "query") -> WS:
        """Ask for session `key`, carried as asyncllm.client does (`header`), as the chat page
        does (`subprotocol`: browsers cannot set headers on a WebSocket) or in the URL."""
        self.n += 1
        src = f"127.0.{self.n // 250}.{2 + self.n % 250}"
        sock = socket.create_connection(("127.0.0.1", cluster.port), 10, source_address=(src, 0))
        if carrier == "header":
            return WS(cluster.url(), sock=sock, additional_headers={"X-Asyncllm-Session": key})
        if carrier == "subprotocol":
            protocols = ["asyncllm.v1", f"asyncllm.session.{key}"]
            return WS(cluster.url(), sock=sock, subprotocols=protocols)
        assert carrier == "query", carrier
        return WS(cluster.url(f"session={key}"), sock=sock)


def _drop(ws: WS) -> None:
    """Cut the connection the hard way (no close handshake): what a network change does."""
    sock = ws.conn.socket
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _stream_frames(ws: WS, sid: str, upto_seq: int | None, timeout: float = 60) -> list[dict]:
    """This stream's frames as read, until one with seq >= upto_seq (None: its done)."""
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    while True:
        f = ws.recv(max(0.01, deadline - time.monotonic()))
        if f.get("id") != sid:
            continue
        out.append(f)
        if f["type"] == "done" or (upto_seq is not None and f.get("seq", 0) >= upto_seq):
            return out
        if f["type"] == "error":
            raise AssertionError(f"stream {sid} failed: {f}")


def _chat(sid: str, i: int) -> dict:
    return {
        "type": "chat",
        "id": sid,
        "messages": [{"role": "user", "content": f"Tell story number {i} about the sky."}],
        "params": PARAMS,
    }


def _expected(cluster: Cluster, n: int) -> list[str]:
    """Every chat undisturbed, on each replica directly: both must agree (same model, greedy)."""
    texts = []
    for p in cluster.ports:
        ws = WS(f"ws://127.0.0.1:{p}/v1/ws")
        for i in range(n):
            ws.send(_chat(f"c{i}", i))
        ws.until_done([f"c{i}" for i in range(n)], timeout=120)
        texts.append([ws.text(f"c{i}") for i in range(n)])
        assert all(ws.done(f"c{i}")["usage"]["completion_tokens"] == 160 for i in range(n))
        ws.close()
    assert texts[0] == texts[1]
    return texts[0]


def test_reconnects_from_other_addresses_resume_exactly(cluster):
    n = 16
    expected = _expected(cluster, n)
    addrs = Addresses()
    keys = [secrets.token_urlsafe(24) for _ in range(n)]
    frames: dict[int, list[dict]] = {i: [] for i in range(n)}
    upstreams: dict[int, set[int]] = {i: set() for i in range(n)}
    cut_mid_stream = [False] * n
    socks = {}
    for i, key in enumerate(keys):
        ws = addrs.connect(cluster, key)
        # the proposed key is adopted: the replica it hashes to is the one that holds it
        assert ws.session["session"] == key and ws.session["resumed"] is False
        upstreams[i].add(cluster.upstream_port(ws))
        ws.send(_chat(f"s{i}", i))
        socks[i] = ws
    for rounds in range(2):  # two cuts per chat, each mid-stream, each from a new address
        for i in range(n):
            got = _stream_frames(socks[i], f"s{i}", (rounds + 1) * 3)
            frames[i] += got
            if rounds == 0:  # the cut comes while the stream still has output to deliver
                cut_mid_stream[i] = got[-1]["type"] != "done"
            _drop(socks[i])
        for i in range(n):
            ws = addrs.connect(cluster, keys[i])
            assert ws.session["session"] == keys[i] and ws.session["resumed"] is True, i
            upstreams[i].add(cluster.upstream_port(ws))
            last = frames[i][-1]["seq"]
            ws.send({"type": "resume", "id": f"s{i}", "after": last})
            socks[i] = ws
    for i in range(n):
        frames[i] += _stream_frames(socks[i], f"s{i}", None)
        socks[i].close()
    for i in range(n):
        seqs = [f["seq"] for f in frames[i]]
        assert seqs == list(range(1, len(seqs) + 1)), (i, seqs)  # nothing lost, nothing twice
        assert frames[i][-1]["type"] == "done" and frames[i][-1]["finish_reason"] == "length"
        text = "".join(f["text"] for f in frames[i] if f["type"] == "delta")
        assert text == expected[i], i
        assert len(upstreams[i]) == 1, (i, upstreams[i])  # one replica for the whole session
    # the sessions were spread over both replicas (16 random keys: all on one is 2 in 65536)
    assert {p for u in upstreams.values() for p in u} == set(cluster.ports)
    assert all(cut_mid_stream)
    assert addrs.n >= 3 * n


@pytest.mark.anyio
async def test_client_proposes_its_key_and_resumes_through_nginx(cluster, anyio_backend):
    from asyncllm.client import Client

    expected = _expected(cluster, 1)[0]
    msgs = [{"role": "user", "content": "Tell story number 0 about the sky."}]
    with FaultProxy(cluster.port) as proxy:
        async with Client(proxy.url(), backoff_initial=0.01, backoff_max=0.05) as client:
            stream = client.chat(msgs, **PARAMS)
            got, dropped = [], 0
            async for d in stream:
                got.append(d.text)
                if len(got) in (3, 12):
                    # Deltas read before a cut are still delivered after it, so delta 12 can
                    # come while the client is still reconnecting from the first cut: a drop
                    # then has no connection to cut (and the client no reason to reconnect
                    # again). Cut only once the reconnect from the previous cut is up.
                    with anyio.fail_after(20):
                        while client.reconnects < dropped or not client.connected:
                            await anyio.sleep(0.01)
                    key = client.session
                    proxy.drop_all()
                    dropped += 1
            # the stream may finish from frames sent before the second drop was seen: wait
            # (bounded) for the client to have reconnected after both
            with anyio.fail_after(20):
                while client.reconnects < 2:
                    await anyio.sleep(0.02)
            # each drop cut a live connection; three connections, all to the replica the key
            # (in the X-Asyncllm-Session header) hashes to: else a reconnect finds no session
            assert proxy.cuts == 2 and proxy.connections == 3
            assert dropped == 2 and client.reconnects == 2 and client.sessions_lost == 0
            assert client.session == key
            assert "".join(got) == expected


@pytest.mark.parametrize("carrier", ["header", "subprotocol", "query"])
def test_every_carrier_of_the_key_routes_to_one_replica(cluster, carrier):
    """nginx hashes on the key wherever the client carries it: the header (asyncllm.client), the
    subprotocol (the chat page), the query (older clients). A proposed key is adopted and every
    reconnect from another address reaches the replica holding it (`resumed: true`) (16 keys: if nginx ignored the
    carrier, each connection would land at random, all 48 as here: 4^-16)."""
    addrs = Addresses()
    keys = [secrets.token_urlsafe(24) for _ in range(16)]
    where: dict[str, set[int]] = {k: set() for k in keys}
    for attempt in range(3):
        for key in keys:
            ws = addrs.connect(cluster, key, carrier)
            assert ws.session["session"] == key
            assert ws.session["resumed"] is (attempt > 0)
            if carrier == "subprotocol":
                assert ws.conn.subprotocol == "asyncllm.v1"
            if attempt == 0:  # a session without streams is not kept once its socket closes
                ws.send({**_chat("k", 0), "params": {"max_tokens": 2, "temperature": 0}})
                ws.until_done(["k"], timeout=60)
            where[key].add(cluster.upstream_port(ws))
            ws.close()
    assert all(len(ports) == 1 for ports in where.values()), where
    assert {p for ports in where.values() for p in ports} == set(cluster.ports)


def test_requests_without_a_key_are_spread(cluster):
    """HTTP requests (and old clients' first connections) carry no session key: they route by
    their random request id, spread over both replicas (24 requests all on one: 2 in 2^24)."""
    ports = set()
    for _ in range(24):
        r = httpx.get(cluster.http + "/health", timeout=10)
        assert r.status_code == 200
        ports.add(int(r.headers["x-asyncllm-upstream"].rsplit(":", 1)[1]))
    assert ports == set(cluster.ports)


def test_replica_death_ends_its_streams_clearly_and_new_chats_go_to_the_live_one(cluster):
    # (Last in this module: it kills a replica of the shared cluster.)
    n = 8
    expected = _expected(cluster, n)
    addrs = Addresses()
    keys = [secrets.token_urlsafe(24) for _ in range(n)]
    socks, where, frames = {}, {}, {}
    for i, key in enumerate(keys):
        ws = addrs.connect(cluster, key)
        where[i] = cluster.upstream_port(ws)
        ws.send(_chat(f"d{i}", i))
        socks[i] = ws
    for i in range(n):
        frames[i] = _stream_frames(socks[i], f"d{i}", 2)
    victim_port = where[0]  # the replica of chat 0 dies: at least one session on it
    live_port = next(p for p in cluster.ports if p != victim_port)
    victim = cluster.replicas[cluster.ports.index(victim_port)]
    victim.kill()
    victim.wait(10)
    from websockets.exceptions import ConnectionClosed

    for i in range(n):
        if where[i] == live_port:
            frames[i] += _stream_frames(socks[i], f"d{i}", None)
            text = "".join(f["text"] for f in frames[i] if f["type"] == "delta")
            assert text == expected[i]  # the other replica's streams go on, exact
        else:
            # nginx closes the client's socket when its replica's goes
            t0 = time.monotonic()
            with pytest.raises(ConnectionClosed):
                _stream_frames(socks[i], f"d{i}", None, timeout=20)
            assert time.monotonic() - t0 < 10
            ws = addrs.connect(cluster, keys[i])
            assert cluster.upstream_port(ws) == live_port
            # a new session under the same key: the old one is gone, and it says so
            assert ws.session["session"] == keys[i] and ws.session["resumed"] is False
            ws.send({"type": "resume", "id": f"d{i}", "after": frames[i][-1]["seq"]})
            err = ws.until(lambda f: f["type"] == "error")
            assert err["code"] == "not_found" and err["id"] == f"d{i}"
            socks[i] = ws
        socks[i].close()
    # new chats all go to the live replica and complete exactly
    for i in range(6):
        ws = addrs.connect(cluster, secrets.token_urlsafe(24))
        assert cluster.upstream_port(ws) == live_port
        ws.send(_chat(f"n{i}", i))
        ws.until_done([f"n{i}"], timeout=60)
        assert ws.text(f"n{i}") == expected[i]
        ws.close()
    # as do plain HTTP requests
    for _ in range(4):
        r = httpx.get(cluster.http + "/v1/models", timeout=10)
        assert r.status_code == 200
        assert r.headers["x-asyncllm-upstream"].endswith(f":{live_port}")
    assert "session=" not in cluster.access_log.read_text()  # no secrets in the proxy's log
