"""A camera client of a Triton Inference Server that serves an edgead export (``edgead run --triton URL``).

The server runs the Python-backend model of ``edgead export --format triton`` (``edgead.runtime.triton_model``):
preprocessing, inference, the threshold and the map resize happen there, so a client sends raw frames and
needs only ``tritonclient``. :class:`TritonPredictor` has the ``predict(frame) -> Result`` of a ``Detector``,
so the live loop (overlay, JSON-lines log, saved alarms) is the same. Several ``edgead run --triton``
processes against one server are the multi-camera deployment; the server batches their frames.

When the server is unreachable or its model not loaded yet (a restart, network loss), ``predict`` waits and
retries the same frame with a growing pause (0.5 s to 5 s) until it answers or ``max_wait_s`` passes, so no
frame of the log goes missing; requests the server refuses (unknown model, malformed input) fail at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edgead.runtime.decision import decision_threshold, is_anomalous
from edgead.runtime.result import Result

OUTPUTS = ("SCORE", "IS_ANOMALY", "THRESHOLD", "ANOMALY_MAP", "SERVER_MS")


class TritonUnavailable(RuntimeError):
    """The server did not answer within the allowed wait; the message names it."""


def _client_module(protocol: str) -> Any:
    try:
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
    except ImportError as err:
        raise RuntimeError(f"edgead run --triton needs tritonclient: pip install 'edgead[triton]' ({err})") from None
    return module


class TritonPredictor:
    """Scores frames on a Triton server (see the module docstring).

    Args:
        url: ``host:port``; ``grpc://host:port`` or ``http://host:port`` choose the protocol (default HTTP).
        model: The model's name in the repository (the method's name with ``_``, e.g. ``score_resilience``).
        threshold: Overrides the server's threshold (the decision is then made here: ``score >= threshold``).
        max_wait_s: How long one frame waits for an unreachable server (None: for ever).
        on_event: Receives a line when the server is lost and when it is back.
    """

    def __init__(
        self,
        url: str,
        model: str,
        threshold: float | None = None,
        max_wait_s: float | None = 120.0,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        protocol, _, address = url.rpartition("://")
        self.protocol = protocol or "http"
        if self.protocol not in ("http", "grpc"):
            raise ValueError(f"--triton {url!r}: the protocol must be http:// or grpc://")
        self.url, self.address, self.model = url, address, model
        self.client_module = _client_module(self.protocol)
        self.max_wait_s, self.on_event = max_wait_s, on_event
        self.override = threshold
        self.client = self.client_module.InferenceServerClient(address)
        kwargs = {"as_json": True} if self.protocol == "grpc" else {}
        config = self._call(lambda: self.client.get_model_config(model, **kwargs))
        config = config.get("config", config)  # gRPC wraps the config, HTTP does not
        parameters = config.get("parameters", {})
        self.method = parameters.get("edgead_method", {}).get("string_value", model)
        served = parameters.get("edgead_threshold", {}).get("string_value")
        self.server_threshold = float(served) if served else float("nan")

    @property
    def threshold(self) -> float:
        return decision_threshold(self.server_threshold, self.override)

    def describe(self) -> dict[str, Any]:
        return {"export": f"{self.url}/{self.model}", "method": self.method, "backend": "triton", "precision": "server"}

    def _call(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, retried while the server is unreachable (connection errors), up to ``max_wait_s``."""
        from tritonclient.utils import InferenceServerException

        start, pause, lost = time.monotonic(), 0.5, False
        while True:
            try:
                value = fn()
            except (InferenceServerException, ConnectionError, OSError) as err:
                if isinstance(err, InferenceServerException) and not _unreachable(err):
                    raise RuntimeError(f"Triton server {self.url} refused the request: {err}") from None
                if self.max_wait_s is not None and time.monotonic() - start > self.max_wait_s:
                    message = f"Triton server {self.url} unreachable for {self.max_wait_s:g} s: {err}"
                    raise TritonUnavailable(message) from None
                if not lost and self.on_event:
                    self.on_event(f"Triton server {self.url} unreachable ({err}); retrying")
                lost = True
                time.sleep(pause)
                pause = min(5.0, pause * 2)
                self.client = self.client_module.InferenceServerClient(self.address)
                continue
            if lost and self.on_event:
                self.on_event(f"Triton server {self.url} is back")
            return value

    def predict(self, frame_bgr: np.ndarray) -> Result:
        """Score one (H, W, 3) uint8 BGR frame on the server; ``timings`` split client / network / server."""
        if not isinstance(frame_bgr, np.ndarray) or frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 BGR frame, got {getattr(frame_bgr, 'shape', frame_bgr)}")
        m = self.client_module
        t0 = time.perf_counter()
        batch = np.ascontiguousarray(frame_bgr[None], dtype=np.uint8)

        def infer() -> Any:
            inp = m.InferInput("FRAME", list(batch.shape), "UINT8")
            inp.set_data_from_numpy(batch)
            kwargs = {"binary_data": True} if self.protocol == "http" else {}
            outputs = [m.InferRequestedOutput(name, **kwargs) for name in OUTPUTS]
            return self.client.infer(self.model, [inp], outputs=outputs)

        t1 = time.perf_counter()
        response = self._call(infer)
        t2 = time.perf_counter()
        score = float(response.as_numpy("SCORE")[0, 0])
        threshold = self.threshold
        result = Result(
            score=score,
            anomaly_map=response.as_numpy("ANOMALY_MAP")[0],
            is_anomaly=bool(is_anomalous(score, threshold)),
            threshold=threshold,
        )
        server_ms = float(response.as_numpy("SERVER_MS")[0, 0])
        t3 = time.perf_counter()
        round_trip = (t2 - t1) * 1e3
        result.timings = {
            "preprocess": (t1 - t0) * 1e3,
            "infer": round_trip,
            "postprocess": (t3 - t2) * 1e3,
            "server": server_ms,
            "network": max(0.0, round_trip - server_ms),
            "client": ((t1 - t0) + (t3 - t2)) * 1e3,
        }
        return result

    def close(self) -> None:
        self.client.close()


def _unreachable(err: Exception) -> bool:
    """Whether a tritonclient error is transient: the server cannot be reached, or it is up but the model is
    (re)loading or unloading ("has no available versions"), as during a restart. A model name the server does
    not know ("is not found") and malformed requests are not transient."""
    text = f"{err} {getattr(err, 'status', lambda: '')() or ''}".lower()
    transient = ("unavailable", "connection refused", "failed to connect", "broken pipe", "reset by peer",
                 "no available versions", "not ready", "deadline exceeded", "socket closed")  # fmt: skip
    return any(key in text for key in transient) and "is not found" not in text


__all__ = ["TritonPredictor", "TritonUnavailable"]
