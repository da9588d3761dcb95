"""The WSGI application (marketplace.serve runs it in granian's worker processes).

Once loaded, with every module its URL configuration imports, the application's objects (Django, DRF, the apps:
most of a worker's heap, and never garbage) are moved out of the garbage collector's reach (`gc.freeze()`). A full
collection walked all of them: 200-230 ms on a 2-core machine, every request of that worker waiting meanwhile,
which was most of bench/catalog_search.py's p99.

Request bodies are read ahead of Django by a bounded number of threads (marketplace.request_bodies); the process's own
environment, which granian puts in every request's environ, is taken out first (marketplace.process_environment)."""

import gc
import os

from django.core.wsgi import get_wsgi_application
from django.urls import get_resolver

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
django_application = get_wsgi_application()
from marketplace.process_environment import without_process_environment  # noqa: E402
from marketplace.request_bodies import read_ahead  # noqa: E402 (its imports need Django set up)

application = without_process_environment(read_ahead(django_application))
get_resolver().url_patterns  # noqa: B018 (imports every view now, so that they are frozen with the rest)
gc.freeze()
