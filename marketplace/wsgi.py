"""The WSGI application (marketplace.serve runs it in granian's worker processes).

Once loaded, with every module its URL configuration imports, the application's objects (Django, DRF, the apps:
most of a worker's heap, and never garbage) are moved out of the garbage collector's reach (`gc.freeze()`). A full
collection walked all of them: 200-230 ms on a 2-core machine, every request of that worker waiting meanwhile,
which was most of bench/catalog_search.py's p99."""

import gc
import os

from django.core.wsgi import get_wsgi_application
from django.urls import get_resolver

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
application = get_wsgi_application()
get_resolver().url_patterns  # noqa: B018 (imports every view now, so that they are frozen with the rest)
gc.freeze()
