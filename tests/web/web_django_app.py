"""A minimal Django project in one module: settings, URLs and two views.

``wsgi`` is ``get_wsgi_application()``, ``asgi`` is ``get_asgi_application()``: the web
tests serve both with ``sockshare serve`` and with gunicorn / uvicorn. Views:
``/hello/<name>/`` (JSON) and ``/upload/`` (POST, the raw body's length and sha256, and
an uploaded file's when the body is multipart).
"""

from __future__ import annotations

import hashlib
from typing import Any

import django  # type: ignore[import-untyped]
from django.conf import settings  # type: ignore[import-untyped]

settings.configure(
    DEBUG=False,
    SECRET_KEY="sockshare-tests-only",
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    INSTALLED_APPS=[],
    MIDDLEWARE=[],
    DATA_UPLOAD_MAX_MEMORY_SIZE=16 * 1024 * 1024,
    USE_TZ=True,
)
django.setup()

from django.core.asgi import get_asgi_application  # type: ignore[import-untyped]  # noqa: E402
from django.core.wsgi import get_wsgi_application  # type: ignore[import-untyped]  # noqa: E402
from django.http import HttpRequest, JsonResponse  # type: ignore[import-untyped]  # noqa: E402
from django.urls import path  # type: ignore[import-untyped]  # noqa: E402


def hello(request: HttpRequest, name: str) -> Any:
    return JsonResponse({"hello": name, "method": request.method})


def upload(request: HttpRequest) -> Any:
    if request.method != "POST":
        return JsonResponse({"error": "POST only"}, status=405)
    out: dict[str, Any] = {}
    if request.FILES:
        f = request.FILES["file"]
        data = f.read()
        out["file"] = {"name": f.name, "length": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()}
        out["field"] = request.POST.get("field")
    else:
        body = request.body
        out["length"] = len(body)
        out["sha256"] = hashlib.sha256(body).hexdigest()
    return JsonResponse(out)


urlpatterns = [
    path("hello/<str:name>/", hello),
    path("upload/", upload),
]

wsgi = get_wsgi_application()
asgi = get_asgi_application()
