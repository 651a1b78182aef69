"""The live page: its server on real sockets, its bounds, and a real browser on a real `edgead run`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from edgead.runtime import web as web_module  # noqa: E402
from edgead.runtime.web import MAX_STREAMS, SCORE_RING, LiveWeb, parse_address  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from integration_helpers import make_gaussian_run  # noqa: E402

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def result(score: float, threshold: float = 1.0) -> SimpleNamespace:
    return SimpleNamespace(score=score, threshold=threshold, is_anomaly=score >= threshold,
                           anomaly_map=np.full((8, 8), score, np.float32))  # fmt: skip


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LiveWeb:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    page = LiveWeb("127.0.0.1", 0, evidence_dir=tmp_path)
    page.start()
    yield page
    page.stop("test over")


def test_addresses() -> None:
    assert parse_address("8080") == ("127.0.0.1", 8080)
    assert parse_address("0.0.0.0:9000") == ("0.0.0.0", 9000)
    assert parse_address("[::1]:80") == ("::1", 80)
    for bad in ("http", "70000", ":80", "host:"):
        with pytest.raises(ValueError, match=r"\[HOST:\]PORT"):
            parse_address(bad)


def test_endpoints_serve_what_the_loop_handed_over(served: LiveWeb, tmp_path: Path) -> None:
    frame = np.full((90, 160, 3), 100, np.uint8)
    (tmp_path / "a.png").write_bytes(b"png")
    served.set_info(source="camera0", backend="onnxruntime", precision="fp32")
    for i in range(5):
        alarm = {"frame": i, "saved": ["a.png"]} if i == 4 else None
        served.publish(frame, result(0.5 + i * 0.2), {"frames": i + 1, "fps": 30.0}, 12.0 + i, alarm)
    status = json.loads(get(served.url + "api/status")[1])
    assert status["frames"] == 5 and status["state"] == "running" and status["source"] == "camera0"
    assert status["latency_p50_ms"] == 14.0 and status["latency_p99_ms"] == pytest.approx(15.96)
    scores = json.loads(get(served.url + "api/scores?after=3")[1])
    assert [p[0] for p in scores["points"]] == [4, 5] and scores["threshold"] == 1.0
    assert json.loads(get(served.url + "api/alarms")[1])[0]["frame"] == 4
    code, jpeg = get(served.url + "frame.jpg")
    assert code == 200 and cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape[:2] == (90, 160)
    assert get(served.url + "alarms/a.png") == (200, b"png")
    for name in ("b.png", "..%2Fsecret", "%2Fetc%2Fpasswd"):  # only files the run itself logged
        assert get(served.url + "alarms/" + name)[0] == 404
    assert b"edgead live" in get(served.url)[1] and b"cdn" not in get(served.url)[1].lower()
    runs = json.loads(get(served.url + "api/runs")[1])
    assert any(run["url"] == served.url for run in runs)


def post(url: str, body: dict, token: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_feedback_buttons_need_the_operators_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    alarms = tmp_path / "alarms"
    alarms.mkdir()
    names = ["a1.png", "a1_map.png", "a1_map.npy"]
    for name in names:
        (alarms / name).write_bytes(b"x")
    for token in (None, "s3cret"):
        page = LiveWeb("127.0.0.1", 0, evidence_dir=alarms, token=token, feedback_dir=tmp_path / "feedback")
        page.start()
        try:
            page.publish(np.zeros((20, 30, 3), np.uint8), result(2.0), {"frames": 1}, 5.0, {"frame": 0, "saved": names})
            url = page.url + "api/feedback"
            code, reply = post(url, {"alarm": "a1.png", "mark": "false-alarm"}, "s3cret")
            if token is None:
                assert code == 403 and "--web-token" in reply["detail"]
                continue
            assert code == 200 and reply["mark"] == "false-alarm"
            assert post(url, {"alarm": "a1.png", "mark": "defect"}, "wrong")[0] == 401
            assert post(url, {"alarm": "a1.png", "mark": "defect"}, None)[0] == 401
            assert post(url, {"alarm": "../etc/passwd", "mark": "defect"}, "s3cret")[0] == 404
            assert post(url, {"alarm": "a1.png", "mark": "maybe"}, "s3cret")[0] == 400
            assert page.alarms()[0]["mark"] == "false-alarm"
        finally:
            page.stop("test over")
    lines = (tmp_path / "feedback" / "feedback.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["alarm"] == "a1"  # refused requests wrote nothing
    assert sorted(p.name for p in alarms.iterdir()) == sorted(names)  # the evidence untouched


def test_memory_is_bounded_and_publish_never_waits(served: LiveWeb) -> None:
    frame = np.zeros((720, 1280, 3), np.uint8)
    stuck = socket.create_connection(("127.0.0.1", int(served.url.rsplit(":", 1)[1].strip("/"))))
    stuck.sendall(b"GET /stream.mjpg?fps=30 HTTP/1.1\r\nHost: x\r\n\r\n")  # then never reads
    start = time.perf_counter()
    for i in range(SCORE_RING + 500):
        served.publish(frame, result(float(i % 7)), {"frames": i + 1}, 10.0, {"frame": i, "saved": []})
    per_call_us = (time.perf_counter() - start) / (SCORE_RING + 500) * 1e6
    assert per_call_us < 200, f"publish took {per_call_us:.0f} us"
    assert len(served.scores()["points"]) == SCORE_RING and len(served.alarms()) == web_module.ALARM_LIST
    view = cv2.imdecode(np.frombuffer(get(served.url + "frame.jpg")[1], np.uint8), cv2.IMREAD_COLOR)
    assert view.shape[:2] == (360, web_module.VIEW_WIDTH)  # a 1280x720 frame is shown (and encoded) at 640 px
    stuck.close()


def test_streams_are_capped(served: LiveWeb) -> None:
    served.publish(np.zeros((40, 60, 3), np.uint8), result(0.1), {"frames": 1}, 5.0)
    port = int(served.url.rsplit(":", 1)[1].strip("/"))
    streams = []
    for _ in range(MAX_STREAMS):
        conn = socket.create_connection(("127.0.0.1", port))
        conn.sendall(b"GET /stream.mjpg?fps=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.recv(64).startswith(b"HTTP/1.1 200")
        streams.append(conn)
    code, body = get(served.url + "stream.mjpg")
    assert code == 503 and b"at most" in body
    for conn in streams:
        conn.close()


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(RuntimeError, match=r'pip install "edgead\[web\]"'):
        LiveWeb()


def test_address_in_use_is_a_clear_error(served: LiveWeb) -> None:
    port = int(served.url.rsplit(":", 1)[1].strip("/"))
    with pytest.raises(RuntimeError, match=f"--web 127.0.0.1:{port}: cannot serve there"):
        LiveWeb("127.0.0.1", port).start()


def _video(data: Path, path: Path) -> Path:
    images = sorted((data / "test").rglob("*.png"))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (320, 240))
    for i in range(900):
        writer.write(cv2.resize(cv2.imread(str(images[(i // 10) % len(images)])), (320, 240)))
    writer.release()
    return path


@pytest.mark.slow  # fits a gaussian run, exports it, runs it on a video with a headless browser watching
def test_a_browser_sees_frames_scores_and_alarms_during_a_real_run(tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium here (Debian: apt-get install chromium)")
    from edgead.export.exporter import ExportOptions, export_run

    data, run_dir = make_gaussian_run(tmp_path)
    export_run(run_dir, tmp_path / "export", ExportOptions(), log=lambda _: None)
    video = _video(data, tmp_path / "line.avi")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Relative paths, run from tmp_path: the page (and the README's screenshot) shows no path of this machine.
    command = [sys.executable, "-m", "edgead.cli", "run", "--camera", video.name, "--export", "export",
               "--headless", "--web", str(port), "--save-anomalies", "alarms", "--web-token", "t0ken"]  # fmt: skip
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path / "xdg")}
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                get(url + "api/status", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_function("Number(document.getElementById('frames').textContent) > 0", timeout=30_000)
            first = int(page.inner_text("#frames"))
            page.wait_for_function(f"Number(document.getElementById('frames').textContent) > {first}", timeout=30_000)
            page.wait_for_function("points.length > 5", timeout=30_000)
            page.wait_for_selector("#alarms img", timeout=60_000)
            page.fill("#token", "t0ken")  # the operator marks the newest alarm from the page
            page.click("#alarms button[data-mark='false-alarm']")
            page.wait_for_function("/marked: false-alarm/.test(document.getElementById('alarms').textContent)")
            assert page.evaluate("document.getElementById('frame').naturalWidth") == 320  # under VIEW_WIDTH: as is
            page.wait_for_timeout(1500)
            shot = tmp_path / "live_page.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
            if dest := os.environ.get("EDGEAD_SCREENSHOT"):  # the README's picture comes from this test
                shutil.copyfile(shot, dest)
            run.wait(timeout=120)
            page.wait_for_function(
                "/ended|connection lost/.test(document.getElementById('state').textContent)", timeout=15_000
            )
            browser.close()
    finally:
        if run.poll() is None:
            run.kill()
        output = run.communicate()[0]
    assert run.returncode == 0, output
    assert "live page: http://127.0.0.1" in output
    marks = (tmp_path / "feedback" / "feedback.jsonl").read_text().splitlines()
    assert len(marks) >= 1 and json.loads(marks[0])["mark"] == "false-alarm"
