"""`asyncllm serve` as a real process: flags, keys from flags and the environment, Ctrl-C."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from asyncllm.cli import build_parser, engine_args_from, settings_from
from asyncllm.config import EngineArgs
from tests.gateway_helpers import WS, wait_healthy


def test_every_engine_arg_is_a_flag():
    names = [f.name for f in dataclasses.fields(EngineArgs) if f.name != "model"]
    argv = ["serve", "m"]
    ns = build_parser().parse_args(argv)
    assert engine_args_from(ns) == EngineArgs(model="m")  # unset flags keep the defaults
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for n in names:
        assert "--" + n.replace("_", "-") in help_text, n
    ns = build_parser().parse_args(
        [
            "serve",
            "--block-size",
            "8",
            "--no-enable-prefix-caching",
            "--gpu-memory-utilization",
            "0.5",
        ]
    )
    ea = engine_args_from(ns)
    assert ea.model is None and ea.block_size == 8 and ea.enable_prefix_caching is False
    assert ea.gpu_memory_utilization == 0.5


def test_gateway_flags(monkeypatch):
    monkeypatch.setenv("ASYNCLLM_API_KEYS", "e1, e2")
    ns = build_parser().parse_args(
        ["serve", "--api-key", "c1", "--allowed-origin", "https://x.example", "--resume-ttl", "2.5"]
        + ["--max-queue", "7", "--no-ui"]
    )
    s = settings_from(ns)
    assert s.api_keys == ("c1", "e1", "e2") and s.allowed_origins == ("https://x.example",)
    assert s.resume_ttl == 2.5 and s.max_queue == 7 and s.ui is False
    assert s.freeze_gc is True  # the server owns its process (embedding apps default to off)


def test_bench_forwards_its_arguments_and_help_lists_every_benchmark(capsys, monkeypatch):
    from asyncllm import cli
    from asyncllm.bench import __main__ as bench

    got = []
    monkeypatch.setattr(bench, "main", lambda argv: got.append(argv) or 0)
    assert cli.main(["bench", "--whatever", "x"]) == 0
    assert got == [["--whatever", "x"]]
    monkeypatch.undo()
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("throughput", "latency", "cpu", "serving"):
        assert name in out, out
    assert "asyncllm bench serving --help" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_process_and_ctrl_c(tiny_model_dir):
    port = _free_port()
    env = {**os.environ, "ASYNCLLM_API_KEYS": "envkey"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncllm.cli", "serve", tiny_model_dir, "--port", str(port)]
        + ["--api-key", "clikey", "--num-kv-blocks", "32", "--max-model-len", "128"]
        + ["--log-level", "info"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base, 60, poll=0.1)
        assert httpx.get(base + "/v1/models").status_code == 401
        for key in ("clikey", "envkey"):
            r = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200
        ws = WS(f"ws://127.0.0.1:{port}/v1/ws?api_key=clikey")
        ws.send({"type": "complete", "id": 1, "prompt": "Hello", "params": {"max_tokens": 4}})
        ws.until_done([1])
        assert ws.done(1)["usage"]["completion_tokens"] >= 1
        # Ctrl-C in the middle of streams (more than the KV cache holds at once: some wait)
        long = {"max_tokens": 100, "ignore_eos": True}
        for i in range(2, 10):
            ws.send({"type": "complete", "id": i, "prompt": f"Story {i}", "params": long})
        ws.until(lambda f: f["type"] == "delta" and f["id"] >= 2)
    finally:
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    assert "nanobind" not in err, err  # nothing leaked at exit (triton's extension is quiet)
    assert "engine shut down" in err  # the lifespan ran to its end
    assert elapsed < 10, elapsed  # --shutdown-timeout's default, not a stall
    # every stream ended with its done, those cut short after a shutting_down error; then 1001
    try:
        while True:
            ws.recv(timeout=10)
    except ConnectionClosed as e:
        assert e.rcvd is not None and e.rcvd.code == 1001, e
    cut = 0
    for i in range(2, 10):
        done = ws.done(i)
        if done["finish_reason"] == "error":
            assert [f["code"] for f in ws.of(i, "error")] == ["shutting_down"], ws.of(i)
            cut += 1
        else:
            assert done["finish_reason"] == "length" and not ws.of(i, "error"), ws.of(i)
    assert cut >= 1  # the signal came while streams were running


def test_chat_process(tiny_model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "asyncllm.cli", "chat", tiny_model_dir, "--max-tokens", "4"]
        + ["--temperature", "0", "--num-kv-blocks", "32", "--max-model-len", "128"],
        input="hello\n/reset\nhello again\n",  # then end of input: a clean exit
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("> ") == 4 and "Traceback" not in proc.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "asyncllm.cli", "chat", "/no/such/model"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_bench_is_found_from_any_working_directory(tmp_path):
    """`asyncllm bench` runs asyncllm.bench, part of the package: found from any directory."""
    code = (
        "import sys; from asyncllm.cli import main; sys.exit(main(['bench', 'serving', '--help']))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "asyncllm bench serving" in r.stdout and "--url" in r.stdout


def test_bench_serving_measures_a_running_server(tmp_path):
    """`asyncllm bench serving --url`: the load generator alone, against a server already up."""
    import json

    from asyncllm import cli
    from asyncllm.gateway import GatewaySettings
    from tests.gateway_helpers import FakeEngine, run_server

    out = tmp_path / "remote.json"
    with run_server(FakeEngine(step_s=0.001), GatewaySettings(api_keys=("bench-key",))) as srv:
        rc = cli.main(
            ["bench", "serving", "--url", srv.http, "--api-key", "bench-key"]
            + ["--num-requests", "6", "--concurrency", "3", "--output-len", "5"]
            + ["--prompt-words", "4", "--warmup", "1", "--no-plot", "--out", str(out)]
        )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["server"] == srv.http and res["model"] == "fake-model"
    assert "load generator only" in res["hardware_scope"]
    assert {r["mode"] for r in res["runs"]} == {"ws", "http"}  # no engine baseline remotely
    for r in res["runs"]:
        assert (r["completed"], r["errors"], r["output_tokens"]) == (6, 0, 30), r


def test_serve_warns_when_no_api_key_is_configured(tiny_model_dir, monkeypatch, caplog):
    import logging

    import uvicorn

    from asyncllm import cli

    ran = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **kw: ran.append(self))
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)  # leave pytest's logging alone
    monkeypatch.delenv("ASYNCLLM_API_KEYS", raising=False)
    with caplog.at_level(logging.WARNING, logger="asyncllm"):
        cli.main(["serve", tiny_model_dir, "--port", "1"])
    assert len(ran) == 1
    assert "no API key configured" in caplog.text and "anyone who can reach" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="asyncllm"):
        cli.main(["serve", tiny_model_dir, "--port", "1", "--api-key", "k"])
    assert len(ran) == 2 and "no API key" not in caplog.text
    monkeypatch.setenv("ASYNCLLM_API_KEYS", "from-env")
    with caplog.at_level(logging.WARNING, logger="asyncllm"):
        cli.main(["serve", tiny_model_dir, "--port", "1"])
    assert len(ran) == 3 and "no API key" not in caplog.text


def test_serve_puts_the_engine_in_its_own_process_on_a_gpu(monkeypatch):
    import torch

    from asyncllm.cli import serve_engine_args

    def args(*flags):
        return serve_engine_args(build_parser().parse_args(["serve", *flags]))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert args().engine_process is False  # CPU: the thread
    assert args("--engine-process").engine_process is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert args().engine_process is True  # a GPU: the process
    assert args("--no-engine-process").engine_process is False  # what the user said wins
    assert args("--device", "cpu").engine_process is False
    assert engine_args_from(build_parser().parse_args(["serve"])).engine_process is False


def _serve_fails(*args: str) -> str:
    """`asyncllm serve ARGS` must stop with exit code 2 and one line on stderr, no traceback."""
    r = subprocess.run(
        [sys.executable, "-m", "asyncllm.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("asyncllm serve: "), r.stderr
    return lines[0]


def test_a_busy_port_is_found_before_the_model_loads(tiny_model_dir, monkeypatch):
    from asyncllm import cli

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = _serve_fails(tiny_model_dir, "--port", str(port))
        assert f"127.0.0.1:{port}" in line and "in use" in line, line
        # in-process: it fails before anything of the engine is built
        built = []
        monkeypatch.setattr(cli, "_check_engine_args", lambda args: built.append(args))
        assert cli.main(["serve", tiny_model_dir, "--port", str(port)]) == 2
        assert built == []


def test_device_cuda_without_cuda_is_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    line = _serve_fails("--device", "cuda", "--port", str(_free_port()))
    assert "CUDA is not available" in line and "--device cpu" in line, line


def test_max_model_len_over_the_models_is_one_line(tiny_model_dir):
    line = _serve_fails(tiny_model_dir, "--max-model-len", "1000000", "--port", str(_free_port()))
    assert "max_model_len 1000000" in line and "max_position_embeddings" in line, line


UNITS = ("seconds", "bytes", "tokens", "a count", "fraction", "port", "blocks", "seed")


def test_every_serve_flag_says_what_it_is_its_default_and_unit():
    parser = build_parser()
    serve = next(
        a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "serve"
    )[1]
    for action in serve._actions:
        if action.dest == "help":
            continue
        flag = action.option_strings[-1] if action.option_strings else action.dest
        text = serve.formatter_class(prog="x")._get_help_string(action) or ""
        assert len(text) > 20, (flag, text)  # a description
        assert "default" in text, (flag, text)
        if action.type in (int, float):
            assert any(u in text for u in UNITS), (flag, text)
    helptext = serve.format_help()
    assert "--shutdown-timeout SECONDS" in helptext and "--metrics-public" in helptext
