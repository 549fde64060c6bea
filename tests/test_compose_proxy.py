"""The proxy that docker-compose.yml puts in front of its two replicas, run for real: Debian's nginx with
deploy/nginx.conf as the compose file mounts it, only its addresses changed (two local replicas for
`app:8000`, a free local port for `:80`), in front of two servers on one PostgreSQL database. No Docker
engine runs here; test_shipping.py reads the compose file's wiring, and this runs what it wires."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2

from tests.conftest import answers_health, require_tool, script, start_on_free_port, stream_run, wait_until
from tests.test_fleet import FINISH, HANG, NO_DEATH_TIMEOUT_S, Follower, _ask, _runs, replicas
from tests.test_runs import start_detached

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "deploy" / "nginx.conf"


def _site(port: int, upstreams: list[int]) -> str:
    """deploy/nginx.conf with its addresses made local; every other line as shipped."""
    conf = CONF.read_text()
    servers = "".join(f"server 127.0.0.1:{upstream};\n    " for upstream in upstreams)
    conf, replaced = re.subn(r"server\s+app:8000;\n\s*", servers, conf)
    assert replaced == 1, "deploy/nginx.conf no longer names its upstream `app:8000`"
    conf, replaced = re.subn(r"listen\s+80;", f"listen 127.0.0.1:{port};", conf)
    assert replaced == 1, "deploy/nginx.conf no longer listens on port 80"
    return conf


@contextmanager
def proxy(tmp_path: Path, upstreams: list[int]) -> Iterator[str]:
    """nginx in the foreground with the shipped site in front of `upstreams`; its base URL."""
    nginx = require_tool("nginx", "to run the compose file's proxy")
    home = tmp_path / "nginx"
    home.mkdir()
    temp = "\n".join(
        f"    {kind}_temp_path {home / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )

    def start(port: int) -> subprocess.Popen[bytes]:
        (home / "site.conf").write_text(_site(port, upstreams))
        (home / "nginx.conf").write_text(
            # as root, nginx's workers would be `nobody`, who cannot enter the test's private directory
            ("user root;\n" if os.geteuid() == 0 else "")
            + f"daemon off;\nworker_processes 1;\npid {home / 'nginx.pid'};\nerror_log {home / 'error.log'} warn;\n"
            + f"events {{ worker_connections 256; }}\nhttp {{\n    access_log off;\n{temp}\n"
            + f"    include {home / 'site.conf'};\n}}\n"
        )
        command = [nginx, "-p", str(home), "-e", str(home / "error.log"), "-c", str(home / "nginx.conf")]
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    process, port = start_on_free_port(start, lambda port: answers_health(f"http://127.0.0.1:{port}"))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(30)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_through_the_compose_files_proxy_runs_stream_live_and_are_followed_cancelled_and_continued(
    pg_url: str, tmp_path: Path
) -> None:
    """Through the proxy, which sends each request to one replica or the other in turn: a run's events reach
    its client while the run goes on (it hangs in its second cell: a buffering proxy would hold them), it is
    followed and cancelled, an input larger than nginx's default 1 MB body limit is taken, a session's
    follow-up is served, and the history is the same whichever replica lists it. Mutant of deploy/nginx.conf
    seen failing: no `client_max_body_size` (413). `proxy_buffering on` passes as well: the service's streams
    say `X-Accel-Buffering: no`, which nginx obeys; the conf's `off` covers proxies that do not."""
    summed = script({"code": [FINISH.format(expr="sum(int(line) for line in context.splitlines())")]})
    lines = "\n".join(str(number) for number in range(400_000))  # 2.7 MB
    with (
        replicas(tmp_path, pg_url, timeout_s=NO_DEATH_TIMEOUT_S) as servers,
        proxy(tmp_path, [_port(server.url) for server in servers]) as url,
    ):
        live = start_detached(url, HANG, until=lambda event: event.event == "code" and event.data["iteration"] == 2)
        run_id = live[0].data["run_id"]
        follower = Follower(url, run_id, after=live[-1].data["seq"])
        cancelled = httpx2.post(f"{url}/api/runs/{run_id}/cancel", timeout=30)
        rest = follower.result()
        uploaded, large = stream_run(url, data={"prompt": summed}, files={"file": ("numbers.txt", lines.encode())})
        kept = script({"code": ["n = len(context)\n" + FINISH.format(expr="n")]})
        started = _ask(url, kept, input_data="abc", settings={"session": True})
        session_id = started[0].data["session_id"]
        # one of the two is served by the replica that does not keep the session
        follow_ups = [_ask(url, script({"code": [FINISH.format(expr="n * 2")]}), session_id=session_id) for _ in "ab"]
        listed: list[list[dict[str, Any]]] = []

        def listed_alike() -> bool:  # by both replicas in turn: a run's end is stored just after it is streamed
            listed[:] = [_runs(url) for _ in range(2)]
            return listed[0] == listed[1] and all(run["status"] != "running" for run in listed[0])

        assert wait_until(listed_alike, timeout=15), listed
    assert [event.event for event in live][:2] == ["start", "code"] and live[-1].event == "code"
    assert cancelled.status_code == 202
    assert rest[-1].event == "error" and rest[-1].data["code"] == "cancelled", rest
    assert uploaded.status_code == 200, uploaded.text
    assert large[-1].event == "final" and large[-1].data["answer"] == str(sum(range(400_000)))
    assert started[-1].data["answer"] == "3"
    assert [events[-1].data["answer"] for events in follow_ups] == ["6", "6"]
    assert listed[0] == listed[1] and len(listed[0]) == 5
    assert listed[0][-1]["id"] == run_id and listed[0][-1]["status"] == "cancelled"
