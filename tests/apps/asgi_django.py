"""A one-file Django project served through Django's ASGI handler (tests/test_asgi.py)."""

import json

from django.conf import settings

settings.configure(DEBUG=False, SECRET_KEY="test-only", ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__,
                   MIDDLEWARE=[])

from django.core.asgi import get_asgi_application  # noqa: E402
from django.http import JsonResponse, StreamingHttpResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402


@csrf_exempt
def echo(request):
    data = json.loads(request.body)
    return JsonResponse({"got": data, "method": request.method})


async def stream(request):
    async def pieces():
        for i in range(3):
            yield f"piece {i}\n"

    return StreamingHttpResponse(pieces(), content_type="text/plain")


urlpatterns = [path("json", echo), path("stream", stream)]
application = get_asgi_application()
