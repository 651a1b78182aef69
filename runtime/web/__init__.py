"""The live page of ``edgead run --web [HOST:]PORT``: what the detector sees, its scores and its alarms.

The camera loop never waits for the page: after each frame it hands :class:`LiveWeb` the frame, the result
and a few counters (:meth:`LiveWeb.publish`: references stored under a lock, a score appended to a bounded
ring; microseconds). Everything else runs on the server's own thread, only when a page asks: drawing the
overlay, JPEG encoding (once per new frame, shared by every viewer, at the rate each page asks for and at
most :data:`MAX_STREAM_FPS`), the JSON of the status, the score series and the alarm gallery. Memory is
bounded whatever the pages do: the ring of scores, the list of alarms and the number of streams are capped,
and a stream to a viewer that stops reading blocks only its own generator (it always sends the newest frame,
never a queue).

Endpoints: ``/`` (the page: plain HTML and JavaScript from this package, no build step, no CDN),
``/api/status``, ``/api/scores?after=SEQ``, ``/api/alarms``, ``/alarms/FILE`` (a saved alarm's image, only
names the run itself logged), ``/frame.jpg``, ``/stream.mjpg?fps=N`` (MJPEG), ``/api/runs`` (every live page
on this machine, for an index), and one that changes something: ``POST /api/feedback`` (the alarm gallery's
"false alarm" / "defect" buttons: ``edgead feedback``'s append-only record), refused unless the request
carries the token the operator set (``run --web-token``; without one the buttons are refused). Bound to
127.0.0.1 unless a host is given.

Needs the ``web`` extra (FastAPI and uvicorn): ``pip install "edgead[web]"``.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgead.runtime.metadata import is_plain_file_name

PAGE = Path(__file__).with_name("index.html")
#: Scores kept for the plot (about 11 minutes at 30 FPS).
SCORE_RING = 20_000
#: Alarms listed in the gallery (newest first).
ALARM_LIST = 100
#: Latencies the page's p50 / p99 are computed over (the newest).
LATENCY_WINDOW = 1000
#: Simultaneous MJPEG streams; more are refused with 503 (each holds a connection and a generator).
MAX_STREAMS = 8
MAX_STREAM_FPS = 30.0
DEFAULT_STREAM_FPS = 5.0
JPEG_QUALITY = 80
#: Frames wider than this are shrunk before the overlay is drawn and encoded for the page: a 1280x720 frame
#: costs the server a quarter of the work (the loop's CPU on a small box), and the page shows it at about
#: this width anyway. The saved evidence keeps full resolution.
VIEW_WIDTH = 640
INSTALL_HINT = 'pip install "edgead[web]"'


def parse_address(text: str) -> tuple[str, int]:
    """``[HOST:]PORT`` -> (host, port); the host defaults to 127.0.0.1 (this machine only).

    Raises:
        ValueError: Not a port in 0..65535 (0: any free port), or an empty host.
    """
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") if sep else "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535 or (sep and not host):
        raise ValueError(f"--web {text!r}: expected [HOST:]PORT, e.g. 8080 or 0.0.0.0:8080 (port 0..65535)")
    return host, int(port)


def registry_dir() -> Path:
    """Where each running page announces itself (one JSON file per process), for ``/api/runs``."""
    root = Path(os.environ.get("XDG_RUNTIME_DIR") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "edgead" / "web"


def _alive(pid: int) -> bool:
    if os.name == "nt":  # no signal 0 there: a stale entry is shown until its file is removed
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LiveWeb:
    """The bridge between the camera loop and the page server (one per ``run``)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        evidence_dir: Path | None = None,
        token: str | None = None,
        feedback_dir: Path | None = None,
        log_path: Path | None = None,
    ) -> None:
        try:
            import fastapi  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as err:
            raise RuntimeError(f"--web needs FastAPI and uvicorn ({INSTALL_HINT}): {err}") from None
        self.host, self.port = host, port
        self.evidence_dir = Path(evidence_dir) if evidence_dir is not None else None
        #: The operator's token: the only way to change anything from the page (the feedback buttons).
        self.token = token or None
        self.feedback_dir = Path(feedback_dir) if feedback_dir is not None else Path("feedback")
        self.log_path = Path(log_path) if log_path is not None else None
        self._lock = threading.Lock()
        self._frame: np.ndarray | None = None
        self._result: Any = None
        self._seq = 0
        self._scores: deque[tuple[int, float, float, bool]] = deque(maxlen=SCORE_RING)
        self._alarms: deque[dict[str, Any]] = deque(maxlen=ALARM_LIST)
        self._status: dict[str, Any] = {"state": "starting"}
        self._info: dict[str, Any] = {}
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._last_frame_time: float | None = None
        self._jpeg: tuple[int, bytes] = (-1, b"")
        self._encode_lock = threading.Lock()
        self._streams = 0
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._registered: Path | None = None
        self.url = ""

    # ------------------------------------------------------------------ the loop's side (never waits on a page)
    def set_info(self, **info: Any) -> None:
        """What does not change during the run: source, export and its version, method, backend, precision."""
        with self._lock:
            self._info.update(info)

    def publish(
        self, frame: np.ndarray, result: Any, counters: dict[str, Any], latency_ms: float, alarm: dict | None = None
    ) -> None:
        """The newest frame and its result, the loop's ``counters`` (frames, anomalies, FPS, dropped, reconnects),
        this frame's latency and, when an alarm was saved, its log line. O(1): references, a few numbers and
        small dicts under a lock held for microseconds; nothing is drawn, encoded or sorted here."""
        now = time.time()
        with self._lock:
            self._seq += 1
            self._frame, self._result = frame, result
            self._scores.append((self._seq, now, float(result.score), bool(result.is_anomaly)))
            self._latencies.append(latency_ms)
            self._status = {**counters, "latency_ms": latency_ms, "state": "running"}
            self._last_frame_time = now
            if alarm is not None:
                self._alarms.appendleft(alarm)

    def set_state(self, state: str, **fields: Any) -> None:
        """``reconnecting``, ``ended: <reason>``, ... (shown on the page)."""
        with self._lock:
            self._status = {**self._status, **fields, "state": state}

    # ----------------------------------------------------------------------------------- the server's side
    def status(self) -> dict[str, Any]:
        with self._lock:
            latencies = np.array(self._latencies) if self._latencies else None
            status = {**self._info, **self._status, "seq": self._seq, "streams": self._streams}
            last = self._last_frame_time
        if latencies is not None:
            status["latency_p50_ms"] = round(float(np.percentile(latencies, 50)), 2)
            status["latency_p99_ms"] = round(float(np.percentile(latencies, 99)), 2)
        status["seconds_since_frame"] = round(time.time() - last, 1) if last is not None else None
        return status

    def scores(self, after: int = 0) -> dict[str, Any]:
        with self._lock:
            points = [p for p in self._scores if p[0] > after] if after else list(self._scores)
            threshold = float(self._result.threshold) if self._result is not None else None
        return {"threshold": threshold, "points": points}

    def alarms(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._alarms)

    def jpeg(self) -> tuple[int, bytes]:
        """The newest frame with its heatmap overlay as JPEG, encoded once per frame whoever asks."""
        with self._lock:
            seq, frame, result, status = self._seq, self._frame, self._result, dict(self._status)
        if frame is None:
            return -1, b""
        with self._encode_lock:
            if self._jpeg[0] == seq:
                return self._jpeg
            from edgead.runtime.overlay import draw_hud

            threshold = float(result.threshold)
            if frame.shape[1] > VIEW_WIDTH:
                height = round(frame.shape[0] * VIEW_WIDTH / frame.shape[1])
                frame = cv2.resize(frame, (VIEW_WIDTH, height), interpolation=cv2.INTER_AREA)
            hud = draw_hud(frame, result, status.get("fps"), status.get("latency_ms") or 0.0, 0.0, 2.0 * threshold)
            ok, data = cv2.imencode(".jpg", hud, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            self._jpeg = (seq, data.tobytes() if ok else b"")
            return self._jpeg

    def alarm_file(self, name: str) -> Path | None:
        """A saved alarm's file: only a plain name the run itself logged, inside the evidence folder."""
        if self.evidence_dir is None or not is_plain_file_name(name):
            return None
        with self._lock:
            known = any(name in alarm.get("saved", []) for alarm in self._alarms)
        path = self.evidence_dir / name
        return path if known and path.is_file() else None

    def app(self) -> Any:
        from fastapi import FastAPI, Header, HTTPException, Query
        from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse

        app = FastAPI(title="edgead live", docs_url=None, redoc_url=None, openapi_url=None)
        web = self

        @app.get("/", response_class=HTMLResponse)
        def page() -> str:
            return PAGE.read_text(encoding="utf-8")

        @app.get("/api/status")
        def status() -> JSONResponse:
            return JSONResponse(web.status())

        @app.get("/api/scores")
        def scores(after: int = Query(0, ge=0)) -> JSONResponse:
            return JSONResponse(web.scores(after))

        @app.get("/api/alarms")
        def alarms() -> JSONResponse:
            return JSONResponse(web.alarms())

        @app.get("/api/runs")
        def runs() -> JSONResponse:
            return JSONResponse(list_runs())

        @app.get("/alarms/{name}")
        def alarm(name: str) -> FileResponse:
            path = web.alarm_file(name)
            if path is None:
                raise HTTPException(404, f"no saved alarm file {name!r} in this run")
            return FileResponse(path)

        @app.post("/api/feedback")
        def feedback(body: dict[str, Any], authorization: str = Header("")) -> JSONResponse:
            """An operator's mark on an alarm (``edgead feedback``'s record), only with the operator's token."""
            import hmac

            if web.token is None:
                raise HTTPException(403, "feedback from the page needs run --web-token TOKEN (nothing was changed)")
            if not hmac.compare_digest(authorization.encode(), f"Bearer {web.token}".encode()):
                raise HTTPException(401, "wrong or missing token (nothing was changed)")
            name, mark, note = body.get("alarm"), body.get("mark"), body.get("note", "")
            if not isinstance(name, str) or web.alarm_file(name) is None:
                raise HTTPException(404, f"no saved alarm {name!r} in this run")
            from edgead.runtime.feedback import FeedbackError, record_feedback

            assert web.evidence_dir is not None  # alarm_file found it there
            try:
                lines = record_feedback([name], str(mark), web.evidence_dir, web.feedback_dir, web.log_path, str(note))
            except FeedbackError as err:
                raise HTTPException(400, str(err)) from None
            with web._lock:
                for alarm in web._alarms:
                    if name in alarm.get("saved", []):
                        alarm["mark"] = lines[0]["mark"]
            return JSONResponse(lines[0])

        @app.get("/frame.jpg")
        def frame() -> Response:
            seq, data = web.jpeg()
            if not data:
                raise HTTPException(404, "no frame yet")
            return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store", "X-Seq": str(seq)})

        @app.get("/stream.mjpg")
        async def stream(fps: float = Query(DEFAULT_STREAM_FPS, gt=0, le=MAX_STREAM_FPS)) -> StreamingResponse:
            with web._lock:
                if web._streams >= MAX_STREAMS:
                    raise HTTPException(503, f"at most {MAX_STREAMS} streams at once; close another page")
                web._streams += 1
            return StreamingResponse(web._mjpeg(fps), media_type="multipart/x-mixed-replace; boundary=frame")

        return app

    async def _mjpeg(self, fps: float) -> AsyncIterator[bytes]:
        try:
            sent = -1
            while not self._status.get("state", "").startswith("ended"):
                seq, data = await asyncio.to_thread(self.jpeg)
                if data and seq != sent:
                    sent = seq
                    head = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(data)
                    yield head + data + b"\r\n"
                await asyncio.sleep(1.0 / fps)
        finally:
            with self._lock:
                self._streams -= 1

    # ------------------------------------------------------------------------------------------- lifecycle
    def start(self, timeout_s: float = 10.0) -> str:
        """Serve on a daemon thread; returns the page's URL once the socket listens.

        Raises:
            RuntimeError: The address cannot be bound (in use, not this machine's), naming it.
        """
        import uvicorn

        config = uvicorn.Config(self.app(), host=self.host, port=self.port, log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # the loop owns SIGINT / SIGTERM
        errors: list[BaseException] = []

        def serve() -> None:
            try:
                self._server.run()
            except BaseException as err:  # SystemExit when the port cannot be bound
                errors.append(err)

        self._thread = threading.Thread(target=serve, name="edgead-web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.02)
        if not self._server.started:
            raise RuntimeError(f"--web {self.host}:{self.port}: cannot serve there (in use, or not an address of "
                               f"this machine){f': {errors[0]}' if errors else ''}")  # fmt: skip
        sockets = [s for server in self._server.servers for s in server.sockets]
        port = sockets[0].getsockname()[1] if sockets else self.port
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        self.url = f"http://{shown}:{port}/"
        self._register()
        return self.url

    def _register(self) -> None:
        folder = registry_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{os.getpid()}.json"
            path.write_text(json.dumps({"pid": os.getpid(), "url": self.url, "started": time.time()}))
            self._registered = path
        except OSError:  # the index is a convenience: a read-only home does not stop the page
            self._registered = None

    def stop(self, reason: str = "ended") -> None:
        """Say the run ended (the page shows it), then stop serving."""
        self.set_state(f"ended: {reason}")
        if self._registered is not None:
            self._registered.unlink(missing_ok=True)
        time.sleep(0.3)  # one status poll of an open page sees "ended" before the socket closes
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5.0)


def list_runs() -> list[dict[str, Any]]:
    """Every live page announced on this machine (stale entries of dead processes are skipped)."""
    runs = []
    folder = registry_dir()
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(entry, dict) and isinstance(entry.get("pid"), int) and _alive(entry["pid"]):
            runs.append(entry)
    return runs


__all__ = ["LiveWeb", "list_runs", "parse_address"]
