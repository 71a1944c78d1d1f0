"""A one-file Django project that reports the request body it received (tests/test_frameworks.py)."""

import hashlib

from django.conf import settings

settings.configure(DEBUG=False, SECRET_KEY="test-only", ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__,
                   MIDDLEWARE=[], DATA_UPLOAD_MAX_MEMORY_SIZE=None)

from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402


@csrf_exempt
def upload(request):
    data = request.body
    return JsonResponse({"length": len(data), "sha256": hashlib.sha256(data).hexdigest()})


urlpatterns = [path("upload", upload)]
application = get_wsgi_application()
