"""The web page of the api process, and the two small routes only it needs: active alerts and GPU use.

The page (``GET /``) is plain HTML, CSS and JavaScript written for FacePro (``pipeline/resources/web/``,
shipped as package data; no framework, no CDN: the boxes have no internet), served from the package with
``GET /ui/<file>``. Its panels call the documented API with ``fetch``: System (``/api/status`` every 1.5 s
into a table and 15-minute charts kept in the browser, ``/api/alerts``, ``/api/gpu``), Cameras
(``/api/cameras`` and the MJPEG live view, :mod:`pipeline.api_live`), Events, Identities, Jobs (``/api/jobs``:
"not available" when it answers 404) and Backups.

The page and its files hold no data, so they are served without the bearer token (``/`` and ``/ui/*``, see
:data:`pipeline.api.PUBLIC_PATHS`); the page asks for the token when an API call answers 401, keeps it in
``sessionStorage`` and sends it as ``Authorization: Bearer``.

GPU use comes from NVML through ``nvidia-ml-py`` (``import pynvml``), an optional dependency (the ``gpu``
extra): without it, without a driver or without a GPU, ``/api/gpu`` says why and the page shows "no GPU".
"""

from __future__ import annotations

import threading
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, Path
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from pipeline.api import ApiContext, ApiError, context
from pipeline.api_system import errors

#: Files of the page (``pipeline/resources/web``) and their content types; nothing else is served.
WEB_FILES: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "system.js": "text/javascript; charset=utf-8",
    "panels.js": "text/javascript; charset=utf-8",
    "jobs.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


def web_file(name: str) -> bytes:
    """The bytes of page file ``name`` (one of :data:`WEB_FILES`).

    Raises:
        ApiError: 404 for a name not in :data:`WEB_FILES`.
    """
    if name not in WEB_FILES:
        raise ApiError(404, f"no page file {name!r}")
    return resources.files("pipeline").joinpath("resources/web", name).read_bytes()


page = APIRouter(include_in_schema=False)
system_page = APIRouter(tags=["system"])


@page.get("/", response_class=HTMLResponse)
def index() -> HTMLResponse:
    """The page."""
    return HTMLResponse(web_file("index.html"), headers={"Cache-Control": "no-cache"})


@page.get("/ui/{name}")
def ui_file(name: str = Path(max_length=64)) -> Response:
    """A file of the page (script, style sheet, icon); 404 for any other name."""
    return Response(web_file(name), media_type=WEB_FILES.get(name), headers={"Cache-Control": "no-cache"})


# ------------------------------------------------------------------ alerts
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AlertDoc(_Body):
    stage: str
    alert: str = Field(description="low_rate, backlog or high_memory")


class AlertsDoc(_Body):
    """Active alerts, evaluated by this process over its status requests with ``runtime.alerts``' thresholds."""

    alerts: list[AlertDoc]
    min_rate_fps: float = Field(description="low_rate below this many frames/s (after grace_s)")
    backlog_frames: int = Field(description="backlog: a queue deeper than this and still growing")
    max_rss_mb: float = Field(description="high_memory above this many MiB per stage")


@system_page.get("/api/alerts", response_model=AlertsDoc, responses=errors(503))
def alerts(ctx: ApiContext = Depends(context)) -> AlertsDoc:
    """The active alerts of the running pipeline (the ``facepro_alert`` states of ``/metrics``): a fresh status
    from the supervisor fed to this process's alert tracker. 503 when no pipeline runs."""
    reply = ctx.link.status()
    with ctx.lock:
        ctx.alerts.update(reply)  # type: ignore[union-attr]
        active = sorted(key for key, on in ctx.alerts.active.items() if on)  # type: ignore[union-attr]
    a = ctx.cfg.runtime.alerts
    return AlertsDoc(alerts=[AlertDoc(stage=s, alert=k) for s, k in active], min_rate_fps=a.min_rate_fps,
                     backlog_frames=a.backlog_frames, max_rss_mb=a.max_rss_mb)


# --------------------------------------------------------------------- GPU
class GpuDeviceDoc(_Body):
    index: int
    name: str
    utilization_percent: float = Field(description="share of the last sample period a kernel ran, %")
    memory_used_mb: float = Field(description="MiB")
    memory_total_mb: float = Field(description="MiB")
    temperature_c: float | None = Field(None, description="°C, null when NVML does not say")


class GpuDoc(_Body):
    available: bool = Field(description="NVML answered with at least one GPU")
    reason: str | None = Field(description="why not, when not available")
    gpus: list[GpuDeviceDoc]


class GpuProbe:
    """GPU use through NVML (``nvidia-ml-py``), initialised on first use; an import or init failure is kept as
    the reason and not retried (a driver does not appear while the process runs)."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._reason: str | None = None
        self._lock = threading.Lock()

    def _init(self) -> Any:
        if self._nvml is None and self._reason is None:
            try:
                import pynvml  # nvidia-ml-py

                pynvml.nvmlInit()
                self._nvml = pynvml
            except ImportError:
                self._reason = "nvidia-ml-py is not installed (pip install 'facepro[gpu]')"
            except Exception as err:  # noqa: BLE001 - pynvml.NVMLError and its many subclasses
                self._reason = f"NVML: {err}"
        return self._nvml

    def read(self) -> GpuDoc:
        """Each GPU's use now, or why there is none (never raises)."""
        with self._lock:
            nvml = self._init()
            if nvml is None:
                return GpuDoc(available=False, reason=self._reason, gpus=[])
            try:
                gpus = [self._device(nvml, i) for i in range(nvml.nvmlDeviceGetCount())]
            except Exception as err:  # noqa: BLE001 - NVMLError (e.g. the GPU fell off the bus)
                return GpuDoc(available=False, reason=f"NVML: {err}", gpus=[])
        return GpuDoc(available=bool(gpus), reason=None if gpus else "NVML found no GPU", gpus=gpus)

    @staticmethod
    def _device(nvml: Any, index: int) -> GpuDeviceDoc:
        h = nvml.nvmlDeviceGetHandleByIndex(index)
        name = nvml.nvmlDeviceGetName(h)
        util = nvml.nvmlDeviceGetUtilizationRates(h)
        mem = nvml.nvmlDeviceGetMemoryInfo(h)
        try:
            temp: float | None = float(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))
        except Exception:  # noqa: BLE001 - not supported on every board
            temp = None
        return GpuDeviceDoc(index=index, name=name.decode() if isinstance(name, bytes) else str(name),
                            utilization_percent=float(util.gpu), memory_used_mb=round(mem.used / 2**20, 1),
                            memory_total_mb=round(mem.total / 2**20, 1), temperature_c=temp)


_GPU = GpuProbe()


@system_page.get("/api/gpu", response_model=GpuDoc, responses=errors())
def gpu() -> GpuDoc:
    """GPU use (utilisation, memory, temperature per GPU) through NVML, or ``available: false`` with the reason
    (no ``nvidia-ml-py``, no driver, no GPU)."""
    return _GPU.read()


ROUTERS = (page, system_page)
